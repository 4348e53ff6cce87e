"""Hub failures as :class:`HubAccessError`, with a message that names the fix and never the token.

huggingface_hub raises many error types (HTTP errors by status, typed errors for missing repos and
revisions, offline mode, connection errors of its HTTP client). :func:`explain_hub_error` matches an
error against :data:`_RULES`, an ordered table of (condition, message template); the first match wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HubAccessError", "explain_hub_error", "hub_errors", "missing_token_error"]

TOKEN_FIX = "pass token=... (CLI: --token or the HF_TOKEN environment variable) or run `hf auth login`"


class HubAccessError(RuntimeError):
    """A Hub request failed; the message says what went wrong and how to fix it (never the token)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    found: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return tuple(found)


def hub_errors() -> tuple[type[BaseException], ...]:
    """The exception types that :func:`explain_hub_error` turns into a :class:`HubAccessError`."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, *_transport_errors())


def missing_token_error(repo_id: str) -> HubAccessError:
    """The error for a push without any token (none passed, no HF_TOKEN, no `hf auth login`)."""
    return HubAccessError(
        f"cannot push to {repo_id!r}: no Hugging Face token found. Pushing needs a token with write access: "
        "pass token=... (CLI: --token, or set the HF_TOKEN environment variable) or run `hf auth login`. "
        "Create one at https://huggingface.co/settings/tokens."
    )


@dataclass(frozen=True)
class _Failure:
    """One failed Hub request: the error and what we were doing."""

    err: Exception
    repo_id: str
    action: str
    revision: str | None
    endpoint: str | None
    token_given: bool

    @property
    def status(self) -> int | None:
        return getattr(getattr(self.err, "response", None), "status_code", None)

    @property
    def server(self) -> str:
        """The Hub's own explanation (``server_message`` or the ``X-Error-Message`` header), or ''."""
        message = getattr(self.err, "server_message", None) or ""
        response = getattr(self.err, "response", None)
        if not message and response is not None:
            message = response.headers.get("X-Error-Message", "") or ""
        return message.strip()

    def is_a(self, class_name: str) -> bool:
        """Whether the error is an instance of ``huggingface_hub.errors.<class_name>``."""
        from huggingface_hub import errors

        return isinstance(self.err, getattr(errors, class_name))

    def fields(self) -> dict[str, Any]:
        """The values the message templates of :data:`_RULES` may use."""
        from huggingface_hub import constants

        server = self.server
        return {
            "what": f"cannot {self.action} {self.repo_id!r}",
            "hub": f" on {self.endpoint}" if self.endpoint else "",
            "reach": self.endpoint or constants.ENDPOINT,
            "revision": self.revision,
            "status": self.status,
            "error": f"{type(self.err).__name__}: {self.err}",
            "server_or_error": server or self.err,
            "server_in_parens": f" ({server})" if server else "",
            "namespace": self.repo_id.split("/")[0] if "/" in self.repo_id else "your namespace",
            "token_fix": TOKEN_FIX,
            "Token_fix": TOKEN_FIX[0].upper() + TOKEN_FIX[1:],
        }


def _unreachable(f: _Failure) -> bool:
    """No HTTP answer at all: a connection error of the HTTP client (not a cache miss)."""
    return (
        f.status is None and not f.is_a("LocalEntryNotFoundError") and isinstance(f.err, _transport_errors())
    )


def _not_found(f: _Failure) -> bool:
    return f.is_a("RepositoryNotFoundError") or f.status == 404


# (condition, message template): the first matching condition picks the message.
_RULES: tuple[tuple[Callable[[_Failure], bool], str], ...] = (
    (
        lambda f: f.is_a("OfflineModeIsEnabled"),
        "{what}: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to reach the Hub "
        "(loading works offline only for files already in the cache).",
    ),
    (
        _unreachable,
        "{what}: could not reach the Hub at {reach} ({error}). Check the network, proxy settings and "
        "HF_ENDPOINT.",
    ),
    (
        lambda f: f.is_a("LocalEntryNotFoundError"),
        "{what}: the files are not in the local cache and the Hub is not reachable (HF_HUB_OFFLINE=1 or no "
        "network). Load it once online, or pass a local adapter directory.",
    ),
    (
        lambda f: f.is_a("RevisionNotFoundError"),
        "{what}{hub}: revision {revision!r} does not exist. Pass an existing branch, tag or commit id (list "
        "them with huggingface_hub.HfApi().list_repo_refs(repo_id)).",
    ),
    (
        lambda f: f.is_a("GatedRepoError"),
        "{what}{hub}: the repo is gated; request access on its page, then {token_fix}.",
    ),
    (
        lambda f: f.status == 401 and "invalid credentials" in f.server.lower(),
        "{what}{hub}: the token was rejected (401 invalid credentials): it is wrong, expired or revoked. "
        "Create a new token at https://huggingface.co/settings/tokens (write access to push) and {token_fix}.",
    ),
    (
        lambda f: _not_found(f) and f.token_given,
        "{what}{hub}: the repository does not exist, or it is private and this token has no access to it. "
        "Check the repo id, or use a token of an account that can read it.",
    ),
    (
        _not_found,
        "{what}{hub}: the repository does not exist, or it is private and no token was sent. Check the repo "
        "id; for a private repo {token_fix}.",
    ),
    (
        lambda f: f.is_a("EntryNotFoundError"),
        "{what}{hub}: a required file is missing ({server_or_error}).",
    ),
    (
        lambda f: f.status == 401,
        "{what}{hub}: authentication is required (401). {Token_fix}.",
    ),
    (
        lambda f: f.status == 403,
        "{what}{hub}: permission denied (403) for namespace {namespace!r}. Push to a namespace you own "
        "(e.g. 'your-username/<name>'), or use a token with write access to {namespace!r} (a write or "
        "fine-grained token of a member of that organisation).",
    ),
    (
        lambda f: f.status is not None,
        "{what}{hub}: the Hub answered HTTP {status}{server_in_parens}. Retry later; if it persists check "
        "https://status.huggingface.co.",
    ),
    (lambda f: True, "{what}{hub}: {error}"),
)


def explain_hub_error(
    err: Exception,
    *,
    repo_id: str,
    action: str,
    revision: str | None,
    endpoint: str | None,
    token_given: bool,
) -> HubAccessError:
    """Turn a huggingface_hub error into a HubAccessError that says what to do.

    ``action`` is the verb of the message ("push to", "load"); ``token_given`` tells a private repo
    (the token has no access) from a missing token. The Hub's own message is appended when the
    explanation does not already contain it.
    """
    failure = _Failure(err, repo_id, action, revision, endpoint, token_given)
    template = next(template for matches, template in _RULES if matches(failure))
    message = template.format(**failure.fields())
    server = failure.server
    if server and server not in message:
        message += f" [Hub said: {server}]"
    return HubAccessError(message)
