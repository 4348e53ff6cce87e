"""The editing methods the job compares: a method on a set of layers, whose strength is set later by
a KL budget (:mod:`hpr_peft.evaluation.calibration`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpr_peft.evaluation.baselines import mean_difference_vectors
from hpr_peft.evaluation.calibration import EditFactory, additive_edit, hpr_edit
from hpr_peft.runtime.model_io import ContextFactory

__all__ = ["METHODS", "EditCandidate", "candidates_for"]

METHODS = ("hpr", "additive")


@dataclass(frozen=True)
class EditCandidate:
    """A method (``"hpr"`` or ``"additive"``) editing ``layers``; additive steering carries its vectors."""

    method: str
    layers: tuple[int, ...]
    vectors: dict[int, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.method, self.layers

    def edit(self, model: nn.Module) -> EditFactory:
        """``alpha -> context`` putting ``model`` into this candidate's edited state at that strength."""
        if self.method == "hpr":
            return hpr_edit(model, layers=list(self.layers))
        if self.vectors is None:
            raise ValueError("an additive candidate needs its steering vectors.")
        return additive_edit(model, self.vectors)

    def at(self, model: nn.Module, alpha: float) -> ContextFactory:
        """A zero-argument context factory for this candidate at strength ``alpha``."""
        edit = self.edit(model)
        return lambda: edit(alpha)


def candidates_for(
    method: str, layer_sets: Sequence[Sequence[int]], fit_activations: Any, normalize_additive: bool
) -> list[EditCandidate]:
    """One candidate of ``method`` per layer set (duplicates dropped, order kept). Additive vectors are
    the mean differences of the same fitting activations the HPR editors were trained on."""
    unique = list(dict.fromkeys(tuple(sorted(layers)) for layers in layer_sets))
    if method == "hpr":
        return [EditCandidate("hpr", layers) for layers in unique]
    needed = sorted({layer for layers in unique for layer in layers})
    vectors = mean_difference_vectors(fit_activations, layers=needed, normalize=normalize_additive)
    return [EditCandidate("additive", layers, {i: vectors[i] for i in layers}) for layers in unique]
