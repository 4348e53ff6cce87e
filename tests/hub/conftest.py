"""Fixtures of the Hub tests: a local Hub server, this process switched online, a tiny base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.hub_adapters import TOKEN_A, TOKEN_B
from support.hub_server import HubServer
from support.models import make_tiny_causal_lm


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


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base model saved to disk, so base_model_name_or_path is resolvable by AutoPeft / load_adapter.

    Read-only: every test loads its own copy of the model from it.
    """
    path = tmp_path_factory.mktemp("hub") / "base"
    make_tiny_causal_lm("llama").save_pretrained(path)
    return path
