"""Sharing adapters: atomic saves, the model card, push to and load from the Hugging Face Hub.

- :mod:`~hpr_peft.hub.adapter_files`: the files of a saved adapter and the checks on them (safetensors only).
- :mod:`~hpr_peft.hub.saving`: :func:`save_adapter_atomic`.
- :mod:`~hpr_peft.hub.card`: :func:`render_model_card` (PEFT metadata, usage, settings, metrics, citation).
- :mod:`~hpr_peft.hub.push`: :func:`push_to_hub`, one commit with the adapter and its card.
- :mod:`~hpr_peft.hub.shareable`: :func:`save_shareable_adapter`, a fit's adapter with HPR's card and a
  resolvable base model, optionally only the editors that edit.
- :mod:`~hpr_peft.hub.load`: :func:`load_adapter` / :class:`AutoHPRModelForCausalLM` by repo id or directory.
- :mod:`~hpr_peft.hub.errors`: :class:`HubAccessError`, Hub failures explained with their fix.
- :mod:`~hpr_peft.hub.repo_ids`: telling a Hub repo id from a local path.
"""

from hpr_peft.hub.card import render_model_card
from hpr_peft.hub.errors import HubAccessError
from hpr_peft.hub.load import AutoHPRModelForCausalLM, load_adapter
from hpr_peft.hub.push import DEFAULT_COMMIT_MESSAGE, push_to_hub
from hpr_peft.hub.saving import save_adapter_atomic
from hpr_peft.hub.shareable import save_shareable_adapter

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "AutoHPRModelForCausalLM",
    "HubAccessError",
    "load_adapter",
    "push_to_hub",
    "render_model_card",
    "save_adapter_atomic",
    "save_shareable_adapter",
]
