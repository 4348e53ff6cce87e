"""Hub push/load of HPR adapters over real HTTP against tests/support/hub_server.py (no internet).

Pushing and error paths run in this process with ``endpoint=`` (and huggingface_hub's offline switch,
set by conftest, turned off for the test). Loading by repo id through peft's own loaders needs
``HF_ENDPOINT``, which huggingface_hub reads at import time, so those round trips run in subprocesses
with a fresh HF_HOME, then again with HF_HUB_OFFLINE=1 from the cache they filled.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from hpr_peft import HPRConfig
from hpr_peft.hub import HubAccessError, load_adapter, push_to_hub, render_model_card
from support import REPO_ROOT
from support.hub_server import HubServer
from support.models import make_tiny_causal_lm

TOKEN_A = "hf_aliceSECRETtoken0123456789abcdef"
TOKEN_B = "hf_bobSECRETtoken9876543210fedcba"
BAD_TOKEN = "hf_notARealTokenXXXXXXXXXXXXXXXX"

FIT_RESULTS = {
    "selected_layers": [1],
    "per_layer": {
        "0": {"probe_accuracy": 0.71, "angle_mse": 0.012},
        "1": {"probe_accuracy": 0.83, "angle_mse": 0.009},
    },
    "eval_results": {"truthfulqa_mc1": 0.3125, "truthfulqa_mc2": 0.4871},
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def hub():
    with HubServer() as server:
        server.add_user("alice", TOKEN_A)
        server.add_user("bob", TOKEN_B)
        yield server


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Let this process talk to the local hub: offline switch off, no ambient token. Returns a cache dir."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"), raising=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "cache"


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A tiny base model saved to disk, so base_model_name_or_path is resolvable by AutoPeft / load_adapter."""
    path = tmp_path / "base"
    make_tiny_causal_lm("llama").save_pretrained(path)
    return path


def _hpr_model(base_dir: Path, seed: int, **config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, HPRConfig(target_layers=[0, 1], init_weights=False, **config))
    return model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _card_metadata(readme: str) -> tuple[dict, str]:
    assert readme.startswith("---\n")
    front, body = readme[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


# ------------------------------------------------------------------------------------------------ card
def test_model_card_metadata_and_body() -> None:
    config = HPRConfig(
        target_layers=[3, 5, 7], selected_layers=[5, 7], alpha=1.5, fit_results=FIT_RESULTS
    ).to_dict()
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = render_model_card(config, "me/smollm2-truthful-hpr")
    meta, body = _card_metadata(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == [
        "hpr",
        "activation-editing",
        "peft",
        "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct",
    ]
    usage = body[body.index("## Usage") :]
    assert usage.index("import hpr_peft") < usage.index("PeftModel.from_pretrained")
    assert 'PeftModel.from_pretrained(base, "me/smollm2-truthful-hpr")' in usage
    assert 'load_adapter(None, "me/smollm2-truthful-hpr")' in usage
    assert "KeyError: 'HPR'" in body
    assert "| edited layers | [5, 7] |" in body and "| target layers (have weights) | [3, 5, 7] |" in body
    assert "| alpha (strength) | 1.5 |" in body
    assert "## Fit metrics" in body and "| 1 | 0.83 | 0.009 |" in body  # per-layer table
    assert "## Evaluation" in body and "| truthfulqa_mc1 | 0.3125 |" in body
    assert "arXiv:2409.10053" in body and "@inproceedings{pham-nguyen-2024-householder" in body
    assert "Pham, Van-Cuong and Nguyen, Thien Huu" in body and "EMNLP" in body

    # unknown base model or a local path: no base_model metadata, no adapter tag, no broken YAML
    for base in (None, "/tmp/some/local/base"):
        config["base_model_name_or_path"] = base
        meta, body = _card_metadata(render_model_card(config, "me/x"))
        assert "base_model" not in meta and all("base_model" not in tag for tag in meta["tags"])
        assert meta["library_name"] == "peft"
    assert "/tmp/some/local/base" in body and "not a Hub id" in body
    # no fit results: no metric sections
    plain = HPRConfig(target_layers=[0]).to_dict()
    _, body = _card_metadata(render_model_card(plain))
    assert "## Fit metrics" not in body and "## Evaluation" not in body and "<this-repo-id>" in body


# ------------------------------------------------------------------------------------------------ server
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


# ------------------------------------------------------------------------------------------------ push
def test_push_uploads_adapter_and_card_in_one_commit(
    hub: HubServer, online: Path, base_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    model = _hpr_model(base_dir, seed=1, fit_results=FIT_RESULTS)
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
    meta, body = _card_metadata(files["README.md"].decode())
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
    meta, body = _card_metadata(dev["README.md"].decode())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    assert "| mc1 | 0.25 |" in body and "**side_effects**" in body and "| kl | 0.0123 |" in body


def test_push_errors_are_clear(hub: HubServer, online: Path, base_dir: Path, tmp_path: Path) -> None:
    model = _hpr_model(base_dir, seed=1)
    with pytest.raises(HubAccessError, match=r"no Hugging Face token found.*HF_TOKEN.*hf auth login"):
        push_to_hub(model, "alice/x", endpoint=hub.url)
    with pytest.raises(HubAccessError, match=r"token was rejected \(401.*settings/tokens") as bad:
        push_to_hub(model, "alice/x", token=BAD_TOKEN, endpoint=hub.url)
    assert BAD_TOKEN not in str(bad.value)
    with pytest.raises(
        HubAccessError, match=r"permission denied \(403\) for namespace 'bob'.*namespace you own"
    ):
        push_to_hub(model, "bob/x", token=TOKEN_A, endpoint=hub.url)
    with pytest.raises(HubAccessError, match=r"does not exist"):
        push_to_hub(model, "alice/missing", token=TOKEN_A, endpoint=hub.url, create_repo=False)
    assert "alice/x" not in hub.state.repos and "bob/x" not in hub.state.repos
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(HubAccessError, match=r"could not reach the Hub at http://127.0.0.1:\d+.*HF_ENDPOINT"):
        push_to_hub(model, "alice/x", token=TOKEN_A, endpoint=closed)
    import huggingface_hub.constants as constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(HubAccessError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
            push_to_hub(model, "alice/x", token=TOKEN_A, endpoint=hub.url)

    with pytest.raises(ValueError, match="repo id"):
        push_to_hub(model, "not a repo id", token=TOKEN_A, endpoint=hub.url)
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(lora_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not 'HPR'"):
        push_to_hub(lora_dir, "alice/x", token=TOKEN_A, endpoint=hub.url)
    (lora_dir / "adapter_model.safetensors").unlink()
    (lora_dir / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        push_to_hub(lora_dir, "alice/x", token=TOKEN_A, endpoint=hub.url)
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        push_to_hub(tmp_path, "alice/x", token=TOKEN_A, endpoint=hub.url)


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
    _hpr_model(base_dir, seed=2).save_pretrained(local)
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
        assert push_cli.run(parser.parse_args([*argv, "--token", BAD_TOKEN])) == 1
        assert push_cli.run(parser.parse_args([*argv[:2], "--endpoint", hub.url])) == 1  # no token at all
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


# ------------------------------------------------------------------------------------------------ load errors / safety
class _Marker:
    """Unpickling this creates a file: proof that a loader unpickled something."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (io.open, (self.path, "w"))


def test_load_errors_and_pickle_refusal(hub: HubServer, online: Path, base_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    model = _hpr_model(base_dir, seed=3)
    push_to_hub(model, "alice/private-hpr", token=TOKEN_A, private=True, endpoint=hub.url)
    base = make_tiny_causal_lm("llama")
    kwargs = dict(endpoint=hub.url, cache_dir=online)
    # a second adapter added to an existing PeftModel keeps its own weights
    local = tmp_path / "local"
    model.save_pretrained(local)
    both = load_adapter(_hpr_model(base_dir, seed=4), local, adapter_name="second")
    assert set(both.peft_config) == {"default", "second"}
    expected = {k.replace(".default", ".second"): v for k, v in model.state_dict().items() if ".hpr_" in k}
    assert all(torch.equal(both.state_dict()[k], v) for k, v in expected.items()) and expected
    with pytest.raises(HubAccessError, match=r"private and no token was sent.*token="):
        load_adapter(base, "alice/private-hpr", **kwargs)
    with pytest.raises(HubAccessError, match=r"private and this token has no access"):
        load_adapter(base, "alice/private-hpr", token=TOKEN_B, **kwargs)
    with pytest.raises(HubAccessError, match=r"token was rejected"):
        load_adapter(base, "alice/private-hpr", token=BAD_TOKEN, **kwargs)
    with pytest.raises(HubAccessError, match=r"revision 'no-such-branch' does not exist"):
        load_adapter(base, "alice/private-hpr", token=TOKEN_A, revision="no-such-branch", **kwargs)
    with pytest.raises(HubAccessError, match=r"not in the local cache"):
        load_adapter(base, "alice/never-downloaded", local_files_only=True, **kwargs)
    with pytest.raises(FileNotFoundError, match="neither an existing adapter directory nor a Hub repo id"):
        load_adapter(base, str(tmp_path / "no" / "such" / "dir"), **kwargs)

    # a pickle-only adapter, locally and on the hub: refused, and never unpickled
    marker = tmp_path / "UNPICKLED"
    pickle_bytes = pickle.dumps({"base_model.model.x": _Marker(str(marker))})
    config = json.dumps(HPRConfig(target_layers=[0, 1]).to_dict())
    bad_dir = tmp_path / "pickle_adapter"
    bad_dir.mkdir()
    (bad_dir / "adapter_config.json").write_text(config)
    (bad_dir / "adapter_model.bin").write_bytes(pickle_bytes)
    with pytest.raises(ValueError, match=r"only a pickle weights file.*never unpickles"):
        load_adapter(base, bad_dir)
    HfApi(endpoint=hub.url, token=TOKEN_A).create_repo("alice/pickled")
    HfApi(endpoint=hub.url, token=TOKEN_A).create_commit(
        "alice/pickled",
        [
            CommitOperationAdd("adapter_config.json", config.encode()),
            CommitOperationAdd("adapter_model.bin", pickle_bytes),
        ],
        commit_message="pickle only",
    )
    with pytest.raises(ValueError, match=r"Hub repo 'alice/pickled' has only a pickle"):
        load_adapter(base, "alice/pickled", **kwargs)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ round trips
_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    args = json.loads(sys.argv[1])
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from peft import AutoPeftModelForCausalLM, PeftModel

    timings = {"imports": round(time.perf_counter() - start, 1)}
    ref = load_file(args["ref"])
    ids, repo, tok, c1 = ref["input_ids"], args["repo"], args["token"], args["c1"]
    out = {}

    def base():
        return AutoModelForCausalLM.from_pretrained(args["base"])

    def check(name, model, key):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out[name] = bool(torch.equal(logits, ref[key]))
        timings[name] = round(time.perf_counter() - start, 1)

    if args["mode"] == "online":
        assert "hpr_peft" not in sys.modules
        try:
            PeftModel.from_pretrained(base(), repo, token=tok)
            out["unregistered"] = "loaded"
        except KeyError as err:
            out["unregistered"] = "KeyError " + str(err)
        assert "hpr_peft" not in sys.modules
        from hpr_peft.hub import AutoHPRModelForCausalLM, load_adapter  # no separate `import hpr_peft`

        check("load_adapter", load_adapter(None, repo, token=tok), "v2")
        check("load_adapter_rev", load_adapter(base(), repo, token=tok, revision=c1), "v1")
        check("auto_hpr", AutoHPRModelForCausalLM.from_pretrained(repo, token=tok), "v2")
    else:
        import hpr_peft  # the documented way
        from hpr_peft import load_adapter

        check("load_adapter", load_adapter(None, repo), "v2")
        check("load_adapter_rev", load_adapter(None, repo, revision=c1), "v1")
    check("peft", PeftModel.from_pretrained(base(), repo, token=tok), "v2")
    check("peft_rev", PeftModel.from_pretrained(base(), repo, token=tok, revision=c1), "v1")
    check("auto_peft", AutoPeftModelForCausalLM.from_pretrained(repo, token=tok), "v2")
    check("auto_peft_rev", AutoPeftModelForCausalLM.from_pretrained(repo, token=tok, revision=c1), "v1")
    print("TIMINGS " + json.dumps(timings), file=sys.stderr)
    print("RESULT " + json.dumps(out))
    """
)


def _run_client(hub: HubServer, home: Path, args: dict, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full_env.update(hub.env(home, **env))
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT, json.dumps(args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(home),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for secret in (TOKEN_A, TOKEN_B):
        assert secret not in proc.stdout and secret not in proc.stderr
    print(*[line for line in proc.stderr.splitlines() if line.startswith("TIMINGS")])
    return json.loads(lines[-1][len("RESULT ") :])


def test_round_trip_by_repo_id_revisions_and_offline_cache(
    hub: HubServer, online: Path, base_dir: Path, tmp_path: Path
) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    v1 = _hpr_model(base_dir, seed=11)
    v2 = _hpr_model(base_dir, seed=12)
    ref = {"input_ids": ids, "v1": _logits(v1, ids), "v2": _logits(v2, ids)}
    with v1.disable_adapter():
        unedited = _logits(v1, ids)
    assert not torch.equal(ref["v1"], ref["v2"]) and not torch.equal(ref["v1"], unedited)  # edits are visible
    save_file(ref, str(tmp_path / "ref.safetensors"))

    c1 = push_to_hub(v1, "alice/roundtrip", token=TOKEN_A, private=True, endpoint=hub.url).oid
    c2 = push_to_hub(v2, "alice/roundtrip", token=TOKEN_A, endpoint=hub.url).oid
    assert c1 != c2 and hub.commits("alice/roundtrip")[:2] == [c2, c1]
    args = {
        "ref": str(tmp_path / "ref.safetensors"),
        "repo": "alice/roundtrip",
        "token": TOKEN_A,
        "c1": c1,
        "base": str(base_dir),
        "mode": "online",
    }
    home = tmp_path / "hf_home"  # fresh cache
    home.mkdir()
    online_results = _run_client(hub, home, args)
    assert online_results.pop("unregistered") == "KeyError 'HPR'"
    assert online_results == dict.fromkeys(
        ["load_adapter", "load_adapter_rev", "auto_hpr", "peft", "peft_rev", "auto_peft", "auto_peft_rev"],
        True,
    )
    served = len(hub.state.requests)
    offline_results = _run_client(hub, home, {**args, "mode": "offline"}, HF_HUB_OFFLINE="1")
    assert offline_results == dict.fromkeys(
        ["load_adapter", "load_adapter_rev", "peft", "peft_rev", "auto_peft", "auto_peft_rev"], True
    )
    assert len(hub.state.requests) == served, "offline loads must not touch the server"
