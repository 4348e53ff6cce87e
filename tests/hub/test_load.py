"""Loading HPR adapters (hpr_peft.hub.load) by repo id or directory, from tests/support/hub_server.py.

Error paths run in this process with ``endpoint=`` (huggingface_hub's offline switch, set by conftest,
turned off by the ``online`` fixture). Loading by repo id through peft's own loaders needs
``HF_ENDPOINT``, which huggingface_hub reads at import time, so those round trips run in subprocesses
with a fresh HF_HOME, then again with HF_HUB_OFFLINE=1 from the cache they filled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hpr_peft import HPRConfig
from hpr_peft.hub import AutoHPRModelForCausalLM, HubAccessError, load_adapter, push_to_hub
from support import REPO_ROOT
from support.hub_adapters import BAD_TOKEN, TOKEN_A, TOKEN_B, hpr_model, logits
from support.hub_server import HubServer
from support.models import make_tiny_causal_lm


@pytest.fixture(scope="module")
def saved_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HPR adapter directory (read-only)."""
    path = tmp_path_factory.mktemp("load") / "adapter"
    hpr_model(base_dir, seed=3).save_pretrained(path)
    return path


def test_second_adapter_keeps_its_own_weights(base_dir: Path, tmp_path: Path) -> None:
    """An adapter added to an existing PeftModel under a new name loads its real weights."""
    model = hpr_model(base_dir, seed=3)
    local = tmp_path / "local"
    model.save_pretrained(local)
    both = load_adapter(hpr_model(base_dir, seed=4), local, adapter_name="second")
    assert set(both.peft_config) == {"default", "second"}
    expected = {k.replace(".default", ".second"): v for k, v in model.state_dict().items() if ".hpr_" in k}
    assert all(torch.equal(both.state_dict()[k], v) for k, v in expected.items()) and expected


# (source, load arguments, the error, its message); the private repo alice/private-hpr exists
LOAD_FAILURES = [
    pytest.param(
        "alice/private-hpr", {}, HubAccessError, r"private and no token was sent.*token=", id="no-token"
    ),
    pytest.param(
        "alice/private-hpr",
        {"token": TOKEN_B},
        HubAccessError,
        r"private and this token has no access",
        id="token-without-access",
    ),
    pytest.param(
        "alice/private-hpr", {"token": BAD_TOKEN}, HubAccessError, r"token was rejected", id="rejected-token"
    ),
    pytest.param(
        "alice/private-hpr",
        {"token": TOKEN_A, "revision": "no-such-branch"},
        HubAccessError,
        r"revision 'no-such-branch' does not exist",
        id="unknown-revision",
    ),
    pytest.param(
        "alice/never-downloaded",
        {"local_files_only": True},
        HubAccessError,
        r"not in the local cache",
        id="not-in-cache",
    ),
    pytest.param(
        "no/such/dir",
        {},
        FileNotFoundError,
        "neither an existing adapter directory nor a Hub repo id",
        id="neither-dir-nor-repo",
    ),
]


@pytest.mark.parametrize(("source", "arguments", "error", "message"), LOAD_FAILURES)
def test_load_failures_say_how_to_fix_them(
    hub: HubServer,
    online: Path,
    saved_adapter: Path,
    tmp_path: Path,
    source: str,
    arguments: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    push_to_hub(saved_adapter, "alice/private-hpr", token=TOKEN_A, private=True, endpoint=hub.url)
    if source == "no/such/dir":
        source = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(error, match=message) as failure:
        load_adapter(make_tiny_causal_lm("llama"), source, endpoint=hub.url, cache_dir=online, **arguments)
    assert all(secret not in str(failure.value) for secret in (TOKEN_A, TOKEN_B, BAD_TOKEN))


class _Marker:
    """Unpickling this creates a file: proof that a loader unpickled something."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (io.open, (self.path, "w"))


def _pickle_only_files(marker: Path) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps(HPRConfig(target_layers=[0, 1]).to_dict()).encode(),
        "adapter_model.bin": pickle.dumps({"base_model.model.x": _Marker(str(marker))}),
    }


@pytest.mark.parametrize("where", ["directory", "hub"])
def test_pickle_only_adapter_is_refused_never_unpickled(
    hub: HubServer, online: Path, tmp_path: Path, where: str
) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    marker = tmp_path / "UNPICKLED"
    files = _pickle_only_files(marker)
    if where == "directory":
        source = tmp_path / "pickle_adapter"
        source.mkdir()
        for name, content in files.items():
            (source / name).write_bytes(content)
        expected = r"only a pickle weights file.*never unpickles"
    else:
        api = HfApi(endpoint=hub.url, token=TOKEN_A)
        api.create_repo("alice/pickled")
        operations = [CommitOperationAdd(name, content) for name, content in files.items()]
        api.create_commit("alice/pickled", operations, commit_message="pickle only")
        source, expected = "alice/pickled", r"Hub repo 'alice/pickled' has only a pickle"
    with pytest.raises(ValueError, match=expected):
        load_adapter(make_tiny_causal_lm("llama"), source, endpoint=hub.url, cache_dir=online)
    assert not marker.exists()


def test_auto_class_is_not_instantiated() -> None:
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoHPRModelForCausalLM()


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
    v1 = hpr_model(base_dir, seed=11)
    v2 = hpr_model(base_dir, seed=12)
    ref = {"input_ids": ids, "v1": logits(v1, ids), "v2": logits(v2, ids)}
    with v1.disable_adapter():
        unedited = logits(v1, ids)
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
