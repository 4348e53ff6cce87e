"""hpr_peft.runtime.bundled_models.load_model: bundled short names, Hub ids and folders."""

from __future__ import annotations

import pytest

from hpr_peft.runtime import bundled_models


@pytest.mark.parametrize(
    ("name", "loader"),
    [
        ("smollm2", "load_bundled"),
        ("gemma3", "load_bundled"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "load_causal_lm"),
        ("/models/my-local-llama", "load_causal_lm"),
    ],
)
def test_load_model_dispatches_by_name(monkeypatch, name, loader):
    calls = []
    for attribute in ("load_bundled", "load_causal_lm"):
        monkeypatch.setattr(
            bundled_models,
            attribute,
            lambda n, _a=attribute, **options: calls.append((_a, n, options)) or ("model", "tok"),
        )
    assert bundled_models.load_model(name) == ("model", "tok")
    assert calls == [(loader, name, {"progress": True})]
    assert bundled_models.load_model(name, progress=False) == ("model", "tok")
    assert calls[-1] == (loader, name, {"progress": False})
