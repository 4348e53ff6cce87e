"""Structural discovery of the decoder blocks of any transformers causal LM.

HPR edits the residual stream at the output of whole decoder blocks. PEFT's generic
``layers_to_transform`` regex cannot select whole blocks (it needs a dot after the index),
so matching is ours: the decoder stack is the ``nn.ModuleList`` of identical blocks whose
length equals the model's ``num_hidden_layers``. This works for Llama, Mistral, Qwen2,
Gemma, Phi-3 (``model.layers``), GPT-2 (``transformer.h``), GPT-NeoX (``gpt_neox.layers``),
OPT (``model.decoder.layers``) and anything shaped like them, without a per-model table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


@dataclass(frozen=True)
class DecoderStack:
    """Where the decoder blocks of a model live.

    ``prefix`` is the dotted module path of the ModuleList (e.g. ``"model.layers"``), so block
    ``i`` is the module named ``f"{prefix}.{i}"``.
    """

    prefix: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def name_of(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def _text_config(config: Any) -> Any:
    """The text sub-config of multimodal configs, else the config itself."""
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            return config
    return config


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    text_config = _text_config(config)
    for key in keys:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model`` (from the discovered stack)."""
    return len(find_decoder_stack(model))


def hidden_size_of(model: nn.Module) -> int:
    """Width ``d`` of the residual stream of ``model``.

    Read from the config when it says so, else from the input embedding matrix.
    """
    config = getattr(model, "config", None)
    if config is not None:
        size = _config_int(config, _HIDDEN_SIZE_KEYS)
        if size is not None:
            return size
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        embeddings = get_input_embeddings()
        if embeddings is not None and hasattr(embeddings, "embedding_dim"):
            return int(embeddings.embedding_dim)
    raise ValueError(
        f"Cannot tell the hidden size of {type(model).__name__}: its config has none of "
        f"{list(_HIDDEN_SIZE_KEYS)} and it has no input embeddings. Pass a transformers causal LM."
    )


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """Find the ModuleList of decoder blocks of ``model`` by structure.

    Candidates are ModuleLists whose children all share one class. When the config states a
    layer count, only lists of exactly that length qualify; among qualifying lists the one with
    the most parameters wins (it is the decoder, not e.g. a list of small heads).
    """
    config = getattr(model, "config", None)
    expected = _config_int(config, _LAYER_COUNT_KEYS) if config is not None else None

    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        # A PEFT-wrapped block is an HPRLayer around the block: look through base_layer.
        classes = {type(getattr(child, "base_layer", child)) for child in module}
        if len(classes) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        candidates.append((n_params, name, module))

    if not candidates:
        hint = f" with {expected} blocks (config num_hidden_layers)" if expected is not None else ""
        raise ValueError(
            f"Cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of identical "
            f"blocks{hint}. HPR needs a transformers decoder-only causal LM (Llama, Mistral, Qwen2, "
            "Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, ...)."
        )
    candidates.sort(key=lambda item: item[0], reverse=True)
    _, name, layers = candidates[0]
    return DecoderStack(prefix=name, layers=layers)


_INDEX_AT_END = re.compile(r"\.(\d+)$")


def decoder_layer_index(stack: DecoderStack, module_name: str) -> int | None:
    """The block index if ``module_name`` names a decoder block of ``stack``, else None.

    PEFT passes names relative to the model it wraps, which may carry extra leading prefixes
    (``base_model.model.``); matching is on the suffix.
    """
    match = _INDEX_AT_END.search(module_name)
    if match is None:
        return None
    head = module_name[: match.start()]
    if head == stack.prefix or head.endswith("." + stack.prefix):
        index = int(match.group(1))
        return index if index < len(stack) else None
    return None


def split_block_output(output: Any) -> tuple[torch.Tensor, tuple[Any, ...] | None]:
    """Separate the hidden state from whatever else a decoder block returned.

    transformers 5 blocks return a plain tensor; older ones (and some remote code) a tuple
    whose first element is the hidden state. Returns ``(hidden, rest)`` with ``rest=None`` for
    the plain-tensor form.
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], tuple(output[1:])
    raise TypeError(
        f"Unexpected decoder block output of type {type(output).__name__}: expected a tensor or a "
        "tuple starting with the hidden state."
    )


def join_block_output(hidden: torch.Tensor, rest: tuple[Any, ...] | None) -> Any:
    """Inverse of :func:`split_block_output`."""
    if rest is None:
        return hidden
    return (hidden, *rest)
