"""The model card of an HPR adapter (hpr_peft.hub.card): PEFT metadata, usage, settings, metrics, citation."""

from __future__ import annotations

import pytest

from hpr_peft import HPRConfig
from hpr_peft.hub import render_model_card
from support.hub_adapters import FIT_RESULTS, card_metadata

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _fitted_config(base: str | None) -> dict:
    config = HPRConfig(
        target_layers=[3, 5, 7], selected_layers=[5, 7], alpha=1.5, fit_results=FIT_RESULTS
    ).to_dict()
    config["base_model_name_or_path"] = base
    return config


def test_model_card_metadata_and_body() -> None:
    card = render_model_card(_fitted_config(SMOLLM2), "me/smollm2-truthful-hpr")
    meta, body = card_metadata(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == SMOLLM2
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["hpr", "activation-editing", "peft", f"base_model:adapter:{SMOLLM2}"]
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


@pytest.mark.parametrize(
    ("base", "named_in_body"),
    [
        pytest.param(None, "not recorded in `adapter_config.json`", id="unknown"),
        pytest.param("/tmp/some/local/base", "`/tmp/some/local/base` (a local path", id="local-path"),
    ],
)
def test_card_without_hub_base_model(base: str | None, named_in_body: str) -> None:
    """An unknown base model or a local path: no base_model metadata, no adapter tag, no broken YAML."""
    meta, body = card_metadata(render_model_card(_fitted_config(base), "me/x"))
    assert "base_model" not in meta and all("base_model" not in tag for tag in meta["tags"])
    assert meta["library_name"] == "peft"
    assert named_in_body in body
    if base is not None:
        assert base in body and "not a Hub id" in body


def test_base_model_argument_overrides_the_config() -> None:
    meta, body = card_metadata(render_model_card(_fitted_config("/tmp/local"), "me/x", base_model=SMOLLM2))
    assert meta["base_model"] == SMOLLM2
    assert f'AutoModelForCausalLM.from_pretrained("{SMOLLM2}")' in body


def test_card_without_fit_results_has_no_metric_sections() -> None:
    _, body = card_metadata(render_model_card(HPRConfig(target_layers=[0]).to_dict()))
    assert "## Fit metrics" not in body and "## Evaluation" not in body and "<this-repo-id>" in body


def test_eval_results_argument_and_nested_metrics() -> None:
    """Given eval results win over fit_results'; nested mappings become titled, flattened tables."""
    evaluation = {"mc1": 0.25, "side_effects": {"kl": 0.0123, "ppl": {"base": 12.5}}}
    _, body = card_metadata(render_model_card(_fitted_config(None), eval_results=evaluation))
    section = body[body.index("## Evaluation") : body.index("## Citation")]
    assert "| mc1 | 0.25 |" in section and "**side_effects**" in section
    assert "| kl | 0.0123 |" in section and "| ppl.base | 12.5 |" in section
    assert "truthfulqa_mc1" not in section
