"""Edit candidates measured at a side-effect budget: calibrate α to a KL target on neutral text, then
score TruthfulQA at that α. Every method gets exactly the same treatment (the fair fight)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hpr_peft.evaluation.calibration import EditFactory, KLCalibration, kl_calibration
from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.evaluation.side_effects import NeutralText
from hpr_peft.evaluation.truthfulqa import TruthfulQAScorer
from hpr_peft.experiment.methods import EditCandidate
from hpr_peft.runtime.model_io import ContextFactory, stack_contexts, unedited_context
from hpr_peft.runtime.replay import BlockInputs, record_block_inputs, replay_from_block

logger = logging.getLogger(__name__)

__all__ = ["BudgetedMeasure", "Measurement", "Replay", "best_per_target", "record_replay", "result_key"]


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
            "in_band": self.calibration.in_band,
            "calibration_evaluations": len(self.calibration.evaluations),
            "calibration_passes": self.calibration.passes,
            "mc1": self.result.mc1_mean,
            "mc2": self.result.mc2_mean,
            "delta_mc2": self.result.mc2_mean - base.mc2_mean,
            "n": len(self.result.question_ids),
        }


@dataclass
class Replay:
    """What entered block ``block`` in each pass the sweep repeats, recorded once unedited, so that a
    candidate editing only blocks ≥ ``block`` skips the blocks below (:mod:`hpr_peft.runtime.replay`)."""

    model: nn.Module
    block: int
    records: dict[str, BlockInputs]

    def covers(self, candidate: EditCandidate) -> bool:
        return min(candidate.layers) >= self.block

    def context(self, edit: ContextFactory, name: str) -> ContextFactory:
        """``edit`` entered first, then the replay of pass ``name`` (the order replay needs)."""
        record = self.records[name]
        return stack_contexts(edit, lambda: replay_from_block(self.model, record))

    def edit(self, edit: EditFactory, name: str) -> EditFactory:
        """``edit`` with the replay of pass ``name`` around every strength."""
        return lambda alpha: self.context(lambda: edit(alpha), name)()


def record_replay(model: nn.Module, block: int, passes: dict[str, Callable[[ContextFactory], Any]]) -> Replay:
    """Run each deterministic pass once on the unedited model, recording the inputs of ``block``.

    ``passes[name](context)`` runs pass ``name`` inside ``context()`` (a scorer built with
    ``packed=True``, or a neutral text's ``measure``).
    """
    records = {}
    for name, run in passes.items():
        with record_block_inputs(model, block) as record:
            run(unedited_context(model))
        records[name] = record
    return Replay(model, block, records)


@dataclass
class BudgetedMeasure:
    """Calibrates and scores candidates on one fold's validation data, remembering what it measured."""

    model: nn.Module
    neutral: NeutralText
    tolerance: float
    max_alpha: float
    replay: Replay | None = None
    measured: dict[tuple[Any, ...], Measurement] = field(default_factory=dict)
    # every (alpha, kl) measured per candidate: a later budget or stage starts from them
    kl_points: dict[tuple[Any, ...], list[tuple[float, float]]] = field(default_factory=dict)

    def forget_kl_points(self, method: str) -> None:
        """Drop the KL points of ``method``'s candidates (their editors or vectors were retrained)."""
        for key in [k for k in self.kl_points if k[0] == method]:
            del self.kl_points[key]

    def _replays(self, candidate: EditCandidate) -> bool:
        return self.replay is not None and self.replay.covers(candidate)

    def calibrate(self, candidate: EditCandidate, target_kl: float) -> KLCalibration | None:
        """α at which ``candidate`` meets ``target_kl`` on the neutral text; when no α reaches it, the
        measured α with the largest KL within it (``in_band=False``: compared "at KL ≤ target"); None
        when no α stays within it."""
        edit = candidate.edit(self.model)
        if self._replays(candidate):
            assert self.replay is not None
            edit = self.replay.edit(edit, "neutral")
        points = self.kl_points.setdefault(candidate.key, [])
        try:
            calibration = kl_calibration(
                self.model,
                self.neutral,
                edit,
                target_kl,
                tolerance=self.tolerance,
                max_alpha=self.max_alpha,
                known=points,
                strongest_if_out_of_reach=True,
            )
        except ValueError as exc:
            logger.warning("%s %s at KL %g: %s", candidate.method, list(candidate.layers), target_kl, exc)
            return None
        points[:] = calibration.evaluations
        return calibration

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
                if self._replays(candidate):
                    assert self.replay is not None
                    context = self.replay.context(context, stage)
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
