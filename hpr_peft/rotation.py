"""Pure tensor math of Householder Pseudo-Rotation (derivations in docs/math.md).

Everything here is a stateless function of tensors (no ``torch.nn`` state) and imports nothing from
``hpr_peft``, so the layer, the fitting code and the tests can share one exact definition.

Conventions used by every function:

* ``h`` has shape ``(..., d)`` (hidden states, any number of leading dims), the probe ``w`` has shape
  ``(d,)``, per-token quantities (``theta``, ``mask``) have shape ``(...)`` or broadcast to it.
* Arithmetic runs in float32 whatever the input dtype (bf16 / fp16 models included) and the result is
  cast back to the dtype of ``h``; float64 inputs are computed in float64. Low-precision formats lose
  too much in the norms and angles of a d-dimensional vector to do the math in them.
* Norms are never formed from raw squares: each token is first divided by its largest absolute entry,
  so hidden states from ``|h| = 1e-30`` to ``1e30`` (and zeros) work in float32 without overflow or
  underflow.
* No ``d x d`` matrix is ever built: the edit is O(d) per token.
* Gradients with respect to ``h``, ``w`` and ``theta`` are finite for every finite input (degenerate
  branches use safe denominators, so ``torch.where`` never routes a NaN gradient).

The edit turns a token ``h`` that the probe ``p(h) = sigmoid(w·h)`` calls negative by an
angle ``theta`` towards the probe direction, inside the plane spanned by ``h`` and ``w``, keeping its
norm. The paper writes it as a spherical interpolation from ``h`` towards its Householder reflection
``r``; that form divides by ``sin(gamma)`` and is badly conditioned near the hyperplane (43 % error on
real SmolLM2 activations in float32). :func:`pseudo_rotate` computes the same rotation in a stable form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "angle_between",
    "apply_hpr",
    "edit_mask",
    "mask_from_logits",
    "massive_dimensions",
    "mean_difference_direction",
    "probe_consistent_angle",
    "probe_logits",
    "pseudo_rotate",
    "reflect",
    "reflection_angle",
    "rotate_outside",
    "slerp_reference",
    "unit_direction",
    "zero_dims",
]

# A token whose component orthogonal to the probe is below PARALLEL_TOL * |h| (relative to the
# compute dtype's epsilon) counts as parallel to w: the plane (h, w) is undefined there, and such a
# token is returned unchanged. 64 eps is ~30x above the rounding noise of the projection, so an exactly
# parallel h (up to rounding) is caught, while any token measurably off the w axis is still rotated.
PARALLEL_TOL_EPS = 64.0


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating point tensor, got dtype {x.dtype}; cast it with .float()."
        )
    return x


def _check_h_w(h: object, w: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``h`` (..., d) and ``w`` (d,) (shapes and dtypes only: no device synchronisation)."""
    h = _check_tensor("h", h)
    w = _check_tensor("w", w)
    if h.dim() < 1:
        raise ValueError("h must have shape (..., d) with at least one dimension; got a 0-dim tensor.")
    if w.dim() != 1:
        raise ValueError(f"w (the probe weight) must have shape (d,), got {tuple(w.shape)}; pass weight[0].")
    if w.shape[0] != h.shape[-1]:
        raise ValueError(
            f"w has {w.shape[0]} entries but h has hidden size {h.shape[-1]} (last dim); "
            "they must match (use the probe of the layer that produced h)."
        )
    if w.device != h.device:
        raise ValueError(f"w is on {w.device} but h is on {h.device}; move w with w.to(h.device).")
    return h, w


def _per_token(
    name: str, x: torch.Tensor | float, lead: torch.Size, dtype: torch.dtype, device
) -> torch.Tensor:
    """Broadcast a per-token quantity (scalar or tensor) to the leading shape ``lead`` of ``h``."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool.")
    if isinstance(x, (int, float)):
        return torch.full(lead, float(x), dtype=dtype, device=device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(x).__name__}.")
    try:
        out = torch.broadcast_to(x, lead)
    except RuntimeError as err:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, which does not broadcast to the token shape {tuple(lead)} "
            "(h.shape[:-1])."
        ) from err
    if x.device != device:
        if x.dim() == 0:  # a 0-dim tensor acts like a Python scalar
            return out.to(device)
        raise ValueError(f"{name} is on {x.device} but h is on {device}; move it to h's device.")
    return out


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """Largest absolute entry along the last dim (no gradient: only used as a scale)."""
    with torch.no_grad():
        return torch.maximum(x.amax(dim=-1), -x.amin(dim=-1))


def _safe_recip(x: torch.Tensor) -> torch.Tensor:
    """1/x for a non-negative scale, with 0 (and subnormals) mapped to 1/tiny: scaling a zero vector
    by it still gives zero, and nothing overflows."""
    return 1.0 / x.clamp(min=torch.finfo(x.dtype).tiny)


def _safe_sqrt(x: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """sqrt(x) where ``positive``, else 0, with a finite gradient everywhere (double-where trick)."""
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def unit_direction(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w / |w|, is_zero)`` in the compute dtype of ``w``; a zero ``w`` gives the zero vector.

    Scaled by max-abs first, so any finite ``w`` works; the gradient is finite at ``w = 0``.
    """
    w = _check_tensor("w", w)
    wc = w.to(_compute_dtype(w.dtype))
    mw = _max_abs(wc)
    ws = wc * _safe_recip(mw)
    n2 = (ws * ws).sum(-1)
    positive = n2 > 0
    norm = _safe_sqrt(n2, positive)
    w_hat = ws / torch.where(positive, norm, torch.ones_like(norm)).unsqueeze(-1)
    return w_hat, ~positive


def _index_path(device: torch.device) -> bool:
    """Whether to use index (gather/scatter) ops instead of ``torch.where`` on this device.

    ``nonzero`` costs nothing extra on CPU and lets us touch only the rows that need work; on an
    accelerator it would force a host synchronisation, so there every row is computed and merged.
    Under ``torch.compile`` its data-dependent shape would break the graph: every row is computed too.
    """
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _merge_rows(out: torch.Tensor, original: torch.Tensor, keep_original: torch.Tensor) -> torch.Tensor:
    """Rows of ``out`` (2-D, owned by the caller) replaced by ``original`` where ``keep_original``.

    Bit-exact copy of the original rows. On CPU an index copy of the (usually few) kept rows is much
    cheaper than ``torch.where`` over the whole tensor; elsewhere ``torch.where`` avoids the host
    synchronisation of ``nonzero``.
    """
    if _index_path(out.device):
        idx = keep_original.nonzero().squeeze(1)
        if idx.numel() == 0:
            return out
        if idx.numel() == keep_original.numel():
            return original.clone()
        return out.index_copy_(0, idx, original.index_select(0, idx))
    return torch.where(keep_original.unsqueeze(-1), original, out)


# ----------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------


def probe_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Probe scores ``w·h`` per token, shape ``h.shape[:-1]``, in the compute dtype (float32/float64).

    ``w`` is divided by its max-abs entry before the dot product and the scale is applied afterwards,
    so that large or tiny probe weights do not overflow or flush the products to zero.
    """
    h, w = _check_h_w(h, w)
    cdt = _compute_dtype(h.dtype)
    wc = w.to(cdt)
    mw = _max_abs(wc)
    return torch.matmul(h.to(cdt), wc * _safe_recip(mw)) * mw


def mask_from_logits(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Tokens to edit from probe scores ``z = w·h``: ``sigmoid(z) < threshold``.

    Compared in logit space (``z < log(t / (1 - t))``), which stays exact where float32 ``sigmoid``
    saturates to 0 or 1. At the default ``threshold = 0.5`` a score of exactly 0 counts as negative
    (``z <= 0``), as in the reference implementation. ``threshold = 0`` edits nothing, ``1`` every
    finite score.
    """
    t = _check_threshold(threshold)
    if t == 0.5:
        return logits <= 0
    if t == 0.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    if t == 1.0:
        return logits < math.inf
    return logits < math.log(t / (1.0 - t))


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in [0, 1], got {type(threshold).__name__}.")
    t = float(threshold)
    if not (0.0 <= t <= 1.0):
        raise ValueError(
            f"threshold must be in [0, 1] (a probability), got {threshold!r}; the default is 0.5."
        )
    return t


def edit_mask(h: torch.Tensor, w: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Bool mask ``(...)`` of tokens the probe calls negative: ``p(h) = sigmoid(w·h) < threshold``.

    ``w·h = 0`` counts as negative at the default threshold 0.5 (``w·h <= 0`` is edited). Robust to the
    scale of ``h`` and ``w``: at 0.5 only the sign of the score matters, and it is taken from a product
    of max-abs scaled vectors, so ``|h| = 1e-30`` does not underflow to a score of 0.
    """
    h, w = _check_h_w(h, w)
    t = _check_threshold(threshold)
    cdt = _compute_dtype(h.dtype)
    wc = w.to(cdt)
    mw = _max_abs(wc)
    z_w = torch.matmul(h.to(cdt), wc * _safe_recip(mw))  # = (w·h) / max|w|
    if t in (0.0, 0.5, 1.0):
        return mask_from_logits(z_w, t)
    # z < logit(t)  <=>  z_w < logit(t) / max|w|  (max|w| = 0: z = 0, and logit/0 = ±inf decides)
    # max|w| = 0 gives z = 0 and limit / 0 = ±inf, which still decides "0 < logit(t)" correctly
    return z_w < math.log(t / (1.0 - t)) / mw


def reflect(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Householder reflection of ``h`` across the hyperplane ``w·x = 0``: ``h - 2 (ŵ·h) ŵ``.

    O(d) per token (a rank-one update, never the matrix ``I - 2 w wᵀ / wᵀw``). An involution that
    preserves norms. A zero ``w`` defines no hyperplane and returns ``h`` unchanged (a copy).
    """
    h, w = _check_h_w(h, w)
    cdt = _compute_dtype(h.dtype)
    w_hat, _ = unit_direction(w.to(cdt))
    hc = h.to(cdt)
    h2 = hc.reshape(-1, hc.shape[-1])
    r = torch.addr(h2, torch.matmul(h2, w_hat), w_hat, alpha=-2.0)
    return r.reshape(h.shape).to(h.dtype)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in ``[0, π]`` between ``a`` and ``b`` along the last dim (they broadcast), shape ``(...)``.

    Kahan's form ``2·atan2(|â - b̂|, |â + b̂|)``: accurate for nearly parallel and nearly opposite
    vectors, where ``acos`` of the cosine loses half the digits. 0 if either vector is zero. Computed in
    float32 (float64 if both are float64), returned in the promoted dtype of the inputs.
    """
    a = _check_tensor("a", a)
    b = _check_tensor("b", b)
    if a.dim() < 1 or b.dim() < 1 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"a and b must have the same last dimension, got shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    cdt = _compute_dtype(out_dtype)
    a_hat, a_zero = _unit_rows(a.to(cdt))
    b_hat, b_zero = _unit_rows(b.to(cdt))
    diff = _safe_norm(a_hat - b_hat)
    summ = _safe_norm(a_hat + b_hat)
    zero = a_zero | b_zero
    # atan2(0, 0) has a NaN gradient: feed (0, 1) where either vector is zero
    diff = torch.where(zero, torch.zeros_like(diff), diff)
    summ = torch.where(zero, torch.ones_like(summ), summ)
    return (2.0 * torch.atan2(diff, summ)).to(out_dtype)


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm along the last dim for entries of moderate size, finite gradient at 0."""
    n2 = (x * x).sum(-1)
    return _safe_sqrt(n2, n2 > 0)


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / |x|, is_zero)`` row-wise, max-abs scaled first (zero rows stay zero)."""
    xs = x * _safe_recip(_max_abs(x)).unsqueeze(-1)
    n = _safe_norm(xs)
    zero = n == 0
    return xs / torch.where(zero, torch.ones_like(n), n).unsqueeze(-1), zero


def reflection_angle(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``gamma = angle(h, reflect(h, w))`` per token: twice the angle between ``h`` and the hyperplane.

    Computed directly as ``2·atan2(|ŵ·h|, |h - (ŵ·h)ŵ|)`` (stable near the hyperplane, where the angle
    is small); 0 for ``h = 0`` or ``w = 0``. Same dtype rules as :func:`angle_between`.
    """
    h, w = _check_h_w(h, w)
    cdt = _compute_dtype(h.dtype)
    w_hat, w_zero = unit_direction(w.to(cdt))
    hc = h.to(cdt)
    h2 = hc.reshape(-1, hc.shape[-1])
    hs = h2 * _safe_recip(_max_abs(h2)).unsqueeze(-1)
    z = torch.matmul(hs, w_hat)
    perp = _safe_norm(torch.addr(hs, z, w_hat, alpha=-1.0))
    zero = (perp == 0) & (z == 0)
    zero = zero | w_zero
    perp = torch.where(zero, torch.ones_like(perp), perp)
    z = torch.where(zero, torch.zeros_like(z), z)
    return (2.0 * torch.atan2(z.abs(), perp)).reshape(h.shape[:-1]).to(h.dtype)


def _direction_cos_sin(
    x: torch.Tensor, w_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cos β, sin β, is_zero)`` per row of 2-D ``x`` (compute dtype), β = angle(x, ŵ) ∈ [0, π]:
    ``(ŵ·x, |x_⟂|) / |x|`` on max-abs-scaled rows. A zero row gives ``(1, 0)`` (finite gradient)."""
    xs = x * _safe_recip(_max_abs(x)).unsqueeze(-1)
    z = torch.matmul(xs, w_hat)
    perp = _safe_norm(torch.addr(xs, z, w_hat, alpha=-1.0))
    n2 = z * z + perp * perp
    zero = n2 == 0
    inv = torch.rsqrt(torch.where(zero, torch.ones_like(n2), n2))
    cos = torch.where(zero, torch.ones_like(z), z * inv)
    sin = torch.where(zero, torch.zeros_like(perp), perp * inv)
    return cos, sin, zero


def probe_consistent_angle(x_neg: torch.Tensor, x_pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Probe-consistent angle target ``θ* = max(0, ∠(x⁻, ŵ) − ∠(x⁺, ŵ))`` per pair, shape ``(...)``.

    The rotation toward ŵ, in the plane of ``x⁻`` and ``w`` (the plane :func:`pseudo_rotate` turns
    in), that gives ``x⁻`` the normalised probe coordinate ``ŵ·x/|x|`` of its positive ``x⁺``:
    ``pseudo_rotate(x⁻, w, θ*)`` has the same angle to ŵ as ``x⁺``. It is 0 when ``x⁻`` is already at
    least as close to ŵ as ``x⁺``. The paper's target ``angle(x⁻, x⁺)`` also counts every direction
    orthogonal to ``w`` in which the two differ, which the edit cannot move along; on models whose
    hidden states share a few massive dimensions (Gemma-3) it is 10-30x larger than θ* and the edit
    overshoots far along ŵ (docs/math.md).

    ``x_neg`` and ``x_pos`` have shape ``(..., d)`` (they broadcast), ``w`` shape ``(d,)``. Each angle to
    ŵ is ``atan2(|x_⟂|, ŵ·x)`` on max-abs-scaled rows (no ``d x d`` matrix, any finite scale). Invariant
    to positive rescaling of ``x⁻``, ``x⁺`` and ``w``. 0 where ``x⁻``, ``x⁺`` or ``w`` is zero. Computed
    and returned in float32 (float64 when every input is float64).
    """
    x_neg, w = _check_h_w(x_neg, w)
    x_pos = _check_tensor("x_pos", x_pos)
    if x_pos.dim() < 1 or x_pos.shape[-1] != x_neg.shape[-1]:
        raise ValueError(
            f"x_neg and x_pos must have the same last dimension, got shapes {tuple(x_neg.shape)} and "
            f"{tuple(x_pos.shape)}."
        )
    if x_pos.device != x_neg.device:
        raise ValueError(f"x_pos is on {x_pos.device} but x_neg is on {x_neg.device}.")
    dtypes = (x_neg.dtype, x_pos.dtype, w.dtype)
    cdt = torch.float64 if all(t == torch.float64 for t in dtypes) else torch.float32
    w_hat, w_zero = unit_direction(w.to(cdt))
    d = x_neg.shape[-1]
    c_neg, s_neg, neg_zero = (
        t.reshape(x_neg.shape[:-1]) for t in _direction_cos_sin(x_neg.to(cdt).reshape(-1, d), w_hat)
    )
    c_pos, s_pos, pos_zero = (
        t.reshape(x_pos.shape[:-1]) for t in _direction_cos_sin(x_pos.to(cdt).reshape(-1, d), w_hat)
    )
    # β⁻ − β⁺ directly is limited by the rounding of β near π/2 (~1e-7 rad in float32, 2 % of a
    # 5e-6 rad target); the angle-difference formulas resolve small differences to relative
    # precision. They are used where |β⁻ − β⁺| < π/2 (cos > 0), where atan2 cannot wrap around.
    sin_diff = s_neg * c_pos - c_neg * s_pos
    cos_diff = c_neg * c_pos + s_neg * s_pos
    direct = torch.atan2(s_neg, c_neg) - torch.atan2(s_pos, c_pos)
    small = cos_diff > 0
    refined = torch.atan2(sin_diff, torch.where(small, cos_diff, torch.ones_like(cos_diff)))
    theta = torch.where(small, refined, direct).clamp_min(0.0)
    undefined = neg_zero | pos_zero | w_zero
    return torch.where(undefined, torch.zeros_like(theta), theta)


def _rotate_rows(
    h2: torch.Tensor, w_hat: torch.Tensor, w_zero: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core of :func:`pseudo_rotate` on 2-D rows in the compute dtype.

    Returns ``(out, degenerate)``: ``out`` is the rotated rows (garbage, but finite, in degenerate
    rows), ``degenerate`` the rows that must stay unchanged (``h = 0``, ``h ∥ w``, ``w = 0``, or a
    scale beyond the dtype's range).

    Math, in the orthonormal basis (ŵ, e) of the plane of h and w, with e = h_⟂/|h_⟂| and
    h_⟂ = h - (ŵ·h)ŵ: ``h = |h| (cos α ŵ + sin α e)`` with α = angle(h, ŵ) = atan2(|h_⟂|, ŵ·h), and
    the edit turns h by θ towards ŵ: ``h' = |h| (cos(α-θ) ŵ + sin(α-θ) e)``. This is exactly the
    stable form ``|h| (cos θ u + sin θ p)`` of docs/math.md (p = sin α ŵ - cos α e is the unit vector ⟂ u
    towards ŵ) written with one projection instead of two, so it costs ~6 passes over the data.
    α comes from atan2 of two accurately computed lengths, so it is exact to rounding at any angle.
    The projection is corrected once (``δ = h_⟂·ŵ``, folded into the coefficients, not into the data)
    so that e ⟂ ŵ to working precision even when |h_⟂| is tiny: |h'| = |h| then holds to ~eps.
    """
    eps = torch.finfo(h2.dtype).eps
    inv_m = _safe_recip(_max_abs(h2))  # 1 / max|h| per token; no gradient (the map is homogeneous)
    # projections on the unscaled h (no squares, so no overflow), then h_⟂ scaled in place to units
    # of max|h|: its entries lie in [-2, 2] and its squared norm can neither overflow nor underflow
    z = torch.matmul(h2, w_hat) * inv_m  # ŵ·h / max|h|
    perp = torch.addr(h2, torch.matmul(h2, w_hat), w_hat, alpha=-1.0).mul_(inv_m.unsqueeze(-1))
    delta = torch.matmul(perp, w_hat)  # residual ŵ-component of the computed h_⟂ (rounding, ~eps)
    n_raw = torch.linalg.vector_norm(perp, dim=-1)
    p2 = n_raw * n_raw - delta * delta  # |h_⟂ - δ ŵ|², exact to ~eps because |ŵ| = 1
    zc = z + delta  # ŵ-component of h consistent with the corrected h_⟂
    n_perp = _safe_sqrt(p2, p2 > 0)
    n_h2 = zc * zc + n_perp * n_perp
    n_h = _safe_sqrt(n_h2, n_h2 > 0)  # |h| / max|h|, 0 only for h = 0

    degenerate = (n_perp <= PARALLEL_TOL_EPS * eps * n_h) | w_zero
    # atan2 and the division must not see the degenerate rows (NaN / inf gradients)
    safe_perp = torch.where(degenerate, torch.ones_like(n_perp), n_perp)
    safe_z = torch.where(degenerate, torch.zeros_like(zc), zc)
    alpha = torch.atan2(safe_perp, safe_z)
    beta = alpha - theta
    norm_h = n_h / inv_m  # |h|
    coef_perp = norm_h * (torch.sin(beta) / safe_perp)
    coef_w = norm_h * torch.cos(beta) - coef_perp * delta
    bad = ~(torch.isfinite(coef_perp) & torch.isfinite(coef_w))
    degenerate = degenerate | bad
    coef_perp = torch.where(bad, torch.zeros_like(coef_perp), coef_perp)
    coef_w = torch.where(bad, torch.zeros_like(coef_w), coef_w)
    if torch.is_grad_enabled() and (h2.requires_grad or w_hat.requires_grad or theta.requires_grad):
        out = perp * coef_perp.unsqueeze(-1)  # perp is saved for the backward of delta
    else:
        out = perp.mul_(coef_perp.unsqueeze(-1))
    out.addr_(coef_w, w_hat)
    return out, degenerate


def _prepare(
    h: torch.Tensor, w: torch.Tensor, theta: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = _check_h_w(h, w)
    cdt = _compute_dtype(h.dtype)
    lead = h.shape[:-1]
    theta_b = _per_token("theta", theta, lead, cdt, h.device).to(cdt)
    w_hat, w_zero = unit_direction(w.to(cdt))
    h2 = h.reshape(-1, h.shape[-1])
    return h2, w_hat, w_zero, theta_b.reshape(-1)


def pseudo_rotate(
    h: torch.Tensor, w: torch.Tensor, theta: torch.Tensor | float, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """Turn every token of ``h`` by ``theta`` radians towards the probe direction ``ŵ``, keeping ``|h|``.

    ``h``: ``(..., d)``; ``w``: ``(d,)``; ``theta``: scalar or ``(...)`` (broadcast to ``h.shape[:-1]``).
    ``h'`` lies in the plane of ``h`` and ``w``, ``|h'| = |h|``, ``angle(h, h') = theta`` (for theta in
    [0, π]) and ``w·h'`` grows with theta; for a token on the negative side (``w·h < 0``) this equals
    the paper's slerp from ``h`` towards its reflection (:func:`slerp_reference`) wherever that is
    defined: it crosses the hyperplane once ``theta > gamma/2`` and reaches the reflection at ``gamma``.
    Degenerate tokens are returned unchanged, bit for bit: ``h = 0``, ``h`` parallel to ``w`` (to
    within ~64 eps; the plane is undefined there) and ``w = 0``. ``w·h = 0`` rotates towards ``ŵ``.

    Every token is rotated (no probe test): use :func:`apply_hpr` to edit only flagged tokens.

    ``w`` is the direction turned toward: the probe's weight, or any other direction (e.g. the
    mean difference of :func:`mean_difference_direction`); only its direction matters. ``protected``
    (int64 ``(k,)`` dimension indices, e.g. :func:`massive_dimensions`) restricts the rotation to the
    other coordinates: see :func:`rotate_outside`.
    """
    if protected is not None and _check_protected(protected, h).numel():
        return rotate_outside(pseudo_rotate, h, w, protected, theta)
    h2, w_hat, w_zero, theta_f = _prepare(h, w, theta)
    out, degenerate = _rotate_rows(h2.to(w_hat.dtype), w_hat, w_zero, theta_f)
    out = out.to(h.dtype)
    return _merge_rows(out, h2, degenerate).reshape(h.shape)


def apply_hpr(
    h: torch.Tensor,
    w: torch.Tensor,
    theta: torch.Tensor | float,
    mask: torch.Tensor,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`pseudo_rotate` where ``mask`` is True; every other token is returned bit for bit.

    ``mask``: bool ``(...)`` (e.g. from :func:`edit_mask`), broadcast to ``h.shape[:-1]``. ``theta`` is
    only read where ``mask`` is True. On CPU only the masked rows are computed (gather, rotate,
    scatter into a copy of ``h``); on accelerators every row is computed and merged with one
    ``torch.where``, which needs no host synchronisation. Returns ``h`` itself if nothing is masked
    on CPU. ``w`` and ``protected`` as in :func:`pseudo_rotate`.
    """
    if protected is not None and _check_protected(protected, h).numel():
        return rotate_outside(apply_hpr, h, w, protected, theta, mask)
    h2, w_hat, w_zero, theta_f = _prepare(h, w, theta)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of shape h.shape[:-1] (e.g. from edit_mask), got {got}.")
    mask_f = _per_token("mask", mask, h.shape[:-1], torch.bool, h.device).reshape(-1)
    cdt = w_hat.dtype
    if _index_path(h.device):
        idx = mask_f.nonzero().squeeze(1)
        if idx.numel() == 0:
            return h
        if idx.numel() < mask_f.numel():
            rows = h2.index_select(0, idx)
            out, degenerate = _rotate_rows(rows.to(cdt), w_hat, w_zero, theta_f.index_select(0, idx))
            out = _merge_rows(out.to(h.dtype), rows, degenerate)
            return h2.index_copy(0, idx, out).reshape(h.shape)
        out, degenerate = _rotate_rows(h2.to(cdt), w_hat, w_zero, theta_f)
        return _merge_rows(out.to(h.dtype), h2, degenerate).reshape(h.shape)
    out, degenerate = _rotate_rows(h2.to(cdt), w_hat, w_zero, theta_f)
    keep = degenerate | ~mask_f
    return torch.where(keep.unsqueeze(-1), h2, out.to(h.dtype)).reshape(h.shape)


def _check_protected(protected: object, h: object) -> torch.Tensor:
    """Validate ``protected`` (shape and dtype only: a range check would synchronise the device)."""
    if not isinstance(protected, torch.Tensor) or protected.dtype != torch.long or protected.dim() != 1:
        got = (
            f"dtype {protected.dtype}, shape {tuple(protected.shape)}"
            if isinstance(protected, torch.Tensor)
            else type(protected).__name__
        )
        raise TypeError(
            f"protected must be a 1-D int64 tensor of dimension indices (e.g. from massive_dimensions), got {got}."
        )
    if isinstance(h, torch.Tensor) and protected.device != h.device:
        raise ValueError(f"protected is on {protected.device} but h is on {h.device}; move it to h's device.")
    return protected


def zero_dims(x: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with the coordinates ``protected`` (of the last dim) set to 0: the projection of
    ``x`` onto the subspace that a rotation with those dimensions protected turns in."""
    return x.index_fill(-1, _check_protected(protected, x), 0.0)


def rotate_outside(
    rotate: Callable[..., torch.Tensor], h: torch.Tensor, w: torch.Tensor, protected: torch.Tensor, *args
) -> torch.Tensor:
    """``rotate`` (:func:`pseudo_rotate` or :func:`apply_hpr`) applied to the coordinates of ``h`` outside
    ``protected``, toward the part of ``w`` outside them; the ``protected`` coordinates are copied back.

    With ``P`` zeroing the protected coordinates, the result is ``h'`` with ``h'[protected] = h[protected]``
    (bit for bit) and ``P h' = rotate(P h, P w, ...)``: ``|P h'| = |P h|``, so ``|h'| = |h|`` exactly as
    before. Tokens whose rotated part is unchanged (not flagged, degenerate, ``P w = 0``) come back bit for
    bit. O(k) extra per token; no ``d x d`` matrix.
    """
    h, w = _check_h_w(h, w)
    rest = zero_dims(h, protected)
    out = rotate(rest, zero_dims(w, protected), *args)
    if out is rest:
        return h
    return out.index_copy(-1, protected, h.index_select(-1, protected))


def massive_dimensions(states: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` dimensions with the largest mean square ``mean(h_i²)`` over ``states`` ``(n, d)``,
    sorted, int64 ``(k,)``: the "massive" coordinates that every token shares (a few of them hold most
    of ``|h|²`` in Gemma-3). Scaled by the largest entry first, so any finite scale works."""
    states = _check_tensor("states", states)
    if states.dim() != 2 or states.shape[0] == 0:
        raise ValueError(f"states must have shape (n, d) with n >= 1, got {tuple(states.shape)}.")
    if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k < states.shape[1]):
        raise ValueError(f"k must be an int in [0, d) = [0, {states.shape[1]}), got {k!r}.")
    x = states.to(_compute_dtype(states.dtype))
    scale = _safe_recip(x.abs().amax())
    mean_square = (x * scale).pow(2).mean(0)
    return torch.topk(mean_square, k).indices.sort().values


def mean_difference_direction(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``u = (mean(x⁺) − mean(x⁻)) / |…|``, ``(d,)`` float32, from ``(n⁺, d)`` positives and ``(n⁻, d)``
    negatives: ITI's mass-mean shift. Accumulated in float64; the zero vector if the means are equal
    (a rotation toward it then leaves every token unchanged)."""
    positives = _check_tensor("positives", positives)
    negatives = _check_tensor("negatives", negatives)
    if positives.dim() != 2 or negatives.dim() != 2 or positives.shape[1] != negatives.shape[1]:
        raise ValueError(
            "positives and negatives must have shapes (n+, d) and (n-, d) with the same d, got "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}."
        )
    if positives.shape[0] == 0 or negatives.shape[0] == 0:
        raise ValueError("mean_difference_direction needs at least one positive and one negative row.")
    difference = positives.double().mean(0) - negatives.double().mean(0)
    return unit_direction(difference)[0].float()


def slerp_reference(h: torch.Tensor, w: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """The paper's formula, literally, in float64 (for tests and documentation; returns float64).

    ``r = h - 2 (w·h / w·w) w``, ``gamma = acos(h·r / (|h||r|))``,
    ``h' = sin(theta)/sin(gamma) · r + sin(gamma - theta)/sin(gamma) · h``.
    Undefined (NaN/inf) where ``sin(gamma) = 0`` (h on the hyperplane, h ∥ w, h = 0). For tokens with
    ``w·h > 0`` it turns h away from ``w`` (towards its reflection): only negative tokens are edited.
    """
    h, w = _check_h_w(h, w)
    h64 = h.to(torch.float64)
    w64 = w.to(torch.float64)
    theta64 = _per_token("theta", theta, h.shape[:-1], torch.float64, h.device).to(torch.float64)
    r = h64 - 2.0 * ((h64 @ w64) / (w64 @ w64)).unsqueeze(-1) * w64
    cos_gamma = (h64 * r).sum(-1) / (
        torch.linalg.vector_norm(h64, dim=-1) * torch.linalg.vector_norm(r, dim=-1)
    )
    gamma = torch.acos(cos_gamma.clamp(-1.0, 1.0))
    sin_gamma = torch.sin(gamma)
    return (torch.sin(theta64) / sin_gamma).unsqueeze(-1) * r + (
        torch.sin(gamma - theta64) / sin_gamma
    ).unsqueeze(-1) * h64
