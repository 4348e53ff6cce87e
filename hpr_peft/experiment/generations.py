"""The main job's TruthfulQA generations: unedited, additive and HPR answers to held-out questions.

Subset: in each fold, the first ``ceil(generation_questions / folds)`` held-out questions in id order
(``tqa-0000`` ...), so every generated question was scored held-out and never used to fit or choose
a setting. Each method generates with the setting chosen for that fold (greedy, QA primer, KV cache;
:mod:`hpr_peft.evaluation.generation`) and is scored by lm-eval's ``truthfulqa_gen`` metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hpr_peft.data import GenerationQuestion
from hpr_peft.evaluation.generation import GENERATION_METRICS, GenerationResult, generate_truthfulqa
from hpr_peft.runtime.model_io import ContextFactory

__all__ = [
    "GENERATION_METHODS",
    "format_generation_tables",
    "generate_held_out",
    "generation_subset",
    "summarize_generations",
]

GENERATION_METHODS = ("unedited", "additive", "hpr")
_TABLE_METRICS = (
    ("bleu_max", "BLEU max", 1.0),
    ("bleu_acc", "BLEU acc %", 100.0),
    ("bleu_diff", "BLEU diff", 1.0),
    ("rouge1_acc", "ROUGE-1 acc %", 100.0),
    ("rouge2_acc", "ROUGE-2 acc %", 100.0),
    ("rougeL_max", "ROUGE-L max", 1.0),
    ("rougeL_acc", "ROUGE-L acc %", 100.0),
    ("rougeL_diff", "ROUGE-L diff", 1.0),
)


def generation_subset(held_out_ids: Sequence[str], total: int, folds: int) -> list[str]:
    """The held-out ids one fold generates for: the first ``ceil(total / folds)`` in id order."""
    return sorted(held_out_ids)[: math.ceil(total / folds)] if total > 0 else []


def generate_held_out(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[GenerationQuestion],
    contexts: Mapping[str, ContextFactory],
    max_new_tokens: int,
    progress: bool,
    desc: str,
) -> dict[str, GenerationResult]:
    """Each method's answers to ``questions`` (``contexts[method]`` puts the model in its state)."""
    return {
        method: generate_truthfulqa(
            model,
            tokenizer,
            questions,
            context=contexts[method],
            max_new_tokens=max_new_tokens,
            progress=progress,
            desc=f"{desc} {method}",
        )
        for method in GENERATION_METHODS
    }


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def summarize_generations(
    per_fold: Sequence[Mapping[str, GenerationResult]], questions: Mapping[str, GenerationQuestion]
) -> dict[str, Any]:
    """All folds' generations together: per method the mean and s.e. of every metric, and per
    question the three answers side by side."""
    methods: dict[str, Any] = {}
    for method in GENERATION_METHODS:
        results = [fold[method] for fold in per_fold if method in fold]
        metrics = {name: [v for r in results for v in r.metrics[name]] for name in GENERATION_METRICS}
        methods[method] = {
            "n": len(metrics[GENERATION_METRICS[0]]),
            "seconds": sum(r.seconds for r in results),
            **{name: _mean_and_error(values)[0] for name, values in metrics.items()},
            **{f"{name}_se": _mean_and_error(values)[1] for name, values in metrics.items()},
        }
    rows = []
    for fold in per_fold:
        if not fold:
            continue
        first = fold[GENERATION_METHODS[0]]
        for i, question_id in enumerate(first.question_ids):
            rows.append(
                {
                    "question_id": question_id,
                    "question": questions[question_id].question,
                    **{method: fold[method].completions[i] for method in GENERATION_METHODS},
                }
            )
    rows.sort(key=lambda row: row["question_id"])
    return {"methods": methods, "answers": rows}


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def format_generation_tables(summary: Mapping[str, Any], max_rows: int | None = None) -> str:
    """Markdown: the metrics per method, then the answers side by side (question | unedited | additive | HPR)."""
    methods = summary["methods"]
    n = methods[GENERATION_METHODS[0]]["n"]
    lines = [
        f"TruthfulQA generation ({n} held-out questions; greedy, QA primer; lm-eval's truthfulqa_gen metrics, "
        "mean ± s.e.; acc = closer to a true than to a false reference answer)",
        "",
        "| method | " + " | ".join(label for _, label, _ in _TABLE_METRICS) + " |",
        "|---|" + "---|" * len(_TABLE_METRICS),
    ]
    for method in GENERATION_METHODS:
        row = methods[method]
        cells = [f"{scale * row[k]:.1f} ± {scale * row[k + '_se']:.1f}" for k, _, scale in _TABLE_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    answers = summary["answers"][:max_rows] if max_rows else summary["answers"]
    lines += ["", "| question | unedited | additive | HPR |", "|---|---|---|---|"]
    lines += [
        f"| {_cell(row['question'])} | " + " | ".join(_cell(row[m]) for m in GENERATION_METHODS) + " |"
        for row in answers
    ]
    return "\n".join(lines)
