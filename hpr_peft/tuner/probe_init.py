"""Starting probes that flag a set share of the tokens, whatever the common offset of the hidden states.

A probe is a hyperplane through the origin (no bias: the edit turns ``h`` inside the plane of ``h`` and
``w``, so ``w`` is a direction, not an affine function). The hidden states of many models share a large
common offset ``μ`` (a few massive dimensions in real LLMs; position embeddings in GPT-2 / OPT), and their
variation around it is small in comparison. A random direction then puts every token of an input on the
same side: it flags all of them or none (the 3-token input of PEFT's ``test_unload_adapter`` on OPT was
left unedited that way).

A hyperplane through the origin cannot be shifted, but it can be turned to contain ``μ``: for ``u⊥`` a
random direction with its component along ``μ`` removed, ``u⊥·h = u⊥·(h − μ)`` measures each token's
variation around the offset, whatever ``|μ|`` is. A tilt ``κ`` back toward ``μ`` then moves the
hyperplane across the tokens as a bias would (where the offset dominates, ``μ·h / |μ|² ≈ 1`` for every
token), so that a chosen share of a sample falls on the flagged side. The tuner takes the sample from a
few short forward passes on random token ids (:func:`calibration_states`) and starts each probe at
:func:`balanced_probe`. No fixed hyperplane through the origin can flag a token of *every* input (an
input may consist of tokens that all sit on the other side); what holds is the share on inputs like the
sample, and that every input is edited where the hidden states lie in a half-space (a dominant offset).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.model_io import forward_until, input_device

__all__ = [
    "CALIBRATION_LENGTHS",
    "CALIBRATION_ROWS",
    "IDENTITY_START_SHARE",
    "RANDOM_EDITOR_SHARE",
    "balanced_probe",
    "calibration_states",
    "starting_share",
]

# Share of the calibration tokens a starting probe flags. An identity start (init_weights=True) is
# undecided: half. Random editors (init_weights=False) exist to show that the adapter edits: the hidden
# states of a short input are strongly correlated (same positions, same context), so a larger share
# makes an unedited input much rarer, while a quarter of the tokens still passes untouched.
IDENTITY_START_SHARE = 0.5
RANDOM_EDITOR_SHARE = 0.75

# Sequences of random ids, CALIBRATION_ROWS of each length, one forward pass per length: early
# positions weigh more (models with learned absolute positions, GPT-2 and OPT, shift the hidden states
# by position, and short inputs live there). The first token of each row (an attention sink with an
# atypical norm, never edited) is left out: 240 tokens in all.
CALIBRATION_LENGTHS = (5, 9, 17, 33)
CALIBRATION_ROWS = 4
_CALIBRATION_SEED = 0


def balanced_probe(direction: torch.Tensor, states: torch.Tensor, flagged_share: float = 0.5) -> torch.Tensor:
    """A probe weight ``(d,)`` from a random ``direction`` ``(d,)`` and sample hidden states ``(n, d)``.

    ``w ∝ u⊥ / σ + κ · μ / |μ|²``: ``μ`` is the mean of ``states``, ``u⊥`` the direction with its ``μ``
    component removed, ``σ`` the interquartile spread of ``u⊥·h`` over the sample, ``κ`` the smallest
    tilt that puts ``flagged_share`` of the sample on the flagged side (``w·h <= 0``), and the scale
    makes the spread of the scores 1. Where the offset dominates, ``μ·h / |μ|² ≈ 1`` for every token and
    the tilt acts like the bias a probe through the origin cannot have; where it is weak, the tilt
    leans on the tokens' (weaker) common direction and tokens opposite to it stay unflagged. The scores
    ``w·h`` are log-odds of "positive" of order 1, as the straight-through gate of training needs; a
    threshold above 0.5 flags more tokens. Returns ``direction`` unchanged when the sample cannot say
    anything (fewer than two tokens, no spread, non-finite values).
    """
    sample = states.detach().to(torch.float64)
    u = direction.detach().to(device=sample.device, dtype=torch.float64)
    if sample.dim() != 2 or sample.shape[0] < 2 or not torch.isfinite(sample).all():
        return direction
    mean = sample.mean(0)
    mean_sq = float(mean @ mean)
    if mean_sq > 0:
        u = u - (u @ mean) / mean_sq * mean
    spread = _robust_spread(sample @ u)
    if not math.isfinite(spread) or spread <= 0:
        return direction
    weight = u / spread
    if mean_sq > 0:
        tilt = _tilt_flagging(flagged_share, sample @ weight, sample @ mean / mean_sq)
        weight = weight + tilt / mean_sq * mean
        weight = weight / _robust_spread(sample @ weight)  # the tilt adds spread where the offset is small
    return weight.to(device=direction.device, dtype=direction.dtype)


def _robust_spread(scores: torch.Tensor) -> float:
    """The interquartile range in units of a normal's standard deviation: a few outlying tokens (heavy
    tails are common in hidden states) do not shrink the scores of all the others."""
    low, high = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype)).tolist()
    return (high - low) / 1.349


def _tilt_flagging(share: float, scores: torch.Tensor, along_mean: torch.Tensor) -> float:
    """The smallest ``κ`` for which ``scores + κ · along_mean <= 0`` holds for the fraction of the sample
    closest to ``share``. Candidates: 0 and the midpoints between the tilts at which one token crosses
    the hyperplane."""
    moving = along_mean != 0
    crossings = (-scores[moving] / along_mean[moving]).sort().values
    candidates = torch.cat([crossings.new_zeros(1), (crossings[1:] + crossings[:-1]) / 2])
    flagged = (scores.unsqueeze(0) + candidates.unsqueeze(1) * along_mean.unsqueeze(0)) <= 0
    distance = (flagged.double().mean(1) - share).abs()
    best = distance <= distance.min() + 1e-12
    return float(candidates[best][candidates[best].abs().argmin()])


def starting_share(init_weights: bool) -> float:
    """The share of tokens a starting probe flags: :data:`IDENTITY_START_SHARE` for an identity start,
    :data:`RANDOM_EDITOR_SHARE` for random editors."""
    return IDENTITY_START_SHARE if init_weights else RANDOM_EDITOR_SHARE


def calibration_states(model: nn.Module, blocks: Mapping[int, nn.Module]) -> dict[int, torch.Tensor]:
    """Output hidden states ``(n, d)`` (float32) of each block in ``blocks`` on random token ids.

    Forward passes of ``model`` (as it is, in eval mode, without gradients) on sequences of
    ``CALIBRATION_LENGTHS`` ids drawn from the whole vocabulary by a private generator, so the global
    random state is not touched; each stops after the last block of interest. Sequence starts are
    left out.
    """
    if not blocks:
        return {}
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(_CALIBRATION_SEED)
    captured: dict[int, list[torch.Tensor]] = {index: [] for index in blocks}

    def recorder(index: int):
        def record(hidden: torch.Tensor) -> None:
            captured[index].append(hidden[:, 1:].detach().float().reshape(-1, hidden.shape[-1]).cpu())

        return record

    last = max(blocks)
    with HookSet() as hooks, torch.no_grad(), _eval_mode(model):
        for index, block in blocks.items():
            hooks.on_block_output(block, recorder(index))
        for length in CALIBRATION_LENGTHS:
            ids = torch.randint(0, vocab, (CALIBRATION_ROWS, length), generator=generator)
            forward_until(model, blocks[last], input_ids=ids.to(input_device(model)), use_cache=False)
    return {index: torch.cat(states) for index, states in captured.items()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) for the block, each one's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
