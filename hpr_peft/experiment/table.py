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
    """Markdown: the held-out results per method at each matched KL, the paired comparisons with
    bootstrap CIs, and how the layer rankings by probe accuracy and by effect agree."""
    targets = results["kl_targets"]
    lines = [
        f"TruthfulQA ({results['model']}, {results['n_questions']} questions, {len(results['folds'])}-fold CV; "
        f"per method α calibrated to each KL target on neutral text, layers and α chosen on validation "
        f"questions; KL measured on a second, unseen neutral text)",
        "",
        "| method | KL target | MC1 % | MC2 % | ΔMC1 pp [95 % CI] | ΔMC2 pp [95 % CI] | KL | perplexity "
        "| layers α per fold |",
        "|---|---|---|---|---|---|---|---|---|",
        _method_row("unedited", None, results["methods"]["unedited"], []),
    ]
    for target in targets:
        for method in ("hpr", "additive"):
            key = f"{method}@kl{target:g}"
            row = results["methods"].get(key)
            if row is not None:
                lines.append(_method_row(method, target, row, _choices(results["per_fold"], key)))
            else:
                lines.append(f"| {method} | {target:g} | budget out of reach in some fold | | | | | | |")
    lines += [
        "",
        *_comparison_lines(results.get("comparisons", {})),
        "",
        *_ranking_lines(results["per_fold"]),
        "",
        *_selectivity_lines(results["per_fold"]),
    ]
    lines += ["", _footer(results)]
    return "\n".join(lines)


def _ci(ci: dict[str, float] | None) -> str:
    if not ci:
        return "–"
    return f"{100 * ci['mean']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def _choices(per_fold: list[dict[str, Any]], key: str) -> str:
    picks = [fo["chosen"].get(key) for fo in per_fold]
    return "; ".join(f"{p['layers']} α={p['alpha']:.3g}{_short_of_budget(p)}" for p in picks if p)


def _short_of_budget(pick: dict[str, Any]) -> str:
    """A mark for a pick calibrated short of its budget (out of reach: the strongest α within it)."""
    if pick.get("in_band", True):
        return ""
    return f" (calibrated KL {pick['kl']:.3g}: short of the budget)"


def _method_row(name: str, target: float | None, row: dict[str, Any], chosen: str) -> str:
    return (
        f"| {name} | {'–' if target is None else f'{target:g}'} | {100 * row['mc1']:.1f} | "
        f"{100 * row['mc2']:.1f} | {_ci(row.get('delta_mc1'))} | {_ci(row.get('delta_mc2'))} | "
        f"{row['kl']:.3f} | {row['perplexity']:.2f} | {chosen or '–'} |"
    )


def _comparison_lines(comparisons: dict[str, Any]) -> list[str]:
    lines = [
        "Paired differences at matched KL (bootstrap by question, pooled over folds; per fold after ';')",
        "",
        "| KL target | comparison | ΔMC1 pp [95 % CI] | ΔMC2 pp [95 % CI] | MC2 CI excludes 0 | ΔMC2 per fold |",
        "|---|---|---|---|---|---|",
    ]
    for target, pairs in comparisons.items():
        for name, metrics in pairs.items():
            mc2 = metrics["mc2"]["pooled"]
            excludes = "yes" if mc2["low"] > 0 or mc2["high"] < 0 else "no"
            per_fold = "; ".join(_ci(ci) for ci in metrics["mc2"]["per_fold"])
            lines.append(
                f"| {target} | {name} | {_ci(metrics['mc1']['pooled'])} | {_ci(mc2)} | {excludes} | {per_fold} |"
            )
    return lines


def _ranking_lines(per_fold: list[dict[str, Any]]) -> list[str]:
    lines = []
    for fold in per_fold:
        for method, comparison in (fold.get("ranking_comparison") or {}).items():
            rho = comparison.get("spearman")
            lines.append(
                f"- fold {fold['fold']} {method}: layers by effect {comparison['effect_order']}, by probe "
                f"accuracy {comparison['probe_order']}; Spearman(probe accuracy, validation MC2) = "
                + ("–" if rho is None else f"{rho:+.2f}")
            )
    return (
        ["Layer rankings on the screened layers (validation, smallest KL target):", "", *lines]
        if lines
        else []
    )


def _selectivity_lines(per_fold: list[dict[str, Any]]) -> list[str]:
    lines = []
    for fold in per_fold:
        layers = [
            f"layer {s['layer']} {s['prompts_mean_edit_angle']:.3f} / {s['neutral_mean_edit_angle']:.3f} rad "
            f"({s['ratio']:.2f}×)"
            for s in fold.get("selectivity") or []
        ]
        if layers:
            lines.append(f"- fold {fold['fold']}: " + ", ".join(layers))
    title = (
        "HPR's edit selectivity, the choice at the largest KL target, before α (mean predicted angle over all tokens, "
        "0 where the gate is closed: held-out prompts / held-out neutral text):"
    )
    return [title, "", *lines] if lines else []


def _footer(results: dict[str, Any]) -> str:
    chance = results.get("chance")
    footer = f"Total time {results['timings_s']['total']:.0f} s; one scoring pass over these "
    footer += f"{results['n_questions']} questions took {results['seconds_per_pass']:.0f} s."
    if chance:
        footer = (
            f"Chance: MC1 {100 * chance['mc1']:.1f} %, MC2 (uniform scores) {100 * chance['mc2']:.1f} %. "
            + footer
        )
    return footer
