"""Sharing adapters: atomic saves, the model card, push to and load from the Hugging Face Hub."""

from hpr_peft.hub.sharing import (
    AutoHPRModelForCausalLM,
    HubAccessError,
    load_adapter,
    push_to_hub,
    render_model_card,
)

__all__ = [
    "AutoHPRModelForCausalLM",
    "HubAccessError",
    "load_adapter",
    "push_to_hub",
    "render_model_card",
]
