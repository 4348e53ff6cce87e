"""Tokens, fit results and tiny HPR adapters shared by the Hub tests (tests/hub)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from hpr_peft import HPRConfig

TOKEN_A = "hf_aliceSECRETtoken0123456789abcdef"
TOKEN_B = "hf_bobSECRETtoken9876543210fedcba"
BAD_TOKEN = "hf_notARealTokenXXXXXXXXXXXXXXXX"
SECRETS = (TOKEN_A, TOKEN_B, BAD_TOKEN)

FIT_RESULTS = {
    "selected_layers": [1],
    "per_layer": {
        "0": {"probe_accuracy": 0.71, "angle_mse": 0.012},
        "1": {"probe_accuracy": 0.83, "angle_mse": 0.009},
    },
    "eval_results": {"truthfulqa_mc1": 0.3125, "truthfulqa_mc2": 0.4871},
}


def hpr_model(base_dir: Path, seed: int, **config):
    """A PeftModel with random (really editing) HPR editors on layers 0 and 1 of the base in ``base_dir``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, HPRConfig(target_layers=[0, 1], init_weights=False, **config))
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def card_metadata(readme: str) -> tuple[dict, str]:
    """(YAML metadata, body) of a model card."""
    assert readme.startswith("---\n")
    front, body = readme[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body
