"""Layer choice by effect: the screening pool, the effect ranking and its comparison with probe accuracy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpr_peft.evaluation.calibration import KLCalibration
from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.experiment.layer_search import (
    effect_ranking,
    layer_sets,
    ranking_comparison,
    screening_pool,
    spearman,
)
from hpr_peft.experiment.methods import EditCandidate
from hpr_peft.experiment.sweep import Measurement, best_per_target


def _measured(
    layers: tuple[int, ...], mc2: float | None, target: float = 0.05, mc1: float = 0.5
) -> Measurement:
    if mc2 is None:
        return Measurement(EditCandidate("hpr", layers), target, None, None, "screen")
    result = MCResult(question_ids=["q0", "q1"], mc1=[mc1, mc1], mc2=[mc2, mc2])
    return Measurement(
        EditCandidate("hpr", layers),
        target,
        KLCalibration(1.0, target, target, ((1.0, target),)),
        result,
        "screen",
    )


@pytest.mark.parametrize(("n_layers", "count"), [(30, 6), (18, 6), (4, 6), (2, 1), (30, 1)])
def test_screening_pool_spreads_over_the_middle_and_late_layers(n_layers, count):
    pool = screening_pool(n_layers, count)
    assert pool == sorted(set(pool)) and 1 <= len(pool) <= count
    assert all(n_layers // 4 <= i <= max(n_layers // 4, n_layers - 2) for i in pool)
    if n_layers >= count + n_layers // 4 + 1 and count > 1:
        assert len(pool) == count and pool[0] == n_layers // 4 and pool[-1] == n_layers - 2


def test_screening_pool_refuses_nonsense():
    with pytest.raises(ValueError, match="count >= 1"):
        screening_pool(10, 0)


def test_effect_ranking_orders_by_validation_mc2_and_puts_unreached_last():
    screen = [_measured((3,), 0.40), _measured((5,), None), _measured((7,), 0.55), _measured((9,), 0.45)]
    assert effect_ranking(screen) == [7, 9, 3, 5]


def test_layer_sets_take_the_top_k_sorted_without_duplicates():
    assert layer_sets([7, 9, 3, 5], (1, 3, 3, 10)) == [(7,), (3, 7, 9), (3, 5, 7, 9)]
    assert layer_sets([], (1,)) == []


def test_best_per_target_picks_the_best_reached_measurement_per_budget():
    a, b = _measured((1,), 0.4, 0.05), _measured((2,), 0.6, 0.05)
    c, d = _measured((1,), 0.7, 0.1), _measured((2,), None, 0.1)
    best = best_per_target([a, b, c, d], (0.05, 0.1, 0.2))
    assert best[0.05] is b and best[0.1] is c and best[0.2] is None


@given(st.lists(st.integers(-1000, 1000), min_size=2, max_size=20, unique=True))
def test_spearman_of_a_monotone_transform_is_one(xs):
    assert spearman(xs, [x**3 + 1 for x in xs]) == pytest.approx(1.0)
    assert spearman(xs, [-x for x in xs]) == pytest.approx(-1.0)


def test_spearman_handles_ties_and_constants():
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1], [1])


def test_ranking_comparison_reports_both_orders():
    screen = [_measured((3,), 0.40), _measured((5,), 0.50), _measured((7,), 0.60)]
    comparison = ranking_comparison(screen, {3: 0.9, 5: 0.8, 7: 0.7})
    assert comparison["effect_order"] == [7, 5, 3] and comparison["probe_order"] == [3, 5, 7]
    assert comparison["spearman"] == pytest.approx(-1.0)
