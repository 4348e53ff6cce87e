"""Additive steering hooks: ``alpha * v`` added to the output of chosen decoder blocks.

The additive baseline (:mod:`hpr_peft.evaluation.baselines`) applies fixed vectors with it, and the
preference fit (:func:`hpr_peft.fitting.fit_preference_vectors`) trains vectors through it, so the
edit that is trained is the edit that is evaluated. Like HPR, padding and (by default) the first real
token of each sequence (the attention sink) are never edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.blocks import find_decoder_stack, hidden_size_of
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.positions import PositionTracker

__all__ = ["additive_steering", "check_steering_vectors"]


def check_steering_vectors(model: nn.Module, vectors: Any, check_width: bool = False) -> None:
    """Raise a ValueError naming the fix unless ``vectors`` is a non-empty ``{block index: (d,) tensor}``
    for ``model``'s decoder blocks (``check_width``: ``d`` must be the model's hidden size)."""
    if not isinstance(vectors, dict) or not vectors:
        raise ValueError(
            "vectors must be a non-empty dict {layer index: (d,) tensor}: see mean_difference_vectors."
        )
    stack = find_decoder_stack(model)
    for layer, v in vectors.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(stack):
            raise ValueError(f"vectors has layer {layer!r}: decoder blocks are 0..{len(stack) - 1}.")
        if not torch.is_tensor(v) or v.dim() != 1:
            raise ValueError(
                f"vectors[{layer}] must be a 1-D tensor (d,), got {getattr(v, 'shape', type(v))}."
            )
        if check_width and v.shape[0] != hidden_size_of(model):
            raise ValueError(
                f"vectors[{layer}] has width {v.shape[0]} but the model's hidden size is "
                f"{hidden_size_of(model)}: the vectors belong to another model."
            )


@contextlib.contextmanager
def additive_steering(
    model: nn.Module,
    vectors: dict[int, torch.Tensor],
    alpha: float = 1.0,
    skip_sequence_start: bool = True,
    *,
    differentiable: bool = False,
) -> Iterator[None]:
    """Add ``alpha * vectors[layer]`` to the output of decoder block ``layer`` while inside.

    ``model`` is the module that will be called (a causal LM, or a PEFT model around one): a position
    tracker on it tells the hooks which positions are padding and which is the first real token of each
    sequence (both left unedited when ``skip_sequence_start``; padding always). Cached and uncached
    forwards agree, as for HPR. The vectors are read at each call; with ``differentiable`` gradients
    flow to them (to train them), otherwise they are detached.
    """
    check_steering_vectors(model, vectors)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}.")
    stack = find_decoder_stack(model)
    tracker = PositionTracker()
    with HookSet() as hooks:
        tracker.attach(model)
        try:
            for layer, v in vectors.items():
                vector = v if differentiable else v.detach().float()
                hooks.on_block_output(
                    stack.layers[layer], _adder(tracker, vector, float(alpha), skip_sequence_start)
                )
            yield
        finally:
            tracker.detach()


def _adder(tracker: PositionTracker, vector: torch.Tensor, alpha: float, skip_sequence_start: bool):
    """The block-output hook adding ``alpha * vector`` at the editable positions of the call."""

    def add(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != vector.shape[0]:
            raise ValueError(
                f"steering vector has width {vector.shape[0]} but the block outputs {hidden.shape[-1]}."
            )
        ctx = tracker.context_for(hidden)
        mask = ctx.valid & ~ctx.sequence_start if skip_sequence_start else ctx.valid
        delta = (alpha * vector).to(device=hidden.device, dtype=hidden.dtype)
        return hidden + mask.unsqueeze(-1).to(hidden.dtype) * delta

    return add
