"""Additive mean-difference steering (ITI / CAA style), the baseline every HPR result is compared with.

Per layer ``v = mean(positive activations) − mean(negative activations)`` from the *same* fitting
activations HPR trains on (:class:`hpr_peft.fitting.activations.PairActivations`), and the edit adds ``α·v`` to
the output of the same decoder blocks. With ``normalize=True`` the vector is ``v̂ · std(x·v̂)`` (unit
direction scaled by the standard deviation of all fitting activations projected on it, as ITI does), so
one ``α`` means a comparable push on every layer. The hooks (:func:`additive_steering`, defined in
:mod:`hpr_peft.runtime.steering` and re-exported here) leave padding and the first real token of each
sequence (the attention sink) unedited, like HPR. :func:`hpr_peft.fitting.fit_preference_vectors`
trains such vectors on the preference objective, the same training HPR's editors can get.

>>> vectors = mean_difference_vectors(acts, layers=[10, 14, 18])
>>> with additive_steering(model, vectors, alpha=4.0):
...     model(**batch)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpr_peft.runtime.steering import additive_steering

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
