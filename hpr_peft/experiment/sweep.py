"""Edit candidates measured at a side-effect budget: calibrate α to a KL target on neutral text, then
score TruthfulQA at that α. Every method gets exactly the same treatment (the fair fight)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hpr_peft.evaluation.calibration import KLCalibration, kl_calibration
from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.evaluation.side_effects import NeutralText
from hpr_peft.evaluation.truthfulqa import TruthfulQAScorer
from hpr_peft.experiment.methods import EditCandidate

logger = logging.getLogger(__name__)

__all__ = ["BudgetedMeasure", "Measurement", "best_per_target", "result_key"]


def result_key(method: str, target_kl: float) -> str:
    """The name of a method's result at a budget in ``results.json``, e.g. ``"hpr@kl0.05"``."""
    return f"{method}@kl{target_kl:g}"


@dataclass
class Measurement:
    """A candidate at a KL target: the calibrated α (None: the budget was out of reach) and its scores."""

    candidate: EditCandidate
    target_kl: float
    calibration: KLCalibration | None
    result: MCResult | None
    stage: str

    @property
    def reached(self) -> bool:
        return self.calibration is not None and self.result is not None

    @property
    def alpha(self) -> float:
        assert self.calibration is not None
        return self.calibration.alpha

    def row(self, fold: int, unedited: MCResult) -> dict[str, Any]:
        """The JSON row of the validation sweep (``mc1``/``mc2`` None when the budget was out of reach)."""
        row: dict[str, Any] = {
            "method": self.candidate.method,
            "layers": list(self.candidate.layers),
            "target_kl": self.target_kl,
            "fold": fold,
            "split": "validation",
            "stage": self.stage,
            "reached": self.reached,
            "label": f"{self.candidate.method} {list(self.candidate.layers)}",
        }
        if not self.reached:
            return row
        assert self.calibration is not None and self.result is not None
        base = unedited.subset(self.result.question_ids)
        return {
            **row,
            "alpha": self.calibration.alpha,
            "kl": self.calibration.kl,
            "calibration_evaluations": len(self.calibration.evaluations),
            "mc1": self.result.mc1_mean,
            "mc2": self.result.mc2_mean,
            "delta_mc2": self.result.mc2_mean - base.mc2_mean,
            "n": len(self.result.question_ids),
        }


@dataclass
class BudgetedMeasure:
    """Calibrates and scores candidates on one fold's validation data, remembering what it measured."""

    model: nn.Module
    neutral: NeutralText
    tolerance: float
    max_alpha: float
    measured: dict[tuple[Any, ...], Measurement] = field(default_factory=dict)

    def calibrate(self, candidate: EditCandidate, target_kl: float) -> KLCalibration | None:
        """α at which ``candidate`` meets ``target_kl`` on the neutral text (None: out of reach)."""
        try:
            return kl_calibration(
                self.model,
                self.neutral,
                candidate.edit(self.model),
                target_kl,
                tolerance=self.tolerance,
                max_alpha=self.max_alpha,
            )
        except ValueError as exc:
            logger.warning("%s %s at KL %g: %s", candidate.method, list(candidate.layers), target_kl, exc)
            return None

    def measure(
        self, candidate: EditCandidate, target_kl: float, scorer: TruthfulQAScorer, stage: str
    ) -> Measurement:
        """``candidate`` calibrated to ``target_kl`` and scored by ``scorer`` (cached per stage)."""
        key = (candidate.key, target_kl, stage)
        if key not in self.measured:
            calibration = self.calibrate(candidate, target_kl)
            result = None
            if calibration is not None:
                context = candidate.at(self.model, calibration.alpha)
                result = scorer.score(self.model, context=context, progress=False)
            self.measured[key] = Measurement(candidate, target_kl, calibration, result, stage)
        return self.measured[key]


def best_per_target(
    measurements: Sequence[Measurement], targets: Sequence[float]
) -> dict[float, Measurement | None]:
    """Per KL target the reached measurement with the best validation MC2 (then MC1); None if none."""
    best: dict[float, Measurement | None] = {}
    for target in targets:
        reached = [m for m in measurements if m.target_kl == target and m.reached]
        best[target] = max(
            reached,
            key=lambda m: (m.result.mc2_mean, m.result.mc1_mean),  # type: ignore[union-attr]
            default=None,
        )
    return best
