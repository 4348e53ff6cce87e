"""What the angle nets learn: the angle each negative activation should be turned by.

A target is a strategy with one method, ``pair_targets(negatives, positives, probe)``, giving one
angle per pair from the raw activations of one layer. ``probe`` is the direction the edit turns toward
(the probe's ``w``, or the stored ``u`` of ``rotation_direction="mean_difference"``); with
``exclude_massive_dims`` the trainer passes all three with the protected dimensions zeroed
(:func:`hpr_peft.fitting.edit_geometry.target_inputs`), so every target measures the part of ``h``
the edit turns. Targets that need no probe (``needs_probe``
False) are trained jointly with the probe in one stage; the others train the probe first and then the
angle nets on the targets of that fixed probe (:func:`hpr_peft.fitting.training.train_editors`).

- ``"paper"``: the paper's ``angle(x⁻, x⁺)``, the full angle between the two answers' activations.
- ``"probe"``: the probe-consistent ``θ* = max(0, ∠(x⁻, ŵ) − ∠(x⁺, ŵ))``
  (:func:`hpr_peft.rotation.probe_consistent_angle`), the rotation in the edit's own plane that gives
  the negative its positive's probe coordinate. On models whose hidden states share a few massive
  dimensions (Gemma-3) the paper's target is 10-30x larger and the edit overshoots (docs/math.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hpr_peft.rotation import angle_between, probe_consistent_angle

__all__ = ["ANGLE_TARGETS", "AngleTarget", "PaperAngleTarget", "ProbeAngleTarget", "angle_target_named"]


class AngleTarget(Protocol):
    """Per-pair target angles of one layer from its raw activations."""

    name: str
    needs_probe: bool

    def pair_targets(
        self, negatives: torch.Tensor, positives: torch.Tensor, probe: torch.Tensor | None
    ) -> torch.Tensor:
        """``(N,)`` float32 angles in radians for ``(N, d)`` negatives / positives and probe ``(d,)``."""
        ...


@dataclass(frozen=True)
class PaperAngleTarget:
    """The paper's target: ``angle(x⁻, x⁺)``."""

    name: str = "paper"
    needs_probe: bool = False

    def pair_targets(
        self, negatives: torch.Tensor, positives: torch.Tensor, probe: torch.Tensor | None
    ) -> torch.Tensor:
        return angle_between(negatives, positives).float()


@dataclass(frozen=True)
class ProbeAngleTarget:
    """The probe-consistent target ``θ*`` of the fitted probe."""

    name: str = "probe"
    needs_probe: bool = True

    def pair_targets(
        self, negatives: torch.Tensor, positives: torch.Tensor, probe: torch.Tensor | None
    ) -> torch.Tensor:
        if probe is None:
            raise ValueError("the probe-consistent angle target needs the fitted probe.")
        return probe_consistent_angle(negatives, positives, probe).float()


ANGLE_TARGETS: dict[str, AngleTarget] = {"paper": PaperAngleTarget(), "probe": ProbeAngleTarget()}


def angle_target_named(name: object) -> AngleTarget:
    """The registered target called ``name``; a clear error for anything else."""
    if not isinstance(name, str) or name not in ANGLE_TARGETS:
        raise ValueError(
            f"angle_target must be one of {list(ANGLE_TARGETS)} ('paper': the paper's angle(x⁻, x⁺); "
            f"'probe': the probe-consistent angle θ*), got {name!r}."
        )
    return ANGLE_TARGETS[name]
