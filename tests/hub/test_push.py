"""Pushing HPR adapters (hpr_peft.hub.push) over real HTTP to tests/support/hub_server.py (no internet).

Pushes run in this process with ``endpoint=`` (and huggingface_hub's offline switch, set by conftest,
turned off for the test by the ``online`` fixture).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from hpr_peft.hub import HubAccessError, load_adapter, push_to_hub
from support.hub_adapters import BAD_TOKEN, FIT_RESULTS, SECRETS, TOKEN_A, card_metadata, hpr_model
from support.hub_server import HubServer
from support.models import make_tiny_causal_lm


def test_push_uploads_adapter_and_card_in_one_commit(
    hub: HubServer, online: Path, base_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    model = hpr_model(base_dir, seed=1, fit_results=FIT_RESULTS)
    local = tmp_path / "local"
    model.save_pretrained(local)

    info = push_to_hub(
        model, "alice/tiny-hpr", token=TOKEN_A, private=True, endpoint=hub.url, commit_message="first push"
    )
    commits = hub.commits("alice/tiny-hpr")
    assert len(commits) == 2 and commits[0] == info.oid  # repo creation + exactly one commit
    assert hub.state.repos["alice/tiny-hpr"].private
    files = hub.files("alice/tiny-hpr")
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads(files["adapter_config.json"]) == json.loads((local / "adapter_config.json").read_text())
    remote = load_safetensors_bytes(files["adapter_model.safetensors"])
    saved = load_safetensors_bytes((local / "adapter_model.safetensors").read_bytes())
    assert remote.keys() == saved.keys() and all(torch.equal(remote[k], saved[k]) for k in saved)
    meta, body = card_metadata(files["README.md"].decode())
    assert meta["library_name"] == "peft" and "base_model" not in meta  # base is a local path here
    assert "| truthfulqa_mc2 | 0.4871 |" in body and "| edited layers | [0, 1] |" in body

    # from a saved directory with eval_results.json beside it, to a new branch; a stale pickle is deleted
    api = HfApi(endpoint=hub.url, token=TOKEN_A)
    api.create_commit(
        "alice/tiny-hpr",
        [CommitOperationAdd("adapter_model.bin", b"old pickle")],
        commit_message="legacy pickle",
    )
    (local / "eval_results.json").write_text(json.dumps({"mc1": 0.25, "side_effects": {"kl": 0.0123}}))
    main_before = hub.files("alice/tiny-hpr")
    info2 = push_to_hub(
        local,
        "alice/tiny-hpr",
        token=TOKEN_A,
        revision="dev",
        endpoint=hub.url,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert hub.files("alice/tiny-hpr") == main_before  # main untouched
    dev = hub.files("alice/tiny-hpr", "dev")
    assert hub.commits("alice/tiny-hpr", "dev")[0] == info2.oid
    assert "adapter_model.bin" not in dev
    assert json.loads(dev["eval_results.json"])["side_effects"]["kl"] == 0.0123
    meta, body = card_metadata(dev["README.md"].decode())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    assert "| mc1 | 0.25 |" in body and "**side_effects**" in body and "| kl | 0.0123 |" in body


def test_eval_results_file_argument_is_uploaded(
    hub: HubServer, online: Path, base_dir: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"truthfulqa_mc1": 0.5}))
    push_to_hub(hpr_model(base_dir, seed=1), "alice/e", token=TOKEN_A, endpoint=hub.url, eval_results=results)
    files = hub.files("alice/e")
    assert json.loads(files["eval_results.json"]) == {"truthfulqa_mc1": 0.5}
    assert "| truthfulqa_mc1 | 0.5 |" in files["README.md"].decode()


def _closed_endpoint() -> str:
    """The URL of a local port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# (repo id, push arguments, what the HubAccessError says); endpoint "closed": nothing listens there
HUB_REFUSALS = [
    pytest.param("alice/x", {}, r"no Hugging Face token found.*HF_TOKEN.*hf auth login", id="no-token"),
    pytest.param(
        "alice/x", {"token": BAD_TOKEN}, r"token was rejected \(401.*settings/tokens", id="rejected-token"
    ),
    pytest.param(
        "bob/x",
        {"token": TOKEN_A},
        r"permission denied \(403\) for namespace 'bob'.*namespace you own",
        id="other-namespace",
    ),
    pytest.param(
        "alice/missing", {"token": TOKEN_A, "create_repo": False}, r"does not exist", id="missing-repo"
    ),
    pytest.param(
        "alice/x",
        {"token": TOKEN_A, "endpoint": "closed"},
        r"could not reach the Hub at http://127.0.0.1:\d+.*HF_ENDPOINT",
        id="unreachable",
    ),
    pytest.param(
        "alice/x",
        {"token": TOKEN_A, "offline": True},
        r"offline mode is on \(HF_HUB_OFFLINE=1\)",
        id="offline",
    ),
]


@pytest.mark.parametrize(("repo_id", "arguments", "message"), HUB_REFUSALS)
def test_push_refused_by_the_hub_says_how_to_fix_it(
    hub: HubServer,
    online: Path,
    base_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    repo_id: str,
    arguments: dict[str, Any],
    message: str,
) -> None:
    import huggingface_hub.constants as constants

    model = hpr_model(base_dir, seed=1)
    kwargs = {"endpoint": hub.url, **arguments}
    if kwargs["endpoint"] == "closed":
        kwargs["endpoint"] = _closed_endpoint()
    if kwargs.pop("offline", False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError, match=message) as refused:
        push_to_hub(model, repo_id, **kwargs)
    assert all(secret not in str(refused.value) for secret in SECRETS)
    assert repo_id not in hub.state.repos


def _lora_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "lora"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(directory / "adapter_model.safetensors"))
    return directory


def _pickle_only_dir(tmp_path: Path) -> Path:
    directory = _lora_dir(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(b"pickle")
    return directory


# (repo id, what to push: built from (tmp_path, base_dir), the error, its message)
BAD_INPUTS: list[Any] = [
    pytest.param(
        "not a repo id", lambda tmp, base: hpr_model(base, seed=1), ValueError, "repo id", id="bad-repo-id"
    ),
    pytest.param("alice/x", lambda tmp, base: _lora_dir(tmp), ValueError, "not 'HPR'", id="lora-adapter"),
    pytest.param(
        "alice/x", lambda tmp, base: _pickle_only_dir(tmp), ValueError, "never unpickles", id="pickle-only"
    ),
    pytest.param(
        "alice/x", lambda tmp, base: tmp, FileNotFoundError, "not a saved adapter", id="not-an-adapter"
    ),
    pytest.param("alice/x", lambda tmp, base: object(), TypeError, "must be a PeftModel", id="not-a-model"),
]


@pytest.mark.parametrize(("repo_id", "make_source", "error", "message"), BAD_INPUTS)
def test_push_refuses_bad_inputs(
    hub: HubServer,
    online: Path,
    base_dir: Path,
    tmp_path: Path,
    repo_id: str,
    make_source: Callable[[Path, Path], Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        push_to_hub(make_source(tmp_path, base_dir), repo_id, token=TOKEN_A, endpoint=hub.url)
    assert not hub.state.repos


def test_cli_push_never_leaks_the_token(
    hub: HubServer,
    online: Path,
    base_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub.utils import logging as hf_logging

    from hpr_peft.cli import push as push_cli

    local = tmp_path / "adapter"
    hpr_model(base_dir, seed=2).save_pretrained(local)
    parser = argparse.ArgumentParser()
    push_cli.add_arguments(parser)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    caplog.set_level(logging.DEBUG)
    try:
        argv = [str(local), "alice/cli-hpr", "--private", "--endpoint", hub.url]
        assert push_cli.run(parser.parse_args([*argv, "--token", TOKEN_A])) == 0
        monkeypatch.setenv("HF_TOKEN", TOKEN_A)  # the recommended way: token from the environment
        assert push_cli.run(parser.parse_args([*argv, "--revision", "v2", "--commit-message", "again"])) == 0
        monkeypatch.delenv("HF_TOKEN")
        assert push_cli.run(parser.parse_args([*argv, "--token", BAD_TOKEN])) == 2
        assert push_cli.run(parser.parse_args([*argv[:2], "--endpoint", hub.url])) == 2  # no token at all
        loaded = load_adapter(
            make_tiny_causal_lm("llama"), "alice/cli-hpr", token=TOKEN_A, endpoint=hub.url, cache_dir=online
        )
        assert loaded.peft_config["default"].peft_type == "HPR"
    finally:
        hf_logging.set_verbosity(previous)
    out, err = capfd.readouterr()
    assert "pushed" in out and "/alice/cli-hpr/commit/" in out
    assert "token was rejected" in err and "no Hugging Face token found" in err
    assert len(caplog.records) > 0  # debug logging really was captured
    for secret in (TOKEN_A, BAD_TOKEN):
        assert secret not in out and secret not in err and secret not in caplog.text
    users = {user for method, _path, user in hub.state.requests if method == "POST"}
    assert "alice" in users  # the token was used, it just never shows
    assert len(hub.commits("alice/cli-hpr", "v2")) == len(hub.commits("alice/cli-hpr")) + 1
