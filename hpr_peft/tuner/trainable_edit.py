"""The edit as autograd sees it when an adapter is trained: the same values, gradients for every weight.

The forward values are exactly those of inference: the hard gate (a token is rotated iff the probe
calls it negative) and the rotation by ``θ = α · g · f(h)``. Two things would stop gradients:

* **The hard gate** ``1[w·h ≤ logit(t)]`` has zero derivative almost everywhere, so the probe would
  learn only through the rotation direction ``ŵ``, never which tokens to edit. Training uses the
  straight-through estimator with the probe's own probability as surrogate: the backward pass treats
  the gate as ``s = sigmoid(logit(t) − w·h)`` (the probability of being flagged, at ``t = 0.5``
  simply ``1 − sigmoid(w·h)``), so ``∂h'/∂s = rotate(h) − h`` reaches ``w`` for every eligible token.
  The probe's scale plays the role of an inverse temperature and is learned with it.
* **A zero angle** (the identity start ``g = 0``): a rotation by 0 computed in float32 is ``h`` only
  to rounding, so the identity would not be bit-exact. :func:`rotate_exactly` returns ``h`` itself
  where ``θ = 0`` while keeping the rotation's derivative, so ``∂h'/∂g`` is the true tangent of the
  rotation (turning ``h`` toward ``ŵ``).

Everything is dense (every token of the call is rotated and merged with ``torch.where``): no host
synchronisation, and ``torch.compile`` traces it without graph breaks.
"""

from __future__ import annotations

import math

import torch

from hpr_peft.rotation import pseudo_rotate

__all__ = ["flag_probability", "rotate_exactly", "straight_through_edit"]


def flag_probability(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sigmoid(logit(threshold) − w·h)``: the probability that the probe flags each token (float32)."""
    return torch.sigmoid(math.log(threshold / (1.0 - threshold)) - scores.float())


def rotate_exactly(
    hidden: torch.Tensor,
    direction: torch.Tensor,
    theta: torch.Tensor,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pseudo_rotate(hidden, direction, θ, protected)`` whose value is ``hidden`` bit for bit where ``θ = 0``.

    Where ``θ = 0`` the value ``hidden + (r − r)`` is ``hidden`` exactly and the gradient is the
    rotation's own (``∂r/∂θ`` at 0), so a zero-initialised gain still learns.
    """
    rotated = pseudo_rotate(hidden, direction, theta, protected)
    at_zero = hidden + (rotated - rotated.detach())
    return torch.where((theta == 0).unsqueeze(-1), at_zero, rotated)


def straight_through_edit(
    hidden: torch.Tensor,
    direction: torch.Tensor,
    theta: torch.Tensor,
    flagged: torch.Tensor,
    eligible: torch.Tensor,
    probability: torch.Tensor,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """The edited hidden states ``(batch, seq, d)`` with straight-through gradients through the gate.

    Value: ``rotate_exactly(h)`` where ``flagged``, ``h`` elsewhere (exactly the inference edit).
    Gradient: as if the gate of each ``eligible`` token were ``probability`` (the term added has value
    zero). Tokens that are not eligible (padding, sequence starts) pass through with no gradient to
    the editor. ``direction`` is what flagged tokens turn toward (the probe's weight or the adapter's
    stored direction), ``protected`` the dimensions left out of the rotation (None: none), as in
    :func:`hpr_peft.rotation.pseudo_rotate`.
    """
    rotated = rotate_exactly(hidden, direction, theta, protected)
    edited = torch.where(flagged.unsqueeze(-1), rotated, hidden)
    surrogate = (probability - probability.detach()) * eligible
    correction = surrogate.unsqueeze(-1) * (rotated - hidden).detach().float()
    return edited + correction.to(hidden.dtype)
