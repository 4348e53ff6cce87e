"""Choosing the layers that edit, from per-layer fit results or a user's layer scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from hpr_peft.fitting.report import LayerFitResult

__all__ = ["check_selection", "rank_layers", "select_layers"]


def check_selection(top_k: Any, min_accuracy: Any) -> tuple[int | None, float | None]:
    """``(top_k, min_accuracy)`` checked (before any collection or training): ``top_k`` a positive int
    (not a bool) or None, ``min_accuracy`` a probe accuracy in [0, 1] or None."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(
            f"top_k must be a positive int (the number of editing layers) or None, got {top_k!r}."
        )
    if min_accuracy is not None and (
        isinstance(min_accuracy, bool)
        or not isinstance(min_accuracy, Real)
        or not 0.0 <= float(min_accuracy) <= 1.0
    ):
        raise ValueError(
            f"min_accuracy must be a probe accuracy between 0 and 1 (e.g. 0.7) or None, got {min_accuracy!r}."
        )
    return (None if top_k is None else int(top_k)), (None if min_accuracy is None else float(min_accuracy))


def rank_layers(results: Sequence[LayerFitResult], scores: dict[int, float] | None = None) -> list[int]:
    """Fitted layers best first: by ``scores`` (higher is better) when given, else by validation probe
    accuracy (training accuracy without validation data); ties break toward the lower layer index."""

    def key(r: LayerFitResult) -> tuple[float, int]:
        value = scores[r.layer] if scores is not None else r.selection_accuracy
        return (-(value if value is not None and math.isfinite(value) else -math.inf), r.layer)

    return [r.layer for r in sorted(results, key=key)]


def select_layers(
    results: Sequence[LayerFitResult],
    top_k: int | None = 5,
    min_accuracy: float | None = None,
    scores: dict[int, float] | None = None,
) -> tuple[list[int], str]:
    """Choose the editing layers; returns ``(sorted layers, description)``.

    With ``scores`` (a user scorer's values, higher is better) layers are ranked by score, else by
    validation probe accuracy (training accuracy without validation data). ``min_accuracy`` keeps
    layers whose probe accuracy reaches it; ``top_k`` then keeps the best ``k``. Ties break toward
    the lower layer index.
    """
    top_k, min_accuracy = check_selection(top_k, min_accuracy)
    if top_k is None and min_accuracy is None and scores is None:
        raise ValueError("give top_k, min_accuracy or a layer scorer to select layers.")
    pool = list(results)
    parts = []
    if min_accuracy is not None:
        pool = [r for r in pool if r.selection_accuracy >= min_accuracy]
        parts.append(f"probe accuracy >= {min_accuracy:g}")

    order = {layer: i for i, layer in enumerate(rank_layers(pool, scores))}
    pool.sort(key=lambda r: order[r.layer])
    criterion = (
        "layer scorer"
        if scores is not None
        else (
            "validation probe accuracy"
            if any(r.val_accuracy is not None for r in results)
            else "training probe accuracy"
        )
    )
    if top_k is not None:
        pool = pool[:top_k]
        parts.append(f"top {top_k} by {criterion}")
    elif scores is not None:
        parts.append("ranked by layer scorer")
    return sorted(r.layer for r in pool), ", ".join(parts)
