"""Paired bootstrap of per-question differences: properties of the interval and clear errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.evaluation.statistics import PairedDifference, paired_bootstrap

scores = st.floats(-10.0, 10.0, allow_nan=False)


@st.composite
def paired_scores(draw, min_size: int = 2):
    n = draw(st.integers(min_size, 40))
    edited = draw(st.lists(scores, min_size=n, max_size=n))
    base = draw(st.lists(scores, min_size=n, max_size=n))
    return edited, base


@settings(max_examples=60, deadline=None)
@given(paired_scores(), st.integers(0, 2**31))
def test_the_interval_contains_the_mean_and_negates_when_swapped(pair, seed):
    edited, base = pair
    diff = paired_bootstrap(edited, base, n_resamples=400, seed=seed)
    slack = 1e-9 * (1 + max(map(abs, edited + base)))
    assert diff.low - slack <= diff.mean <= diff.high + slack
    assert diff.mean == pytest.approx(
        sum(e - b for e, b in zip(edited, base, strict=True)) / len(edited), abs=slack
    )
    swapped = paired_bootstrap(base, edited, n_resamples=400, seed=seed)
    assert swapped.mean == pytest.approx(-diff.mean, abs=slack)
    assert swapped.low == pytest.approx(-diff.high, abs=slack)
    assert swapped.high == pytest.approx(-diff.low, abs=slack)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-800, 800), min_size=2, max_size=30), st.integers(-16, 16), st.booleans())
def test_constant_differences_give_a_zero_width_interval_at_the_constant(eighths, sixteenths, stratified):
    base, gain = [b / 8 for b in eighths], sixteenths / 16  # exact in binary: the differences are equal
    strata = [i % 3 for i in range(len(base))] if stratified else None
    diff = paired_bootstrap([b + gain for b in base], base, strata=strata, n_resamples=200)
    assert diff.low == diff.high
    assert diff.mean == pytest.approx(gain, abs=1e-9) and diff.low == pytest.approx(gain, abs=1e-9)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    edited = [0.1 * (i % 7) for i in range(50)]
    base = [0.05 * (i % 5) for i in range(50)]
    first = paired_bootstrap(edited, base, seed=3)
    assert paired_bootstrap(edited, base, seed=3) == first
    assert paired_bootstrap(edited, base, seed=4) != first
    assert first.n == 50 and first.to_dict() == {
        "mean": first.mean,
        "low": first.low,
        "high": first.high,
        "n": 50,
    }


def test_a_clear_gain_excludes_zero_and_noise_does_not():
    base = [float(i % 2) for i in range(100)]
    gain = paired_bootstrap([b + 0.1 + 0.05 * (i % 3) for i, b in enumerate(base)], base)
    assert gain.excludes_zero() and gain.low > 0
    noise = paired_bootstrap([b + (0.1 if i % 2 else -0.1) for i, b in enumerate(base)], base)
    assert noise.mean == pytest.approx(0.0, abs=1e-12) and not noise.excludes_zero()
    assert PairedDifference(-0.2, -0.3, -0.1, 5).excludes_zero()


def test_strata_resample_within_each_stratum():
    """Two folds whose differences are constant within each: the pooled mean never varies."""
    edited = [1.0] * 10 + [3.0] * 30
    base = [0.0] * 40
    pooled = paired_bootstrap(edited, base, strata=[0] * 10 + [1] * 30)
    assert pooled.low == pooled.high == pytest.approx(2.5)
    unstratified = paired_bootstrap(edited, base)
    assert unstratified.low < 2.5 < unstratified.high


def test_confidence_widens_the_interval():
    edited = [math.sin(i) for i in range(60)]
    base = [0.0] * 60
    narrow = paired_bootstrap(edited, base, confidence=0.5)
    wide = paired_bootstrap(edited, base, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.parametrize(
    ("edited", "base", "options", "error", "message"),
    [
        ([1.0, 2.0], [1.0], {}, ValueError, "same questions"),
        ([], [], {}, ValueError, "at least 2 questions"),
        ([1.0], [0.0], {}, ValueError, "at least 2 questions"),
        ([1.0, math.nan], [0.0, 0.0], {}, ValueError, "finite numbers"),
        ([1.0, True], [0.0, 0.0], {}, ValueError, "finite numbers"),
        ("12", "34", {}, TypeError, "sequence of numbers"),
        ([1.0, 2.0], [0.0, 0.0], {"confidence": 1.0}, ValueError, "confidence"),
        ([1.0, 2.0], [0.0, 0.0], {"confidence": 0.0}, ValueError, "confidence"),
        ([1.0, 2.0], [0.0, 0.0], {"n_resamples": 0}, ValueError, "n_resamples"),
        ([1.0, 2.0], [0.0, 0.0], {"strata": [0]}, ValueError, "one label per question"),
    ],
)
def test_bad_inputs_raise_clear_errors(edited, base, options, error, message):
    with pytest.raises(error, match=message):
        paired_bootstrap(edited, base, **options)


def test_mc_result_per_question():
    result = MCResult(question_ids=["a", "b"], mc1=[1.0, 0.0], mc2=[0.7, 0.2])
    assert result.per_question("mc1") == [1.0, 0.0] and result.per_question("mc2") == [0.7, 0.2]
    result.per_question("mc2").append(1.0)
    assert result.mc2 == [0.7, 0.2]
    with pytest.raises(ValueError, match="'mc1' or 'mc2'"):
        result.per_question("mc3")
