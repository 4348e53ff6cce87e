"""Side-effect budgets: the strength ``alpha`` at which an edit costs a chosen KL on neutral text.

Comparing methods at one ``alpha`` compares unlike things (an HPR ``alpha`` of 1 and an additive ``alpha``
of 1 move the model by very different amounts). Comparing them at one *side effect* is fair: each gets
the strongest ``alpha`` whose mean KL(edited ‖ unedited) per token on the neutral corpus
(:mod:`hpr_peft.evaluation.side_effects`) stays within ``target_kl``.

:func:`kl_calibration` searches ``alpha ≥ 0`` assuming KL grows with ``alpha`` (KL(0) = 0): it raises
``alpha`` from ``start_alpha`` (aiming by KL ∝ ``alpha²``, at most doubling) until the KL passes the
target (or shrinks it while the KL is above), then narrows the bracket (interpolating ``log KL``
against ``log alpha``, which is near linear: KL grows like ``alpha²`` for small edits) until a
measured KL lies in ``[target·(1 − tolerance), target]``. The budget is a promise: the returned ``alpha`` is always one whose *measured* KL is within it. A KL that
falls as ``alpha`` grows (an HPR angle ``alpha·f(h)`` past π turns tokens back) is logged as a warning.

>>> alpha = calibrate_alpha(peft_model, tokenizer, target_kl=0.05)          # HPR adapter
>>> alpha = calibrate_alpha(model, tokenizer, 0.05, method="additive", vectors=vectors)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import nn

from hpr_peft.evaluation.baselines import additive_steering
from hpr_peft.evaluation.side_effects import NeutralText, load_neutral_paragraphs
from hpr_peft.runtime.model_io import stack_contexts, unedited_context
from hpr_peft.tuner.control import edit_settings, hpr_tuner

__all__ = [
    "EditFactory",
    "KLCalibration",
    "additive_edit",
    "calibrate_alpha",
    "calibrate_on_neutral",
    "hpr_edit",
    "kl_calibration",
]

logger = logging.getLogger(__name__)

EditFactory = Callable[[float], AbstractContextManager[Any]]
"""``alpha -> context manager`` putting the model in the edited state of strength ``alpha``."""

# a later point may fall below an earlier one by this much before monotonicity counts as broken
_MONOTONE_SLACK = 0.1
# the bracket is given up when its ends are this close (relative): KL jumps there, the band is missed
_SMALLEST_BRACKET = 1e-6


def hpr_edit(model: Any, layers: Sequence[int] | None = None, adapter_name: str | None = None) -> EditFactory:
    """Edit factory of an HPR adapter: ``alpha -> edit_settings(model, alpha=alpha, layers=layers)``."""
    hpr_tuner(model)  # a model without an HPR adapter fails here, not in the middle of a search
    chosen = None if layers is None else list(layers)

    def edit(alpha: float) -> AbstractContextManager[Any]:
        return edit_settings(model, alpha=alpha, layers=chosen, adapter_name=adapter_name)

    return edit


def additive_edit(model: nn.Module, vectors: dict[int, torch.Tensor]) -> EditFactory:
    """Edit factory of additive steering: the model with its adapter off, plus ``alpha · vectors``."""
    if not isinstance(vectors, dict) or not vectors:
        raise ValueError(
            "vectors must be a non-empty dict {layer index: (d,) tensor}: see "
            "hpr_peft.evaluation.baselines.mean_difference_vectors."
        )

    def edit(alpha: float) -> AbstractContextManager[Any]:
        steering = functools.partial(additive_steering, model, vectors, alpha=alpha)
        return stack_contexts(unedited_context(model), steering)()

    return edit


@dataclass(frozen=True)
class KLCalibration:
    """The calibrated ``alpha``, its measured KL, the target, and every ``(alpha, kl)`` measured in order."""

    alpha: float
    kl: float
    target_kl: float
    evaluations: tuple[tuple[float, float], ...]
    reused: int = 0  # how many of ``evaluations`` came from ``known`` (measured by an earlier search)
    in_band: bool = True  # False: the budget was out of reach or the search stopped short of the band

    @property
    def passes(self) -> int:
        """Neutral-text passes this search ran."""
        return len(self.evaluations) - self.reused

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "kl": self.kl,
            "target_kl": self.target_kl,
            "evaluations": [[a, k] for a, k in self.evaluations],
            "reused": self.reused,
            "in_band": self.in_band,
        }


@dataclass
class _Search:
    """The bracket of a calibration: ``low`` the largest measured alpha within budget, ``high`` the
    smallest over it (``(alpha, kl)`` pairs, None until one is measured)."""

    target: float
    floor: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    low: tuple[float, float] | None = None
    high: tuple[float, float] | None = None

    def record(self, alpha: float, kl: float) -> None:
        self._check_monotone(alpha, kl)
        self.evaluations.append((alpha, kl))
        if kl <= self.target:
            if self.low is None or alpha > self.low[0]:
                self.low = (alpha, kl)
        elif self.high is None or alpha < self.high[0]:
            self.high = (alpha, kl)

    def _check_monotone(self, alpha: float, kl: float) -> None:
        for a, k in self.evaluations:
            smaller, larger = ((a, k), (alpha, kl)) if a < alpha else ((alpha, kl), (a, k))
            if smaller[1] > larger[1] * (1 + _MONOTONE_SLACK) + 1e-12:
                logger.warning(
                    "KL is not monotone in alpha: KL %.4g at alpha %.4g but %.4g at alpha %.4g; the "
                    "calibration goes on assuming it is (an HPR angle alpha*f(h) past pi turns tokens "
                    "back: lower max_alpha).",
                    smaller[1], smaller[0], larger[1], larger[0],
                )  # fmt: skip
                return

    @property
    def done(self) -> bool:
        return self.low is not None and self.low[1] >= self.floor

    def next_alpha(self, max_alpha: float) -> float | None:
        """The next alpha to measure, or None when no new point can help."""
        aim = (self.target + self.floor) / 2  # the middle of the band
        if self.high is None:
            assert self.low is not None
            low_alpha, low_kl = self.low
            if low_alpha >= max_alpha:
                return None
            # aim by KL ∝ alpha² (small edits), stepping at most 2× and at least 1.25×
            ratio = math.sqrt(aim / low_kl) if low_kl > 0 else 2.0
            return min(low_alpha * min(max(ratio, 1.25), 2.0), max_alpha)
        if self.low is None:
            high_alpha, high_kl = self.high
            ratio = math.sqrt(aim / high_kl) if math.isfinite(high_kl) else 0.0
            return high_alpha * min(max(ratio, 1 / 16), 1 / 2)
        (a0, k0), (a1, k1) = self.low, self.high
        if a1 / a0 < 1 + _SMALLEST_BRACKET:
            return None
        t = 0.5
        if 0 < k0 < k1 and math.isfinite(k1):
            t = min(max((math.log(aim) - math.log(k0)) / (math.log(k1) - math.log(k0)), 0.1), 0.9)
        return a0 * (a1 / a0) ** t


def _check_inputs(
    target_kl: float, tolerance: float, start_alpha: float, max_alpha: float, max_evaluations: int
) -> None:
    for name, value in (("target_kl", target_kl), ("start_alpha", start_alpha), ("max_alpha", max_alpha)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not 0 < tolerance < 1:
        raise ValueError(
            f"tolerance must be a number in (0, 1) (0.1: a KL within 10% below the target), got {tolerance!r}."
        )
    if start_alpha > max_alpha:
        raise ValueError(f"start_alpha ({start_alpha}) must not exceed max_alpha ({max_alpha}).")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise ValueError(f"max_evaluations must be a positive int, got {max_evaluations!r}.")


def _measure(model: nn.Module, neutral: NeutralText, edit: EditFactory, alpha: float) -> float:
    kl = float(neutral.measure(model, lambda: edit(alpha)).kl)
    if math.isnan(kl):
        raise ValueError(
            f"the edit at alpha {alpha:.4g} gives a NaN KL: the edited model's outputs are not finite."
        )
    return kl


def kl_calibration(
    model: nn.Module,
    neutral: NeutralText,
    edit: EditFactory,
    target_kl: float,
    *,
    tolerance: float = 0.1,
    start_alpha: float = 1.0,
    max_alpha: float = 64.0,
    max_evaluations: int = 24,
    known: Sequence[tuple[float, float]] = (),
    strongest_if_out_of_reach: bool = False,
) -> KLCalibration:
    """The largest measured ``alpha`` with KL ≤ ``target_kl``, found once one lies within
    ``[target_kl·(1 − tolerance), target_kl]`` (module docstring).

    ``known`` are ``(alpha, kl)`` points of the same edit on the same neutral text measured before
    (say while calibrating it to another budget): the search starts from them and measures only what
    they leave open, so a second budget often costs one pass or none.

    ``neutral`` is measured as is; without a reference yet, it gets one from ``unedited_context(model)``
    (the adapter off). Raises ``ValueError`` when even ``max_alpha`` stays below the band (the edit
    saturates), or when ``max_evaluations`` pass without any alpha within budget; when they pass with
    one, the best is returned with a logged warning. With ``strongest_if_out_of_reach`` a budget out
    of reach returns, instead of raising, the measured alpha with the largest KL within it
    (``in_band=False``): the strongest edit the budget allows, for comparisons "at KL ≤ target".
    """
    _check_inputs(target_kl, tolerance, start_alpha, max_alpha, max_evaluations)
    if not callable(edit):
        raise TypeError("edit must be a callable alpha -> context manager: see hpr_edit / additive_edit.")
    if not neutral.has_reference:
        neutral.compute_reference(model, unedited_context(model))
    search = _Search(target=float(target_kl), floor=float(target_kl) * (1 - tolerance))
    for known_alpha, known_kl in known:
        search.record(float(known_alpha), float(known_kl))
    reused = len(search.evaluations)
    alpha: float | None = float(start_alpha)
    if reused:
        alpha = None if search.done else search.next_alpha(max_alpha)
    while alpha is not None and not search.done and len(search.evaluations) - reused < max_evaluations:
        search.record(alpha, _measure(model, neutral, edit, alpha))
        alpha = None if search.done else search.next_alpha(max_alpha)
    return _result(search, max_alpha, reused, strongest_if_out_of_reach)


def _result(search: _Search, max_alpha: float, reused: int, strongest_if_out_of_reach: bool) -> KLCalibration:
    low, evaluations = search.low, tuple(search.evaluations)
    out_of_reach = search.high is None and low is not None and low[0] >= max_alpha and not search.done
    if out_of_reach and strongest_if_out_of_reach:
        return _strongest_within_budget(search, reused)
    if out_of_reach:
        raise ValueError(
            f"the KL budget {search.target:.4g} cannot be reached: KL at max_alpha {max_alpha:g} is "
            f"{low[1]:.4g}; the edit saturates: lower target_kl, raise max_alpha, or edit more layers."
        )
    if low is None:
        smallest = min(evaluations)
        raise ValueError(
            f"no alpha within the KL budget {search.target:.4g} after {len(evaluations)} evaluations (the "
            f"smallest, {smallest[0]:.4g}, gave KL {smallest[1]:.4g}): raise max_evaluations or lower start_alpha."
        )
    if not search.done:
        logger.warning(
            "KL calibration stopped after %d evaluations short of the band [%.4g, %.4g]: alpha %.4g with "
            "KL %.4g is the strongest edit measured within budget.",
            len(evaluations), search.floor, search.target, low[0], low[1],
        )  # fmt: skip
    return KLCalibration(
        alpha=low[0], kl=low[1], target_kl=search.target, evaluations=evaluations, reused=reused,
        in_band=search.done,
    )  # fmt: skip


def _strongest_within_budget(search: _Search, reused: int) -> KLCalibration:
    """The measured point with the largest KL within the budget (not the largest alpha: past π an
    HPR angle turns tokens back, so KL can fall as alpha grows)."""
    alpha, kl = max((p for p in search.evaluations if p[1] <= search.target), key=lambda p: p[1])
    logger.warning(
        "the KL budget %.4g is out of reach; the strongest edit measured within it is alpha %.4g with "
        "KL %.4g.",
        search.target, alpha, kl,
    )  # fmt: skip
    return KLCalibration(
        alpha=alpha, kl=kl, target_kl=search.target, evaluations=tuple(search.evaluations),
        reused=reused, in_band=False,
    )  # fmt: skip


def calibrate_on_neutral(
    model: nn.Module,
    tokenizer: Any,
    target_kl: float,
    *,
    method: str = "hpr",
    layers: Sequence[int] | None = None,
    vectors: dict[int, torch.Tensor] | None = None,
    paragraphs: Sequence[str] | None = None,
    tolerance: float = 0.1,
    max_alpha: float = 64.0,
    adapter_name: str | None = None,
) -> KLCalibration:
    """:func:`kl_calibration` of an HPR adapter (``method="hpr"``, optionally only ``layers``) or of
    additive steering (``method="additive"`` with ``vectors``) on ``paragraphs`` (default: the bundled
    calibration corpus), the reference being the model with its adapter off."""
    _check_inputs(target_kl, tolerance, 1.0, max_alpha, 1)
    edit = _edit_for(model, method, layers, vectors, adapter_name)
    texts = load_neutral_paragraphs() if paragraphs is None else paragraphs
    neutral = NeutralText(tokenizer, texts)
    neutral.compute_reference(model, unedited_context(model))
    return kl_calibration(model, neutral, edit, target_kl, tolerance=tolerance, max_alpha=max_alpha)


def _edit_for(
    model: nn.Module,
    method: str,
    layers: Sequence[int] | None,
    vectors: dict[int, torch.Tensor] | None,
    adapter_name: str | None,
) -> EditFactory:
    if method == "hpr":
        if vectors is not None:
            raise ValueError(
                "vectors are the additive edit's: pass method='additive' with them, or drop them."
            )
        return hpr_edit(model, layers, adapter_name)
    if method == "additive":
        if vectors is None:
            raise ValueError(
                "method='additive' needs vectors: see hpr_peft.evaluation.baselines.mean_difference_vectors."
            )
        if layers is not None:
            raise ValueError(
                "layers choose HPR's blocks; the additive edit's layers are the keys of vectors."
            )
        return additive_edit(model, vectors)
    raise ValueError(f"method must be 'hpr' or 'additive', got {method!r}.")


def calibrate_alpha(
    model: nn.Module,
    tokenizer: Any,
    target_kl: float,
    *,
    method: str = "hpr",
    layers: Sequence[int] | None = None,
    vectors: dict[int, torch.Tensor] | None = None,
    paragraphs: Sequence[str] | None = None,
    tolerance: float = 0.1,
    max_alpha: float = 64.0,
    adapter_name: str | None = None,
) -> float:
    """The ``alpha`` at which the edit costs ``target_kl`` nats of KL per token on neutral text (at
    most, and at least ``target_kl·(1 − tolerance)``): :func:`calibrate_on_neutral`'s ``alpha``."""
    calibration = calibrate_on_neutral(
        model, tokenizer, target_kl, method=method, layers=layers, vectors=vectors,
        paragraphs=paragraphs, tolerance=tolerance, max_alpha=max_alpha, adapter_name=adapter_name,
    )  # fmt: skip
    return calibration.alpha
