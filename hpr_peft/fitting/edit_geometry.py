"""Where a fitted editor turns its tokens: the rotation direction and the dimensions it leaves alone.

An adapter config may ask for a direction other than the probe's (``rotation_direction=
"mean_difference"``: ``u = mean(x⁺) − mean(x⁻)``, normalised) and for ``exclude_massive_dims = k``
dimensions left out of the rotation (the ``k`` largest mean ``h_i²`` over positives and negatives).
Both are measured per layer on the raw training activations (:class:`LayerGeometry`). The angle
targets are made consistent with them (:func:`target_inputs`): each target is computed on the vectors
with the protected dimensions zeroed (the part of ``h`` the edit turns), and the probe-consistent
target measures angles to the rotation direction (``u`` in place of ``w``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpr_peft.fitting.activations import PairActivations
from hpr_peft.rotation import massive_dimensions, mean_difference_direction, zero_dims
from hpr_peft.tuner.config import ROTATION_DIRECTIONS

__all__ = ["LayerGeometry", "check_rotation_options", "layer_geometries", "target_inputs"]


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's rotation: ``direction`` (unit ``(d,)``; None = the probe's) and ``protected``
    dimensions (int64 ``(k,)``; None = none)."""

    direction: torch.Tensor | None = None
    protected: torch.Tensor | None = None


def check_rotation_options(
    rotation_direction: object, exclude_massive_dims: object, hidden_size: int
) -> None:
    """Raise ``ValueError`` naming the fix for an unknown direction or an unusable ``k``."""
    if rotation_direction not in ROTATION_DIRECTIONS:
        raise ValueError(
            f"rotation_direction must be one of {list(ROTATION_DIRECTIONS)}, got {rotation_direction!r}."
        )
    k = exclude_massive_dims
    if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k < hidden_size):
        raise ValueError(
            f"exclude_massive_dims must be an int in [0, {hidden_size}) (below the hidden size), got {k!r}."
        )


def layer_geometries(
    acts: PairActivations,
    layers: Sequence[int],
    rotation_direction: str = "probe",
    exclude_massive_dims: int = 0,
) -> list[LayerGeometry]:
    """The :class:`LayerGeometry` of each of ``layers`` from the raw activations ``acts`` (CPU)."""
    check_rotation_options(rotation_direction, exclude_massive_dims, acts.hidden_size)
    if rotation_direction == "probe" and exclude_massive_dims == 0:
        return [LayerGeometry() for _ in layers]
    out = []
    for layer in layers:
        positives, negatives = acts.pair_tensors(layer)
        positives, negatives = positives.float(), negatives.float()
        direction = None
        if rotation_direction == "mean_difference":
            direction = mean_difference_direction(positives, negatives)
        protected = None
        if exclude_massive_dims:
            protected = massive_dimensions(torch.cat([positives, negatives]), exclude_massive_dims)
        out.append(LayerGeometry(direction, protected))
    return out


def target_inputs(
    negatives: torch.Tensor, positives: torch.Tensor, probe: torch.Tensor | None, geometry: LayerGeometry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x⁻, x⁺, direction)`` as an angle target must see them: the direction the edit turns toward
    (``u`` or the probe), and all three with the protected dimensions zeroed."""
    direction = probe if geometry.direction is None else geometry.direction.to(negatives.device)
    if geometry.protected is None:
        return negatives, positives, direction
    protected = geometry.protected.to(negatives.device)
    direction = None if direction is None else zero_dims(direction, protected)
    return zero_dims(negatives, protected), zero_dims(positives, protected), direction
