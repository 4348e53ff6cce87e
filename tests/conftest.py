"""Shared fixtures: tiny random models of several architectures, the bundled SmolLM2, TruthfulQA, a
local Hub server and this process switched online to talk to it.

The factories themselves live in ``tests/support`` (importable as ``support.*``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from support.hub_adapters import TOKEN_A, TOKEN_B
from support.hub_server import HubServer
from support.models import make_char_tokenizer, make_tiny_causal_lm

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_TRUTHFULQA = REPO_ROOT.parent / "shared" / "data" / "truthfulqa"
# The library reads TruthfulQA only from an explicit folder or $HPR_TRUTHFULQA_DIR; the tests (and the
# subprocesses they start) use this checkout's shared copy unless the variable says otherwise.
if (SHARED_TRUTHFULQA / "mc_task.json").is_file():
    os.environ.setdefault("HPR_TRUTHFULQA_DIR", str(SHARED_TRUTHFULQA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are dominated by thread start-up/sync cost: one intra-op thread makes the suite
# several times faster on 2 cores and keeps CPU results deterministic.
# Subprocesses (Hub round trips, 2-process fits) inherit this, so results compare bit for bit.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def tiny_llama():
    return make_tiny_causal_lm("llama")


@pytest.fixture(scope="session")
def truthfulqa_dir() -> Path:
    path = Path(os.environ.get("HPR_TRUTHFULQA_DIR", SHARED_TRUTHFULQA))
    if not (path / "mc_task.json").is_file():
        pytest.fail(f"TruthfulQA not found at {path}; set HPR_TRUTHFULQA_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, loaded once per test session."""
    from hpr_peft.runtime.bundled_models import load_bundled

    return load_bundled("smollm2")


@pytest.fixture
def char_tokenizer():
    """Character-level fast tokenizer matching the tiny models' vocab (128)."""
    return make_char_tokenizer()


@pytest.fixture
def hub():
    """A fresh local Hub with users alice (TOKEN_A) and bob (TOKEN_B)."""
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
