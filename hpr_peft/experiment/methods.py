"""The editing methods the job compares, as settings that put a model into an edited state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpr_peft.evaluation.baselines import additive_steering, mean_difference_vectors
from hpr_peft.runtime.model_io import ContextFactory, stack_contexts, unedited_context
from hpr_peft.tuner.control import edit_settings

__all__ = ["METHODS", "EditSetting", "pick_within_budget", "sweep_settings"]

METHODS = ("hpr", "additive")


@dataclass(frozen=True)
class EditSetting:
    """One point of a sweep: a method (``"hpr"`` or ``"additive"``), its layers and strength."""

    method: str
    top_k: int
    layers: tuple[int, ...]
    alpha: float
    vectors: dict[int, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"k={self.top_k} α={self.alpha:g}"

    def context(self, model: nn.Module) -> ContextFactory:
        """The context factory giving ``model`` in this setting's state."""
        if self.method == "hpr":
            return lambda: edit_settings(model, alpha=self.alpha, layers=list(self.layers))
        vectors = self.vectors
        if vectors is None:
            raise ValueError("an additive setting needs its steering vectors.")
        return stack_contexts(
            unedited_context(model), lambda: additive_steering(model, vectors, alpha=self.alpha)
        )


def sweep_settings(
    ranking: Sequence[int],
    top_ks: Sequence[int],
    hpr_alphas: Sequence[float],
    additive_alphas: Sequence[float],
    fit_activations: Any,
    normalize_additive: bool,
) -> list[EditSetting]:
    """Every HPR and additive setting of the sweep: the top-k layers of ``ranking`` for each ``k``,
    each strength; the additive vectors come from the same fitting activations as the HPR editors."""
    out = []
    for k in top_ks:
        layers = tuple(sorted(ranking[:k]))
        out += [EditSetting("hpr", k, layers, a) for a in hpr_alphas]
        vectors = mean_difference_vectors(fit_activations, layers=list(layers), normalize=normalize_additive)
        out += [EditSetting("additive", k, layers, a, vectors) for a in additive_alphas]
    return out


def pick_within_budget(rows: list[dict[str, Any]], kl_budget: float) -> dict[str, Any]:
    """Best validation MC2 (then MC1) among rows with KL ≤ budget; else the smallest-KL row."""
    within = [r for r in rows if r["kl"] <= kl_budget]
    if within:
        return max(within, key=lambda r: (r["mc2"], r["mc1"], -r["kl"]))
    return min(rows, key=lambda r: r["kl"])
