"""Candidates measured at a KL budget: calibration + scoring, with and without block-input replay."""

from __future__ import annotations

import pytest

from hpr_peft.evaluation.side_effects import NeutralText
from hpr_peft.evaluation.truthfulqa import TruthfulQAScorer
from hpr_peft.experiment.methods import EditCandidate
from hpr_peft.experiment.sweep import BudgetedMeasure, record_replay, result_key
from support.evaluation import CharTokenizer, tiny_questions
from support.hpr import random_hpr_model

PRIMER = "Q: What is 1+1?\nA: 2."
PARAGRAPHS = ["The cat sat on the mat.", "Rivers run to the sea, slowly and surely.", "Bread is baked."]


def _setup():
    model = random_hpr_model("llama", target_layers=[1, 2, 3])
    tokenizer = CharTokenizer(bos=2)
    neutral = NeutralText(tokenizer, PARAGRAPHS, batch_size=2)
    neutral.compute_reference(model, model.disable_adapter)
    scorer = TruthfulQAScorer(tokenizer, tiny_questions(3), primer=PRIMER, packed=True, max_tokens=64)
    return model, neutral, scorer


def _target(model, neutral) -> float:
    """A budget this random editor reaches: half its KL at alpha 1 on layers 2-3."""
    edit = EditCandidate("hpr", (2, 3)).at(model, 1.0)
    return neutral.measure(model, edit).kl / 2


def test_replayed_measurement_equals_the_full_one():
    model, neutral, scorer = _setup()
    target = _target(model, neutral)
    candidate = EditCandidate("hpr", (2, 3))
    plain = BudgetedMeasure(model, neutral, 0.1, 64.0).measure(candidate, target, scorer, "validation")
    replay = record_replay(
        model,
        2,
        {
            "validation": lambda context: scorer.score(model, context=context, progress=False),
            "neutral": lambda context: neutral.measure(model, context),
        },
    )
    replayed = BudgetedMeasure(model, neutral, 0.1, 64.0, replay).measure(
        candidate, target, scorer, "validation"
    )
    assert plain.reached and replayed.reached
    assert replayed.calibration == plain.calibration  # every (alpha, KL) evaluation identical
    assert replayed.result.mc2 == plain.result.mc2 and replayed.result.mc1 == plain.result.mc1
    assert target * 0.9 <= plain.calibration.kl <= target
    # a candidate editing below the recorded block runs every block (no replay, still right)
    low = EditCandidate("hpr", (1, 2))
    assert not replay.covers(low) and replay.covers(candidate)
    a = BudgetedMeasure(model, neutral, 0.1, 64.0).measure(low, target, scorer, "validation")
    b = BudgetedMeasure(model, neutral, 0.1, 64.0, replay).measure(low, target, scorer, "validation")
    assert a.calibration == b.calibration and a.result.mc2 == b.result.mc2


def test_a_budget_out_of_reach_is_scored_at_the_strongest_alpha_within_it():
    model, neutral, scorer = _setup()
    candidate = EditCandidate("hpr", (2,))
    got = BudgetedMeasure(model, neutral, 0.1, max_alpha=2.0).measure(candidate, 5.0, scorer, "validation")
    assert got.reached and not got.calibration.in_band
    assert got.calibration.kl == max(k for _, k in got.calibration.evaluations) < 5.0
    row = got.row(0, scorer.score(model, context=model.disable_adapter, progress=False))
    assert row["in_band"] is False and row["kl"] == got.calibration.kl and "mc2" in row


def test_an_unreachable_budget_is_recorded_not_raised():
    model, neutral, scorer = _setup()
    measure = BudgetedMeasure(model, neutral, 0.1, max_alpha=1e-3)
    got = measure.measure(EditCandidate("hpr", (2,)), 5.0, scorer, "validation")
    assert not got.reached and got.result is None
    row = got.row(0, scorer.score(model, context=model.disable_adapter, progress=False))
    assert row["reached"] is False and "mc2" not in row
    # measured once: the cache answers the second call
    assert measure.measure(EditCandidate("hpr", (2,)), 5.0, scorer, "validation") is got


@pytest.mark.parametrize(
    ("method", "target", "key"), [("hpr", 0.05, "hpr@kl0.05"), ("additive", 0.1, "additive@kl0.1")]
)
def test_result_keys(method, target, key):
    assert result_key(method, target) == key


def test_kl_points_carry_over_between_budgets_and_stages_until_the_editors_change():
    """A candidate's (alpha, KL) points serve its later budgets and stages: the same budget in another
    stage costs no neutral pass and gives the same alpha; retraining a method drops its points."""
    model, neutral, scorer = _setup()
    target = _target(model, neutral)
    candidate = EditCandidate("hpr", (2, 3))
    measure = BudgetedMeasure(model, neutral, 0.1, 64.0)
    screen = measure.measure(candidate, target, scorer, "screen")
    assert screen.calibration.reused == 0 and screen.calibration.passes >= 1
    validation = measure.measure(candidate, target, scorer, "validation")
    assert validation.calibration.passes == 0 and validation.calibration.alpha == screen.calibration.alpha
    larger = measure.measure(candidate, 2 * target, scorer, "validation")
    assert larger.calibration.reused >= len(screen.calibration.evaluations)
    assert 2 * target * 0.9 <= larger.calibration.kl <= 2 * target
    assert (
        larger.row(0, scorer.score(model, context=model.disable_adapter, progress=False))[
            "calibration_passes"
        ]
        == larger.calibration.passes
    )
    measure.forget_kl_points("hpr")
    fresh = measure.measure(candidate, target, scorer, "other stage")
    assert fresh.calibration.reused == 0 and fresh.calibration == screen.calibration
