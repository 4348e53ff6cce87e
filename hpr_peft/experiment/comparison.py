"""Held-out comparisons at matched KL: paired bootstrap CIs by question, per fold and pooled over folds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.evaluation.statistics import paired_bootstrap

__all__ = ["COMPARISONS", "compare", "method_summary"]

# (edited, reference): each row of the decision table is edited − reference, paired by question.
COMPARISONS = (("hpr", "additive"), ("hpr", "unedited"), ("additive", "unedited"))
METRICS = ("mc1", "mc2")


def _per_fold_and_pooled(
    edited: Sequence[MCResult], base: Sequence[MCResult], seed: int
) -> dict[str, dict[str, Any]]:
    """``{metric: {"pooled": CI, "per_fold": [CI, ...]}}`` of ``edited − base``."""
    out: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        per_fold = [
            paired_bootstrap(getattr(e, metric), getattr(b, metric), seed=seed).to_dict()
            for e, b in zip(edited, base, strict=True)
        ]
        strata = [fold for fold, e in enumerate(edited) for _ in e.question_ids]
        pooled = paired_bootstrap(
            [x for e in edited for x in getattr(e, metric)],
            [x for b in base for x in getattr(b, metric)],
            strata=strata,
            seed=seed,
        )
        out[metric] = {"pooled": pooled.to_dict(), "per_fold": per_fold}
    return out


def method_summary(
    per_fold: Sequence[MCResult],
    unedited: MCResult,
    side_effects: Sequence[Mapping[str, float]],
    seed: int = 0,
) -> dict[str, Any]:
    """A method's held-out results over all folds: scores, paired Δ to the unedited model with bootstrap
    CIs, and the side effects averaged over folds."""
    result = MCResult.concat(list(per_fold))
    bases = [unedited.subset(r.question_ids) for r in per_fold]
    deltas = _per_fold_and_pooled(per_fold, bases, seed)
    return {
        **result.summary(),
        "kl": sum(s["kl"] for s in side_effects) / len(side_effects),
        "perplexity": sum(s["perplexity"] for s in side_effects) / len(side_effects),
        "delta_mc1": deltas["mc1"]["pooled"],
        "delta_mc2": deltas["mc2"]["pooled"],
    }


def compare(
    held_out: Mapping[str, Sequence[MCResult]], unedited: MCResult, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Every pair of :data:`COMPARISONS` whose methods were both scored: ``{"hpr-additive": {metric:
    {"pooled": ..., "per_fold": [...]}}}``. ``held_out[method]`` holds one result per fold, in fold order."""
    runs = dict(held_out)
    runs["unedited"] = [unedited.subset(r.question_ids) for r in next(iter(held_out.values()))]
    out = {}
    for edited, reference in COMPARISONS:
        if edited in runs and reference in runs:
            out[f"{edited}-{reference}"] = _per_fold_and_pooled(runs[edited], runs[reference], seed)
    return out
