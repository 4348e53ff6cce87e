"""TruthfulQA as the data tests read it: the raw files and the library's questions and pairs."""

from __future__ import annotations

import csv
import json

import pytest

from hpr_peft.data import load_truthfulqa, load_truthfulqa_mc


@pytest.fixture(scope="session")
def raw_mc(truthfulqa_dir):
    """``mc_task.json`` as plain JSON."""
    return json.loads((truthfulqa_dir / "mc_task.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def raw_csv(truthfulqa_dir):
    """``TruthfulQA.csv`` as a list of row dicts."""
    with (truthfulqa_dir / "TruthfulQA.csv").open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def mc_questions(truthfulqa_dir):
    return load_truthfulqa_mc(truthfulqa_dir)


@pytest.fixture(scope="session")
def qa_pairs(truthfulqa_dir):
    """The default pairs: ``qa`` format, ``mc2`` answers."""
    return load_truthfulqa(truthfulqa_dir)
