"""KL-budget calibration: the search on known KL curves, the tiny models for both edits, and on the
bundled SmolLM2 the promise that a budget calibrated on one neutral corpus holds on another."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.evaluation.calibration import (
    KLCalibration,
    additive_edit,
    calibrate_alpha,
    calibrate_on_neutral,
    hpr_edit,
    kl_calibration,
)
from hpr_peft.evaluation.side_effects import NeutralText, SideEffects, load_neutral_paragraphs
from support.evaluation import CharTokenizer
from support.models import make_tiny_causal_lm

LOGGER = "hpr_peft.evaluation.calibration"


class CurveNeutral:
    """A stand-in for NeutralText whose KL at strength ``alpha`` is ``curve(alpha)``."""

    has_reference = True

    def __init__(self, curve) -> None:
        self.curve = curve

    def measure(self, model, context) -> SideEffects:
        with context() as alpha:
            kl = self.curve(alpha)
        return SideEffects(perplexity=1.0, kl=kl, reference_perplexity=1.0, n_tokens=1)


def strength(alpha: float) -> contextlib.AbstractContextManager[float]:
    """Edit factory of the fake: the context hands the alpha to CurveNeutral.measure."""
    return contextlib.nullcontext(alpha)


def calibrate(curve, target, **options) -> KLCalibration:
    return kl_calibration(None, CurveNeutral(curve), strength, target, **options)


def assert_promise_kept(result: KLCalibration, tolerance: float = 0.1) -> None:
    """In the band, measured, and the largest measured alpha within budget."""
    assert result.target_kl * (1 - tolerance) <= result.kl <= result.target_kl
    assert (result.alpha, result.kl) in result.evaluations
    within = [a for a, k in result.evaluations if k <= result.target_kl]
    assert result.alpha == max(within)


def test_steps_up_at_most_doubling_then_aims_by_the_square_law():
    result = calibrate(lambda a: 0.01 * a**2, 0.5)
    assert [a for a, _ in result.evaluations[:3]] == [1.0, 2.0, 4.0]  # far below: doubling
    assert_promise_kept(result)
    assert math.sqrt(45) <= result.alpha <= math.sqrt(50)
    assert len(result.evaluations) == 4  # from KL 0.16 at 4 the square law lands in the band
    assert result.passes == 4 and result.reused == 0
    assert result.to_dict() == {
        "alpha": result.alpha,
        "kl": result.kl,
        "target_kl": 0.5,
        "evaluations": [list(e) for e in result.evaluations],
        "reused": 0,
        "in_band": True,
    }


def test_known_points_from_another_budget_are_reused_not_remeasured():
    measured = []

    def curve(alpha):
        measured.append(alpha)
        return 0.02 * alpha**2.5

    first = calibrate(curve, 0.05)
    assert len(measured) == first.passes == len(first.evaluations)
    measured.clear()
    second = calibrate(curve, 0.1, known=first.evaluations)
    assert_promise_kept(second)
    assert second.reused == len(first.evaluations) and second.passes == len(measured) <= 2
    assert set(measured).isdisjoint(a for a, _ in first.evaluations)
    measured.clear()
    again = calibrate(curve, 0.05, known=first.evaluations)  # already in the band: no pass at all
    assert measured == [] and again.passes == 0 and (again.alpha, again.kl) == (first.alpha, first.kl)


@settings(max_examples=40, deadline=None)
@given(
    power=st.floats(0.5, 4.0),
    first=st.floats(1e-3, 1.0),
    second=st.floats(1e-3, 1.0),
    tolerance=st.floats(0.02, 0.5),
)
def test_a_search_seeded_with_another_budgets_points_keeps_the_promise(power, first, second, tolerance):
    curve = lambda a: 0.01 * a**power  # noqa: E731
    assume(curve(64.0) >= max(first, second))
    earlier = calibrate(curve, first, tolerance=tolerance)
    result = calibrate(curve, second, tolerance=tolerance, known=earlier.evaluations)
    assert_promise_kept(result, tolerance)


def test_shrinks_alpha_while_the_kl_is_above_the_target():
    result = calibrate(lambda a: 10 * a**3, 0.1, start_alpha=1.0)
    assert result.evaluations[0] == (1.0, 10.0)
    assert result.evaluations[1][0] <= 0.5
    assert_promise_kept(result)


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(1e-3, 1e2),
    power=st.floats(0.5, 4.0),
    target=st.floats(1e-3, 1.0),
    tolerance=st.floats(0.02, 0.5),
    start=st.floats(0.05, 8.0),
)
def test_power_curves_are_calibrated_within_the_band_and_never_over_budget(
    scale, power, target, tolerance, start
):
    assume(scale * 64.0**power >= target)  # unreachable budgets have their own test
    result = calibrate(lambda a: scale * a**power, target, tolerance=tolerance, start_alpha=start)
    assert_promise_kept(result, tolerance)


def test_a_kl_that_jumps_over_the_band_gives_the_best_alpha_within_budget(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        result = calibrate(lambda a: 0.0 if a < 3 else 1.0, 0.5)
    assert result.kl == 0.0 and 2.99 < result.alpha < 3
    assert all(k <= 0.5 or a >= 3 for a, k in result.evaluations)
    assert "short of the band" in caplog.text


def test_an_edit_that_saturates_below_the_budget_is_an_error():
    with pytest.raises(ValueError, match=r"cannot be reached: KL at max_alpha 16 is 0\.04.*lower target_kl"):
        calibrate(lambda a: 0.01 * min(a, 2.0) ** 2, 0.5, max_alpha=16.0)


def test_exhausted_evaluations_return_the_best_within_budget_or_fail_without_one(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        result = calibrate(lambda a: 0.01 * a**2, 0.5, max_evaluations=2)
    assert result.alpha == 2.0 and result.kl == pytest.approx(0.04)
    assert "after 2 evaluations" in caplog.text
    with pytest.raises(ValueError, match=r"no alpha within the KL budget.*raise max_evaluations"):
        calibrate(lambda a: 1e4 * a**2, 0.5, max_evaluations=2)


def test_a_kl_falling_as_alpha_grows_is_logged(caplog):
    with caplog.at_level(logging.WARNING, LOGGER), pytest.raises(ValueError, match="cannot be reached"):
        calibrate(lambda a: 0.01 * a**2 if a <= 4 else 0.01, 0.5)
    assert "not monotone" in caplog.text


def test_an_out_of_reach_budget_can_settle_for_the_strongest_edit_within_it(caplog):
    """KL peaks at 0.16 (alpha 4) then falls: the largest KL within budget wins, not the largest alpha."""
    curve = lambda a: 0.01 * a**2 if a <= 4 else 0.16 / (a - 3)  # noqa: E731
    with caplog.at_level(logging.WARNING, LOGGER):
        result = calibrate(curve, 0.5, strongest_if_out_of_reach=True)
    within = [(a, k) for a, k in result.evaluations if k <= 0.5]
    assert not result.in_band and result.to_dict()["in_band"] is False
    assert result.kl == max(k for _, k in within) and result.kl == pytest.approx(curve(result.alpha))
    assert result.alpha < max(a for a, _ in within)  # alpha 64 is within budget but weaker
    assert "out of reach; the strongest edit measured within it" in caplog.text


def test_a_budget_met_in_band_says_so():
    assert calibrate(lambda a: 0.01 * a**2, 0.5, strongest_if_out_of_reach=True).in_band
    assert not calibrate(lambda a: 0.01 * a**2, 0.5, max_evaluations=2).in_band


def test_a_nan_kl_is_an_error():
    with pytest.raises(ValueError, match="NaN KL"):
        calibrate(lambda a: math.nan, 0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_kl": 0.0}, "target_kl must be > 0"),
        ({"target_kl": -1.0}, "target_kl must be > 0"),
        ({"target_kl": math.nan}, "target_kl must be a finite"),
        ({"target_kl": math.inf}, "target_kl must be a finite"),
        ({"target_kl": True}, "target_kl must be a finite"),
        ({"tolerance": 0.0}, "tolerance must be a number in"),
        ({"tolerance": 1.0}, "tolerance must be a number in"),
        ({"start_alpha": 0.0}, "start_alpha must be > 0"),
        ({"max_alpha": 0.5}, "start_alpha .* must not exceed max_alpha"),
        ({"max_evaluations": 0}, "max_evaluations must be a positive int"),
        ({"max_evaluations": 2.5}, "max_evaluations must be a positive int"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(options, message):
    arguments = {"target_kl": 0.5, **options}
    target = arguments.pop("target_kl")
    with pytest.raises(ValueError, match=message):
        calibrate(lambda a: a, target, **arguments)


def test_an_edit_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="hpr_edit / additive_edit"):
        kl_calibration(None, CurveNeutral(lambda a: a), "hpr", 0.5)


# ---------------------------------------------------------------- tiny models, both edits


@pytest.fixture
def tiny_hpr():
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2], init_weights=False))
    return model.eval()


PARAGRAPHS = load_neutral_paragraphs()[:3]


def remeasure(model, alpha, edit) -> float:
    neutral = NeutralText(CharTokenizer(bos=2), PARAGRAPHS)
    neutral.compute_reference(model, lambda: edit(0.0))
    return neutral.measure(model, lambda: edit(alpha)).kl


def test_hpr_and_additive_edits_of_a_tiny_model_are_calibrated(tiny_hpr):
    neutral = NeutralText(CharTokenizer(bos=2), PARAGRAPHS)
    assert not neutral.has_reference  # kl_calibration computes it with the adapter off
    hpr = kl_calibration(tiny_hpr, neutral, hpr_edit(tiny_hpr), 0.01)
    assert_promise_kept(hpr)
    assert remeasure(tiny_hpr, hpr.alpha, hpr_edit(tiny_hpr)) == pytest.approx(hpr.kl, rel=1e-5)
    vectors = {1: 0.02 * torch.randn(32, generator=torch.Generator().manual_seed(0))}
    additive = kl_calibration(tiny_hpr, neutral, additive_edit(tiny_hpr, vectors), 0.005)
    assert_promise_kept(additive)
    # the additive edit runs with the adapter off: at alpha 0 it is the unedited model
    assert remeasure(tiny_hpr, 0.0, additive_edit(tiny_hpr, vectors)) == pytest.approx(0.0, abs=1e-7)


def test_calibrate_alpha_for_each_method_and_its_errors(tiny_hpr):
    tokenizer = CharTokenizer(bos=2)
    alpha = calibrate_alpha(tiny_hpr, tokenizer, 0.01, paragraphs=PARAGRAPHS, layers=[1, 2])
    assert 0.9 < alpha < 2.0  # KL 0.0087 at alpha 1, 0.021 at alpha 2 on this model
    vectors = {2: 0.02 * torch.randn(32, generator=torch.Generator().manual_seed(1))}
    plain = make_tiny_causal_lm("llama")
    result = calibrate_on_neutral(
        plain, tokenizer, 0.005, method="additive", vectors=vectors, paragraphs=PARAGRAPHS
    )
    assert_promise_kept(result)
    with pytest.raises(ValueError, match="'hpr' or 'additive'"):
        calibrate_alpha(tiny_hpr, tokenizer, 0.01, method="lora", paragraphs=PARAGRAPHS)
    with pytest.raises(ValueError, match="needs vectors"):
        calibrate_alpha(tiny_hpr, tokenizer, 0.01, method="additive", paragraphs=PARAGRAPHS)
    with pytest.raises(ValueError, match="method='additive'"):
        calibrate_alpha(tiny_hpr, tokenizer, 0.01, vectors=vectors, paragraphs=PARAGRAPHS)
    with pytest.raises(ValueError, match="keys of vectors"):
        calibrate_alpha(tiny_hpr, tokenizer, 0.01, method="additive", vectors=vectors, layers=[1])
    with pytest.raises(TypeError, match="HPR adapter"):
        calibrate_alpha(plain, tokenizer, 0.01, paragraphs=PARAGRAPHS)
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_alpha(tiny_hpr, tokenizer, 0.01, tolerance=2.0)


def test_the_heldout_corpus_is_new_prose_of_the_same_size():
    calibration, heldout = load_neutral_paragraphs(), load_neutral_paragraphs(which="heldout")
    assert len(heldout) >= 15 and 1500 <= sum(len(p.split()) for p in heldout) <= 2500
    first_words = {" ".join(p.split()[:3]) for p in calibration}
    assert not first_words & {" ".join(p.split()[:3]) for p in heldout}
    sentences = {s.strip() for p in calibration for s in p.split(".")}
    assert not sentences & {s.strip() for p in heldout for s in p.split(".")} - {""}
    with pytest.raises(ValueError, match="'calibration', 'heldout'"):
        load_neutral_paragraphs(which="test")


# ---------------------------------------------------------------- the bundled SmolLM2


@pytest.mark.slow
def test_a_budget_calibrated_on_one_corpus_holds_on_the_heldout_one(smollm2):
    """HPR editors (random probes and angle nets) on three middle blocks of SmolLM2."""
    base, tokenizer = smollm2
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[10, 14, 18], init_weights=False)).eval()
    try:
        target = 0.05
        seen = calibrate_on_neutral(model, tokenizer, target, paragraphs=load_neutral_paragraphs()[:4])
        assert_promise_kept(seen)
        heldout = NeutralText(tokenizer, load_neutral_paragraphs(which="heldout")[:4])
        heldout.compute_reference(model, model.disable_adapter)
        kl = heldout.measure(model, lambda: hpr_edit(model)(seen.alpha)).kl
        assert 0.5 * target <= kl <= 1.6 * target, (seen, kl)
    finally:
        model.unload()
