"""Hub failures explained (hpr_peft.hub.errors): each kind of huggingface_hub error gets a message naming its fix.

The Hub tests (test_push.py, test_load.py) provoke the common failures over HTTP; this table covers every
rule of the explanation, with errors built by hand.
"""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub import errors

from hpr_peft.hub import HubAccessError
from hpr_peft.hub.errors import explain_hub_error, hub_errors, missing_token_error
from support.hub_adapters import TOKEN_A

TOKEN_FIX = "pass token=... (CLI: --token or the HF_TOKEN environment variable) or run `hf auth login`"


def _http(cls: type, status: int, server: str | None = None, *, in_header_only: bool = False) -> Exception:
    """An HTTP error as huggingface_hub raises it: the Hub's message in X-Error-Message (and server_message)."""
    headers = {"X-Error-Message": server} if server else {}
    request = httpx2.Request("GET", "http://hub.test/api/models/alice/m")
    response = httpx2.Response(status, headers=headers, request=request)
    return cls(f"{status} error", response=response, server_message=None if in_header_only else server)


# (error, arguments other than the defaults, the expected message)
CASES = [
    pytest.param(
        errors.OfflineModeIsEnabled("offline"),
        {},
        "cannot load 'alice/m': Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
        "to reach the Hub (loading works offline only for files already in the cache).",
        id="offline",
    ),
    pytest.param(
        httpx2.ConnectError("connection refused"),
        {"endpoint": "http://127.0.0.1:9"},
        "cannot load 'alice/m': could not reach the Hub at http://127.0.0.1:9 (ConnectError: connection "
        "refused). Check the network, proxy settings and HF_ENDPOINT.",
        id="unreachable",
    ),
    pytest.param(
        httpx2.ConnectError("connection refused"),
        {},
        "cannot load 'alice/m': could not reach the Hub at https://hub.example (ConnectError: connection "
        "refused). Check the network, proxy settings and HF_ENDPOINT.",
        id="unreachable-default-endpoint",
    ),
    pytest.param(
        errors.LocalEntryNotFoundError("not cached"),
        {"endpoint": "http://h:1"},
        "cannot load 'alice/m': the files are not in the local cache and the Hub is not reachable "
        "(HF_HUB_OFFLINE=1 or no network). Load it once online, or pass a local adapter directory.",
        id="not-in-cache",
    ),
    pytest.param(
        _http(errors.RevisionNotFoundError, 404, "Invalid rev id: v9"),
        {"revision": "v9", "endpoint": "http://h:1"},
        "cannot load 'alice/m' on http://h:1: revision 'v9' does not exist. Pass an existing branch, tag or "
        "commit id (list them with huggingface_hub.HfApi().list_repo_refs(repo_id)). "
        "[Hub said: Invalid rev id: v9]",
        id="unknown-revision",
    ),
    pytest.param(
        _http(errors.GatedRepoError, 403, "Access to model alice/m is restricted"),
        {},
        f"cannot load 'alice/m': the repo is gated; request access on its page, then {TOKEN_FIX}. "
        "[Hub said: Access to model alice/m is restricted]",
        id="gated",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 401, "Invalid credentials in Authorization header"),
        {"action": "push to", "token_given": True},
        "cannot push to 'alice/m': the token was rejected (401 invalid credentials): it is wrong, expired or "
        "revoked. Create a new token at https://huggingface.co/settings/tokens (write access to push) and "
        f"{TOKEN_FIX}. [Hub said: Invalid credentials in Authorization header]",
        id="rejected-token",
    ),
    pytest.param(
        _http(errors.RepositoryNotFoundError, 404, "Repository not found"),
        {"token_given": True},
        "cannot load 'alice/m': the repository does not exist, or it is private and this token has no access "
        "to it. Check the repo id, or use a token of an account that can read it. "
        "[Hub said: Repository not found]",
        id="private-with-token",
    ),
    pytest.param(
        _http(errors.RepositoryNotFoundError, 401),
        {},
        "cannot load 'alice/m': the repository does not exist, or it is private and no token was sent. "
        f"Check the repo id; for a private repo {TOKEN_FIX}.",
        id="private-without-token",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 404),
        {"endpoint": "http://h:1"},
        "cannot load 'alice/m' on http://h:1: the repository does not exist, or it is private and no token "
        f"was sent. Check the repo id; for a private repo {TOKEN_FIX}.",
        id="plain-404",
    ),
    pytest.param(
        errors.EntryNotFoundError("adapter_model.safetensors"),
        {},
        "cannot load 'alice/m': a required file is missing (adapter_model.safetensors).",
        id="missing-file",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 401),
        {},
        "cannot load 'alice/m': authentication is required (401). Pass token=... (CLI: --token or the "
        "HF_TOKEN environment variable) or run `hf auth login`.",
        id="needs-auth",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 403, "You don't have the rights"),
        {"repo_id": "bob/x", "action": "push to"},
        "cannot push to 'bob/x': permission denied (403) for namespace 'bob'. Push to a namespace you own "
        "(e.g. 'your-username/<name>'), or use a token with write access to 'bob' (a write or fine-grained "
        "token of a member of that organisation). [Hub said: You don't have the rights]",
        id="other-namespace",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 403),
        {"repo_id": "x", "action": "push to"},
        "cannot push to 'x': permission denied (403) for namespace 'your namespace'. Push to a namespace you "
        "own (e.g. 'your-username/<name>'), or use a token with write access to 'your namespace' (a write or "
        "fine-grained token of a member of that organisation).",
        id="own-namespace",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 500, "boom"),
        {},
        "cannot load 'alice/m': the Hub answered HTTP 500 (boom). Retry later; if it persists check "
        "https://status.huggingface.co.",
        id="server-error",
    ),
    pytest.param(
        _http(errors.HfHubHTTPError, 503, "down for maintenance", in_header_only=True),
        {},
        "cannot load 'alice/m': the Hub answered HTTP 503 (down for maintenance). Retry later; if it "
        "persists check https://status.huggingface.co.",
        id="server-error-header",
    ),
    pytest.param(
        ValueError("weird"),
        {"endpoint": "http://h:1"},
        "cannot load 'alice/m' on http://h:1: ValueError: weird",
        id="anything-else",
    ),
]


@pytest.mark.parametrize(("error", "arguments", "expected"), CASES)
def test_explain_hub_error(
    error: Exception, arguments: dict, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    kwargs = {
        "repo_id": "alice/m",
        "action": "load",
        "revision": None,
        "endpoint": None,
        "token_given": False,
        **arguments,
    }
    explained = explain_hub_error(error, **kwargs)
    assert isinstance(explained, HubAccessError)
    assert str(explained) == expected


def test_hub_errors_cover_what_the_client_raises() -> None:
    caught = hub_errors()
    for error in (
        errors.RepositoryNotFoundError,
        errors.LocalEntryNotFoundError,
        errors.OfflineModeIsEnabled,
    ):
        assert issubclass(error, caught)
    assert issubclass(httpx2.ConnectError, caught)
    assert not issubclass(ValueError, caught)


def test_missing_token_error_names_every_way_to_give_one() -> None:
    message = str(missing_token_error("alice/x"))
    assert message.startswith("cannot push to 'alice/x': no Hugging Face token found.")
    assert "HF_TOKEN" in message and "hf auth login" in message and "settings/tokens" in message
    assert TOKEN_A not in message
