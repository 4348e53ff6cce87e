"""Run-time control of a fitted HPR model: temporary settings and probe monitoring.

``edit_settings(model, alpha=..., layers=...)`` changes the strength and/or which blocks edit for the
duration of a ``with`` block, without rebuilding anything, and restores the previous settings on exit
(also when the block raises). Persistent equivalents: ``HPRModel.set_alpha`` and
``HPRModel.set_selected_layers`` (these also update the saved config), and ``HPRModel.configured``, which
sets both for a ``with`` block (say, to save or train at a chosen strength) and restores them.

``monitor(model)`` runs the probes *without editing* (the model then computes exactly the base
model's outputs) and records, per edited block: how many eligible tokens there were, how many the
probe flagged, the probe scores ``w·h`` of the eligible tokens and the predicted angles ``g·f(h)`` (radians,
before ``alpha``) of the flagged ones. Eligible tokens are real (non-padding) tokens the editor may
touch: padding is never counted, nor the sequence start when ``skip_sequence_start`` is on, nor
non-final positions with ``edit_positions="last"``. All layers holding the adapter are monitored,
including ones switched off by ``selected_layers``.

``model`` may be a ``PeftModel`` or the ``HPRModel`` itself.

Scope: both act on the current thread (context) only, never on other threads using the same model,
and they nest: settings of an inner block override an outer one until it exits; blocks exited in any
order leave exactly the remaining blocks in force (see :mod:`hpr_peft.tuner.run_scope`, which also
shows how to carry them into a thread started inside the block). Nested monitors all record the same
tokens. The persistent setters are process-wide, and so is peft's ``disable_adapter()`` (it flips a
flag on every layer); to switch editing off for one thread only, use ``edit_settings(model, layers=[])``,
which gives the base model's outputs bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hpr_peft.tuner.config import validate_alpha, validate_layer_choice
from hpr_peft.tuner.layer import HPRLayer
from hpr_peft.tuner.model import hpr_tuner
from hpr_peft.tuner.run_scope import MonitorScope, SettingsOverride, effective_settings, scoped


@contextmanager
def edit_settings(
    model: Any,
    alpha: float | None = None,
    layers: Iterable[int] | None = None,
    adapter_name: str | None = None,
) -> Iterator[None]:
    """Temporarily set ``alpha`` and/or the blocks that edit (``layers``: block indices that edit;
    all other blocks of the adapter are switched off; ``[]`` switches every block off). ``None`` leaves
    a setting unchanged. The settings hold for forwards in this thread until the block exits (also on
    exceptions); other threads keep the model's own settings (module docstring).
    """
    tuner = hpr_tuner(model)
    adapter = tuner.resolve_adapter(adapter_name)
    hpr_layers = tuner.hpr_layers(adapter)
    new_alpha = None if alpha is None else validate_alpha(alpha)
    chosen = None if layers is None else frozenset(validate_layer_choice(layers, hpr_layers))
    with scoped(SettingsOverride(hpr_layers, adapter, new_alpha, chosen)):
        yield


@dataclass
class LayerRecord:
    """What the probe of one block saw during :func:`monitor` (accumulated over forward calls)."""

    layer_index: int
    active: bool
    alpha: float
    n_tokens: int = 0
    n_flagged: int = 0
    _scores: list[torch.Tensor] = field(default_factory=list, repr=False)
    _angles: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def fraction_flagged(self) -> float:
        """Fraction of eligible (non-padding) tokens the probe flags for editing (nan if none seen)."""
        return self.n_flagged / self.n_tokens if self.n_tokens else math.nan

    @property
    def scores(self) -> torch.Tensor:
        """Probe scores ``w·h`` of all eligible tokens (float32, CPU)."""
        return torch.cat(self._scores) if self._scores else torch.empty(0)

    @property
    def probabilities(self) -> torch.Tensor:
        """Probe probabilities ``sigmoid(w·h)`` of all eligible tokens."""
        return torch.sigmoid(self.scores)

    @property
    def angles(self) -> torch.Tensor:
        """Predicted angles ``g·f(h)`` (radians, before ``alpha``) of the flagged tokens."""
        return torch.cat(self._angles) if self._angles else torch.empty(0)

    @property
    def mean_edit_angle(self) -> float:
        """Mean predicted angle over *all* eligible tokens (0 for tokens not flagged): how much the
        layer would turn an average token, before ``alpha`` (nan if none seen)."""
        return float(self.angles.sum()) / self.n_tokens if self.n_tokens else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (fraction flagged, mean/max angle in radians, mean probability)."""
        angles = self.angles
        return {
            "layer": self.layer_index,
            "active": self.active,
            "n_tokens": self.n_tokens,
            "n_flagged": self.n_flagged,
            "fraction_flagged": self.fraction_flagged,
            "mean_angle": float(angles.mean()) if angles.numel() else math.nan,
            "max_angle": float(angles.max()) if angles.numel() else math.nan,
            "mean_probability": float(self.probabilities.mean()) if self.n_tokens else math.nan,
        }


class MonitorRecords(dict):
    """``{block index: LayerRecord}`` filled by :func:`monitor`."""

    def summary(self) -> list[dict[str, Any]]:
        return [record.summary() for _, record in sorted(self.items())]


@contextmanager
def monitor(model: Any, adapter_name: str | None = None) -> Iterator[MonitorRecords]:
    """Run probes without editing and record per-layer statistics (see module docstring).

    >>> with monitor(peft_model) as records:
    ...     peft_model(**batch)
    >>> records[10].fraction_flagged, records[10].angles
    """
    tuner = hpr_tuner(model)
    adapter = tuner.resolve_adapter(adapter_name)
    hpr_layers = tuner.hpr_layers(adapter)
    records = MonitorRecords()
    for index, layer in hpr_layers.items():
        alpha, active = effective_settings(layer, adapter)
        records[index] = LayerRecord(index, active, alpha)

    def record(layer: HPRLayer, scores: torch.Tensor, flagged: torch.Tensor, angles: torch.Tensor) -> None:
        entry = records[layer.layer_index]
        entry.n_tokens += int(scores.numel())
        entry.n_flagged += int(flagged.sum())
        entry._scores.append(scores.detach().float().cpu())
        entry._angles.append(angles.detach().float().cpu())

    with scoped(MonitorScope(hpr_layers, adapter, record)):
        yield records


__all__ = ["LayerRecord", "MonitorRecords", "edit_settings", "hpr_tuner", "monitor"]
