"""Helpers shared by the tuner tests (tests/tuner)."""

from __future__ import annotations

import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from support.models import make_tiny_causal_lm


def random_hpr_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    """(peft_model, base_logits_fn): a tiny model with random editors that really edit."""
    base = make_tiny_causal_lm(arch)
    config_kwargs.setdefault("target_layers", [1, 2])
    config_kwargs.setdefault("init_weights", False)
    torch.manual_seed(seed)
    model = get_peft_model(base, HPRConfig(**config_kwargs))
    model.eval()
    return model


def token_ids(batch: int = 2, seq: int = 12, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


@torch.no_grad()
def edited_fraction(model, input_ids: torch.Tensor, layer: int, attention_mask=None) -> float:
    """Fraction of real tokens whose output of block ``layer`` differs from the base model's.

    Measured independently of the editor code (output_hidden_states with and without the adapter);
    hidden_states[layer + 1] is the output of block ``layer``.
    """
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
    edited = model(input_ids, output_hidden_states=True, **kwargs).hidden_states[layer + 1]
    with model.disable_adapter():
        plain = model(input_ids, output_hidden_states=True, **kwargs).hidden_states[layer + 1]
    changed = (edited != plain).any(dim=-1)
    valid = torch.ones_like(changed) if attention_mask is None else attention_mask.bool()
    return float(changed[valid].float().mean())
