"""The job's results as a markdown table, with the chance levels of the questions actually scored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpr_peft.data import MCQuestion

__all__ = ["chance_levels", "format_table"]


def chance_levels(questions: Sequence[MCQuestion]) -> dict[str, float]:
    """MC1 of a uniform random pick (mean 1 / choices) and MC2 of uniform scores (mean share of true
    answers) over ``questions``."""
    n = len(questions)
    return {
        "mc1": sum(1 / len(q.mc1_choices) for q in questions) / n,
        "mc2": sum(sum(q.mc2_labels) / len(q.mc2_labels) for q in questions) / n,
    }


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the per-method results (held-out folds, mean ± s.e. over questions)."""
    m = results["methods"]
    lines = [
        f"TruthfulQA ({results['model']}, {results['n_questions']} questions, "
        f"{len(results['folds'])}-fold CV, nested selection at KL ≤ {results['settings']['kl_budget']})",
        "",
        "| method | MC1 % | MC2 % | ΔMC1 (pp) | ΔMC2 (pp) | KL (nats/token) | perplexity | settings per fold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_method_row(name, m[name], results["per_fold"]) for name in ("unedited", "additive", "hpr")]
    chance = results.get("chance")
    timing = results["timings_s"]["total"]
    footer = f"Total time {timing:.0f} s; one scoring pass over these {results['n_questions']} questions "
    footer += f"took {results['seconds_per_pass']:.0f} s."
    if chance:
        footer = (
            f"Chance: MC1 {100 * chance['mc1']:.1f} %, MC2 (uniform scores) {100 * chance['mc2']:.1f} %. "
            + footer
        )
    return "\n".join([*lines, "", footer])


def _method_row(name: str, row: dict[str, Any], per_fold: list[dict[str, Any]]) -> str:
    delta = ("–", "–")
    if "delta_mc1" in row:
        delta = (
            f"{100 * row['delta_mc1']:+.1f} ± {100 * row['delta_mc1_se']:.1f}",
            f"{100 * row['delta_mc2']:+.1f} ± {100 * row['delta_mc2_se']:.1f}",
        )
    chosen = "; ".join(
        f"layers {fo['chosen'][name]['layers']} α={fo['chosen'][name]['alpha']:g}"
        for fo in per_fold
        if name in fo["chosen"]
    )
    return (
        f"| {name} | {100 * row['mc1']:.1f} ± {100 * row['mc1_se']:.1f} | {100 * row['mc2']:.1f} ± "
        f"{100 * row['mc2_se']:.1f} | {delta[0]} | {delta[1]} | {row['kl']:.3f} | {row['perplexity']:.2f} | "
        f"{chosen or '–'} |"
    )
