"""Additive mean-difference steering (ITI / CAA style), the baseline every HPR result is compared with.

Per layer ``v = mean(positive activations) − mean(negative activations)`` from the *same* fitting
activations HPR trains on (:class:`hpr_peft.fitting.activations.PairActivations`), and the edit adds ``α·v`` to
the output of the same decoder blocks. With ``normalize=True`` the vector is ``v̂ · std(x·v̂)`` (unit
direction scaled by the standard deviation of all fitting activations projected on it, as ITI does), so
one ``α`` means a comparable push on every layer. Like HPR, padding and the first real token of each
sequence (the attention sink) are never edited.

>>> vectors = mean_difference_vectors(acts, layers=[10, 14, 18])
>>> with additive_steering(model, vectors, alpha=4.0):
...     model(**batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.blocks import find_decoder_stack
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.positions import PositionTracker

__all__ = ["additive_steering", "mean_difference_vectors"]


def mean_difference_vectors(
    activations: Any,
    layers: Sequence[int] | None = None,
    normalize: bool = False,
) -> dict[int, torch.Tensor]:
    """``{layer: v}`` with ``v = mean(pos) − mean(neg)`` (float32) from fitting activations.

    ``activations`` is a :class:`~hpr_peft.fitting.activations.PairActivations` or a mapping
    ``{layer: (positives, negatives)}`` of ``(n, d)`` tensors. ``normalize`` rescales each ``v`` to unit
    norm × the standard deviation of the projections of all (positive and negative) rows onto it.
    """
    if hasattr(activations, "pair_tensors"):
        available = list(activations.layers)
        get = activations.pair_tensors
    elif isinstance(activations, dict):
        available = sorted(activations)
        get = activations.__getitem__
    else:
        raise TypeError(
            "activations must be a PairActivations (hpr_peft.fitting.activations.collect_activations) or a dict "
            f"{{layer: (positives, negatives)}}, got {type(activations).__name__}."
        )
    layers = available if layers is None else [int(x) for x in layers]
    missing = [x for x in layers if x not in available]
    if missing:
        raise ValueError(f"layers {missing} have no activations; available layers: {available}.")
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        pos, neg = get(layer)
        pos, neg = pos.float(), neg.float()
        if pos.dim() != 2 or pos.shape[-1] != neg.shape[-1] or len(pos) == 0 or len(neg) == 0:
            raise ValueError(
                f"layer {layer}: positives {tuple(pos.shape)} / negatives {tuple(neg.shape)} must be "
                "non-empty (n, d) tensors of the same width."
            )
        v = pos.mean(0) - neg.mean(0)
        if normalize:
            norm = v.norm()
            if norm == 0:
                raise ValueError(f"layer {layer}: the mean difference is zero; it cannot be normalised.")
            unit = v / norm
            projections = torch.cat([pos, neg]) @ unit
            v = unit * projections.std()
        out[layer] = v
    return out


@contextlib.contextmanager
def additive_steering(
    model: nn.Module,
    vectors: dict[int, torch.Tensor],
    alpha: float = 1.0,
    skip_sequence_start: bool = True,
) -> Iterator[None]:
    """Add ``alpha * vectors[layer]`` to the output of decoder block ``layer`` while inside.

    ``model`` is the module that will be called (a causal LM, or a PEFT model around one): a position
    tracker on it tells the hooks which positions are padding and which is the first real token of each
    sequence (both left unedited when ``skip_sequence_start``; padding always). Cached and uncached
    forwards agree, as for HPR.
    """
    if not isinstance(vectors, dict) or not vectors:
        raise ValueError(
            "vectors must be a non-empty dict {layer index: (d,) tensor}: see mean_difference_vectors."
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}.")
    stack = find_decoder_stack(model)
    for layer, v in vectors.items():
        if not isinstance(layer, int) or not 0 <= layer < len(stack):
            raise ValueError(f"vectors has layer {layer!r}: decoder blocks are 0..{len(stack) - 1}.")
        if not torch.is_tensor(v) or v.dim() != 1:
            raise ValueError(
                f"vectors[{layer}] must be a 1-D tensor (d,), got {getattr(v, 'shape', type(v))}."
            )
    tracker = PositionTracker()
    with HookSet() as hooks:
        tracker.attach(model)
        try:
            for layer, v in vectors.items():
                hooks.on_block_output(
                    stack.layers[layer],
                    _adder(tracker, v.detach().float(), float(alpha), skip_sequence_start),
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
