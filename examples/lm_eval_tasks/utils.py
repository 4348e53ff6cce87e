"""lm-eval's TruthfulQA tasks on a local copy of the data, for offline runs.

The datasets come from the folder named by ``$HPR_TRUTHFULQA_DIR`` (``mc_task.json`` and
``TruthfulQA.csv``, the files the Hub dataset ``truthfulqa/truthful_qa`` is built from), turned into the
Hub dataset's columns. Scoring is lm-eval's own: the functions below are imported from
``lm_eval.tasks.truthfulqa.utils``, not copied.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.truthfulqa.utils import process_docs_gen, process_results_gen, process_results_mc2

__all__ = [
    "load_generation",
    "load_multiple_choice",
    "process_docs_gen",
    "process_results_gen",
    "process_results_mc2",
]

TRUTHFULQA_DIR_ENV = "HPR_TRUTHFULQA_DIR"


def _truthfulqa_dir() -> Path:
    folder = os.environ.get(TRUTHFULQA_DIR_ENV)
    if not folder or not (Path(folder) / "mc_task.json").is_file():
        raise FileNotFoundError(
            f"These tasks read TruthfulQA from ${TRUTHFULQA_DIR_ENV}: set it to the folder holding "
            "mc_task.json and TruthfulQA.csv."
        )
    return Path(folder)


def _targets(answers: dict[str, int]) -> dict[str, list]:
    return {"choices": list(answers), "labels": list(answers.values())}


def load_multiple_choice(**_: Any) -> datasets.DatasetDict:
    """``mc_task.json`` as the Hub's ``multiple_choice`` config: question, mc1/mc2 choices + labels."""
    records = json.loads((_truthfulqa_dir() / "mc_task.json").read_text(encoding="utf-8"))
    rows = [
        {
            "question": r["question"],
            "mc1_targets": _targets(r["mc1_targets"]),
            "mc2_targets": _targets(r["mc2_targets"]),
        }
        for r in records
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _answers(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


def load_generation(**_: Any) -> datasets.DatasetDict:
    """``TruthfulQA.csv`` as the Hub's ``generation`` config (answers split on ';')."""
    with (_truthfulqa_dir() / "TruthfulQA.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = [
            {
                "type": row["Type"],
                "category": row["Category"],
                "question": row["Question"],
                "best_answer": row["Best Answer"],
                "correct_answers": _answers(row["Correct Answers"]),
                "incorrect_answers": _answers(row["Incorrect Answers"]),
                "source": row["Source"],
            }
            for row in csv.DictReader(handle)
        ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
