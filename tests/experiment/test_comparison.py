"""Held-out comparisons at matched KL: paired bootstrap by question, per fold and pooled."""

from __future__ import annotations

import pytest

from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.experiment.comparison import compare, method_summary


def _result(ids: list[str], mc1: list[float], mc2: list[float]) -> MCResult:
    return MCResult(question_ids=ids, mc1=mc1, mc2=mc2)


IDS = [[f"a{i}" for i in range(30)], [f"b{i}" for i in range(30)]]
UNEDITED = _result(IDS[0] + IDS[1], [0.0] * 60, [0.4] * 60)


def _shifted(shift: float) -> list[MCResult]:
    return [_result(ids, [1.0 if i % 3 == 0 else 0.0 for i in range(30)], [0.4 + shift] * 30) for ids in IDS]


def test_a_constant_gain_has_a_zero_width_ci_in_every_fold_and_pooled():
    summary = method_summary(_shifted(0.1), UNEDITED, [{"kl": 0.05, "perplexity": 10.0}] * 2)
    assert summary["n"] == 60 and summary["kl"] == pytest.approx(0.05)
    assert summary["delta_mc2"]["mean"] == pytest.approx(0.1)
    assert summary["delta_mc2"]["low"] == pytest.approx(0.1) and summary["delta_mc2"][
        "high"
    ] == pytest.approx(0.1)


def test_compare_gives_every_pair_of_scored_methods():
    pairs = compare({"hpr": _shifted(0.1), "additive": _shifted(0.03)}, UNEDITED)
    assert set(pairs) == {"hpr-additive", "hpr-unedited", "additive-unedited"}
    assert pairs["hpr-additive"]["mc2"]["pooled"]["mean"] == pytest.approx(0.07)
    assert len(pairs["hpr-additive"]["mc2"]["per_fold"]) == 2
    assert pairs["hpr-additive"]["mc1"]["pooled"]["mean"] == pytest.approx(0.0)
    only_hpr = compare({"hpr": _shifted(0.1)}, UNEDITED)
    assert set(only_hpr) == {"hpr-unedited"}
