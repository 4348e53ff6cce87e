"""Which layers to edit, chosen by effect: single layers are screened by validation ΔMC2 at a matched
KL budget, and the best few form the candidate sets. Probe accuracy, the paper's criterion, is flat
over many middle layers, so it ranks them by noise; the effect ranking asks the question that matters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hpr_peft.experiment.sweep import Measurement

__all__ = ["effect_ranking", "layer_sets", "ranking_comparison", "screening_pool", "spearman"]


def screening_pool(n_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly from a quarter of the depth to the second-to-last block.

    The first quarter carries little concept information and the last block feeds the head directly.
    """
    if n_layers < 1 or count < 1:
        raise ValueError(f"need n_layers >= 1 and count >= 1, got {n_layers} and {count}.")
    low, high = n_layers // 4, max(n_layers // 4, n_layers - 2)
    if count == 1:
        return [(low + high) // 2]
    step = (high - low) / (count - 1)
    return sorted({round(low + i * step) for i in range(count)})


def effect_ranking(screen: Sequence[Measurement]) -> list[int]:
    """The single layers of ``screen`` by validation MC2, best first; out-of-budget layers last."""
    singles = [m for m in screen if len(m.candidate.layers) == 1]
    reached = sorted(
        (m for m in singles if m.reached),
        key=lambda m: -m.result.mc2_mean,  # type: ignore[union-attr]
    )
    missed = [m for m in singles if not m.reached]
    return [m.candidate.layers[0] for m in [*reached, *missed]]


def layer_sets(ranking: Sequence[int], top_ks: Sequence[int]) -> list[tuple[int, ...]]:
    """The top-``k`` layers of ``ranking`` for each ``k`` (sorted tuples; ``k`` beyond the ranking's
    length is cut to it)."""
    return list(dict.fromkeys(tuple(sorted(ranking[:k])) for k in top_ks if ranking))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {len(x)} and {len(y)}.")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def ranking_comparison(screen: Sequence[Measurement], probe_accuracy: Mapping[int, float]) -> dict[str, Any]:
    """How probe accuracy and measured effect agree on the screened layers: both orders, per-layer
    numbers, and their Spearman correlation."""
    effects = {
        m.candidate.layers[0]: m.result.mc2_mean  # type: ignore[union-attr]
        for m in screen
        if m.reached and len(m.candidate.layers) == 1
    }
    layers = sorted(effects)
    comparison: dict[str, Any] = {
        "layers": layers,
        "validation_mc2": [effects[i] for i in layers],
        "probe_accuracy": [probe_accuracy.get(i, float("nan")) for i in layers],
        "effect_order": sorted(layers, key=lambda i: -effects[i]),
        "probe_order": sorted(layers, key=lambda i: -probe_accuracy.get(i, 0.0)),
    }
    comparison["spearman"] = (
        spearman(comparison["probe_accuracy"], comparison["validation_mc2"]) if len(layers) >= 2 else None
    )
    return comparison
