"""The test Hub server (tests/support/hub_server.py) speaks the protocol huggingface_hub's client uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.hub_adapters import BAD_TOKEN, TOKEN_A
from support.hub_server import HubServer


def test_hub_server_speaks_the_client_protocol(hub: HubServer, online: Path) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=hub.url, token=TOKEN_A)
    assert api.whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token=BAD_TOKEN).whoami()
    assert info.value.response.status_code == 401
    api.create_repo("alice/r", private=True)
    api.create_repo("alice/r", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("alice/r")
    assert info.value.response.status_code == 409
    c1 = api.create_commit(
        "alice/r",
        [CommitOperationAdd("a/b.txt", b"one"), CommitOperationAdd("c.txt", b"x")],
        commit_message="one",
    ).oid
    c2 = api.create_commit(
        "alice/r",
        [CommitOperationAdd("a/b.txt", b"two"), CommitOperationDelete("c.txt")],
        commit_message="two",
        parent_commit=c1,
    ).oid
    assert hub.commits("alice/r")[:2] == [c2, c1]
    info_main = api.model_info("alice/r")
    assert info_main.sha == c2 and info_main.private is True
    assert sorted(s.rfilename for s in info_main.siblings) == [".gitattributes", "a/b.txt"]
    assert api.model_info("alice/r", revision=c1).sha == c1
    assert sorted(api.list_repo_files("alice/r", revision=c1)) == [".gitattributes", "a/b.txt", "c.txt"]
    top = {e.path for e in api.list_repo_tree("alice/r")}
    assert top == {".gitattributes", "a"}
    api.create_branch("alice/r", branch="dev", revision=c1)
    assert {b.name: b.target_commit for b in api.list_repo_refs("alice/r").branches} == {
        "main": c2,
        "dev": c1,
    }

    def read(**kw) -> str:
        path = hf_hub_download("alice/r", "a/b.txt", cache_dir=online, token=TOKEN_A, endpoint=hub.url, **kw)
        return Path(path).read_text()

    assert read() == "two" and read(revision=c1) == "one" and read(revision="dev") == "one"
    assert read(revision=c1[:8]) == "one"
    with pytest.raises(RevisionNotFoundError):
        read(revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/r", "missing.txt", cache_dir=online, token=TOKEN_A, endpoint=hub.url)
    assert api.file_exists("alice/r", "a/b.txt") and not api.file_exists("alice/r", "c.txt")
