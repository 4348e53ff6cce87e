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


@pytest.mark.slow
def test_the_bundled_smollm2_is_a_plain_trainable_model_named_by_its_hub_id(smollm2):
    from transformers.trainer_utils import validate_quantization_for_training

    model, _ = smollm2
    assert model.name_or_path == model.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    source = bundled_models.weights_source(model)
    assert source["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and source["quantisation"] == "Q4_1"
    assert source["gguf_file"].endswith(".gguf") and source["dequantised_to"] == "float32"
    assert not model.is_quantized and model.hf_quantizer is None  # dequantised: plain float32 weights
    assert not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(model)  # what Trainer checks first: no "GGUF cannot train"
