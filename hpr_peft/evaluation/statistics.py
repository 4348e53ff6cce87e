"""Is an edit's gain real? A paired bootstrap of the per-question difference edited − base.

Both scores come from the same questions, so the question's difficulty cancels in the difference:
the confidence interval of the mean difference is much narrower than two separate standard errors
suggest. :func:`paired_bootstrap` resamples the questions with replacement (``n_resamples`` times) and
takes the percentile interval of the resampled means. With ``strata`` (e.g. the cross-validation fold
of each question) questions are resampled within their stratum, so every resample keeps each
stratum's size, and the means are pooled over all questions.

>>> diff = paired_bootstrap(edited.per_question("mc2"), base.per_question("mc2"), strata=folds)
>>> diff.mean, diff.low, diff.high, diff.excludes_zero()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

__all__ = ["PairedDifference", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """Mean of edited − base over ``n`` questions, and its bootstrap confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below zero (the difference is real)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _scores(name: str, values: Sequence[float]) -> torch.Tensor:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a sequence of numbers (one score per question), got {type(values).__name__}."
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must hold finite numbers only, got {bad[0]!r}.")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _check_settings(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int (2000 is plenty), got {n_resamples!r}.")
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}.")


def _strata_members(strata: Sequence[Any] | None, n: int) -> list[torch.Tensor]:
    """Question indices of each stratum (one stratum of all questions without ``strata``)."""
    if strata is None:
        return [torch.arange(n)]
    if isinstance(strata, (str, bytes)) or len(strata) != n:
        raise ValueError(f"strata must give one label per question ({n}), got {len(strata)}.")
    members: dict[Any, list[int]] = {}
    for index, label in enumerate(strata):
        members.setdefault(label, []).append(index)
    return [torch.tensor(rows) for rows in members.values()]


def paired_bootstrap(
    edited: Sequence[float],
    base: Sequence[float],
    *,
    strata: Sequence[Any] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Mean of ``edited[i] − base[i]`` and its percentile bootstrap interval at ``confidence``
    (module docstring); deterministic for a given ``seed``."""
    edited_t, base_t = _scores("edited", edited), _scores("base", base)
    if len(edited_t) != len(base_t):
        raise ValueError(
            f"edited and base must score the same questions in the same order: {len(edited_t)} vs "
            f"{len(base_t)} scores."
        )
    if len(edited_t) < 2:
        raise ValueError(f"a bootstrap needs at least 2 questions, got {len(edited_t)}.")
    _check_settings(n_resamples, confidence)
    differences = edited_t - base_t
    n = len(differences)
    generator = torch.Generator().manual_seed(int(seed))
    totals = torch.zeros(n_resamples, dtype=torch.float64)
    for rows in _strata_members(strata, n):
        picks = torch.randint(len(rows), (n_resamples, len(rows)), generator=generator)
        totals += differences[rows][picks].sum(dim=1)
    tail = (1 - float(confidence)) / 2
    low, high = torch.quantile(totals / n, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(mean=float(differences.mean()), low=low, high=high, n=n)
