"""Fixtures of the Hub tests: a tiny base model (the local Hub server and ``online`` are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.models import make_tiny_causal_lm


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base model saved to disk, so base_model_name_or_path is resolvable by AutoPeft / load_adapter.

    Read-only: every test loads its own copy of the model from it.
    """
    path = tmp_path_factory.mktemp("hub") / "base"
    make_tiny_causal_lm("llama").save_pretrained(path)
    return path
