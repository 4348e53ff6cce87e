"""Property tests of hpr_peft.rotation: the stable pseudo-rotation and its helpers.

Random cases come from hypothesis (shapes, dtypes, per-token magnitudes from 1e-30 to 1e30, seeds) and
are mixed with the degenerate rows the math must survive: zeros, h parallel / antiparallel to w,
w·h = 0 exactly, and negative zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpr_peft import rotation
from hpr_peft.rotation import (
    angle_between,
    apply_hpr,
    edit_mask,
    mask_from_logits,
    probe_consistent_angle,
    probe_logits,
    pseudo_rotate,
    reflect,
    reflection_angle,
    slerp_reference,
    unit_direction,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# |h'| = |h| (relative): float32/float64 results are exact to rounding; bf16/fp16 outputs are rounded
NORM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# angle(h, h') = theta (radians)
ANGLE_TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# per-element magnitude exponents each dtype can hold with room for sqrt(d)
EXPONENTS = {
    torch.float32: (-30, 30),
    torch.float64: (-30, 30),
    torch.bfloat16: (-30, 30),
    torch.float16: (-2, 3),
}
SPECIALS = ("zero", "parallel", "antiparallel", "near", "orthogonal", "negzero")


@dataclass
class Case:
    h: torch.Tensor  # (..., d) in `dtype`
    w: torch.Tensor  # (d,) float32 (float64 for float64 cases)
    theta: torch.Tensor  # (...) in [0, pi]
    special: dict[str, torch.Tensor]  # kind -> bool (...) rows of that kind

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype


@st.composite
def cases(draw, dtypes=tuple(ALL_DTYPES), specials=SPECIALS, min_d: int = 2) -> Case:
    """A batch of hidden states with per-token magnitudes spread over the dtype's range, some rows
    replaced by degenerate ones, a probe of random scale and angles in [0, pi]."""
    dtype = draw(st.sampled_from(dtypes))
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    d = draw(st.integers(min_d, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    kinds = draw(st.lists(st.sampled_from(specials), max_size=3, unique=True))
    w_exp = draw(st.integers(-20, 20) if dtype != torch.float16 else st.integers(-3, 3))
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXPONENTS[dtype]
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    n = math.prod(lead)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    if "orthogonal" in kinds and d >= 2:
        w[: d // 2] = 0.0  # rows supported on the first half are then exactly orthogonal to w
    # w representable in the case dtype, so that h = 2^k w is exactly parallel to w in every dtype
    w = (w * 10.0**w_exp).to(dtype).to(wdt)
    exps = torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.pow(10.0, exps).unsqueeze(-1)
    kind_of_row = torch.randint(0, len(kinds) + 1, (n,), generator=g)  # 0: ordinary row
    special = {}
    for k, kind in enumerate(kinds, start=1):
        rows = kind_of_row == k
        special[kind] = rows.reshape(lead)
        if kind == "zero":
            h[rows] = 0.0
        elif kind in ("parallel", "antiparallel"):
            sign = 1.0 if kind == "parallel" else -1.0
            log2_scale = exps[rows] * math.log2(10.0) - math.log2(w.double().abs().max().item())
            h[rows] = sign * torch.pow(2.0, log2_scale.round()).unsqueeze(-1) * w.double()
        elif kind == "near":
            # within 1e-6..1e-2 rad of ±w: ill-conditioned plane, but a valid edit
            w_hat = w.double() / torch.linalg.vector_norm(w.double())
            e = h[rows] - (h[rows] @ w_hat).unsqueeze(-1) * w_hat
            e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp(min=1e-300)
            off = torch.pow(
                10.0, torch.empty(int(rows.sum()), dtype=torch.float64).uniform_(-6, -2, generator=g)
            )
            sign = torch.where(torch.rand(off.shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
            mag = torch.pow(10.0, exps[rows])
            h[rows] = mag.unsqueeze(-1) * (sign.unsqueeze(-1) * w_hat + off.unsqueeze(-1) * e)
        elif kind == "orthogonal":
            h[rows, d // 2 :] = 0.0
        elif kind == "negzero":
            h[rows, :: max(1, d // 3)] = -0.0
    h = h.reshape(*lead, d).to(dtype)
    theta = torch.empty(lead, dtype=torch.float64).uniform_(0.0, math.pi, generator=g).to(wdt)
    return Case(h=h, w=w, theta=theta, special=special)


def _rel_norm_err(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    nh = torch.linalg.vector_norm(h.double(), dim=-1)
    no = torch.linalg.vector_norm(out.double(), dim=-1)
    return torch.where(nh > 0, (no - nh).abs() / nh.clamp(min=1e-300), no)


def _geometry(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sin alpha, w·h, sin gamma) in float64 from the actual inputs; alpha = angle(h, w) (0 for
    h = 0), gamma = angle(h, reflect(h)) = |pi - 2 alpha|, so sin gamma = |sin 2 alpha|."""
    h64, w64 = h.double(), w.double()
    alpha = angle_between(h64, w64.expand_as(h64))
    return torch.sin(alpha), h64 @ w64, torch.sin(2 * alpha).abs()


def _bits(x: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return x.contiguous().view(view)


# ----------------------------------------------------------------------------------------------------
# pseudo_rotate
# ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases())
def test_norm_preserved_and_dtype_kept(case: Case) -> None:
    out = pseudo_rotate(case.h, case.w, case.theta)
    assert out.dtype == case.dtype and out.shape == case.h.shape
    assert torch.isfinite(out).all()
    err = _rel_norm_err(case.h, out)
    assert err.max().item() <= NORM_TOL[case.dtype], err.max().item()


@SETTINGS
@given(case=cases(specials=("zero", "orthogonal", "near")))
def test_angle_to_input_is_theta(case: Case) -> None:
    out = pseudo_rotate(case.h, case.w, case.theta)
    sin_alpha, _, _ = _geometry(case.h, case.w)
    nh = torch.linalg.vector_norm(case.h.double(), dim=-1)
    moved = (sin_alpha > 1e-4) & (nh > 0)  # not (near) parallel to w, not zero
    got = angle_between(case.h.double(), out.double())
    err = (got - case.theta.double()).abs()[moved]
    assert err.numel() == 0 or err.max().item() <= ANGLE_TOL[case.dtype], err.max().item()


@SETTINGS
@given(case=cases(specials=("zero", "parallel", "antiparallel", "near")))
def test_matches_paper_slerp_on_negative_tokens(case: Case) -> None:
    out = pseudo_rotate(case.h, case.w, case.theta).double()
    ref = slerp_reference(case.h, case.w, case.theta)
    assert ref.dtype == torch.float64
    _, score, sin_gamma = _geometry(case.h, case.w)
    rows = (score < 0) & (sin_gamma > 1e-3)
    nh = torch.linalg.vector_norm(case.h.double(), dim=-1)
    err = torch.linalg.vector_norm(out - ref, dim=-1)[rows] / nh[rows]
    # float32 arithmetic fixes the edit direction to ~eps/sin(gamma) (the plane of h and w is
    # ill-conditioned near h ∥ w), plus one rounding of the output to the dtype
    c_out = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[case.dtype]
    c_dir = 1e-13 if case.dtype == torch.float64 else 1e-6
    # the float64 reference itself (acos, then division by sin gamma) errs by ~eps64 / sin(gamma)^2
    tol = c_out + c_dir / sin_gamma[rows] + 1e-14 / sin_gamma[rows] ** 2
    assert (err <= tol).all(), (err - tol).max().item()


@SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.float64), specials=("zero", "orthogonal")))
def test_result_in_plane_of_h_and_w_and_crosses_at_half_gamma(case: Case) -> None:
    h64, w64 = case.h.double(), case.w.double()
    sin_alpha, score, _ = _geometry(case.h, case.w)
    gamma = reflection_angle(h64, w64)
    # a span test: remove the components along h and along w (Gram-Schmidt in float64)
    out = pseudo_rotate(case.h, case.w, case.theta).double()
    u = h64 / torch.linalg.vector_norm(h64, dim=-1, keepdim=True).clamp(min=1e-300)
    w_hat = w64 / torch.linalg.vector_norm(w64)
    q = w_hat - (u @ w_hat).unsqueeze(-1) * u
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp(min=1e-300)
    resid = out - (out * u).sum(-1, keepdim=True) * u - (out * q).sum(-1, keepdim=True) * q
    nh = torch.linalg.vector_norm(h64, dim=-1)
    rows = sin_alpha > 1e-3
    tol = 1e-5 if case.dtype == torch.float32 else 1e-12
    assert (torch.linalg.vector_norm(resid, dim=-1)[rows] <= tol * nh[rows]).all()
    # on the negative side: past the hyperplane iff theta > gamma/2 (and < gamma/2 + pi)
    theta = case.theta.double()
    neg = rows & (score < 0)
    new_score = out @ w64
    margin = 1e-3
    crossed = neg & (theta > gamma / 2 + margin) & (theta < gamma / 2 + math.pi - margin)
    not_yet = neg & (theta < gamma / 2 - margin)
    assert (new_score[crossed] > 0).all()
    assert (new_score[not_yet] < 0).all()


def test_plane_and_crossing_on_a_known_2d_example() -> None:
    # h at -30 degrees below the hyperplane w·x = 0 (w = e_y): gamma = 60 degrees
    w = torch.tensor([0.0, 2.0])
    h = 3.0 * torch.tensor([math.cos(math.radians(-30)), math.sin(math.radians(-30))])
    assert reflection_angle(h, w).item() == pytest.approx(math.radians(60), abs=1e-6)
    for deg, expected_deg in [(0, -30), (30, 0), (60, 30), (90, 60), (180, 150)]:
        out = pseudo_rotate(h, w, math.radians(deg))
        expected = 3.0 * torch.tensor(
            [math.cos(math.radians(expected_deg)), math.sin(math.radians(expected_deg))]
        )
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # theta = gamma is exactly the reflection
    torch.testing.assert_close(pseudo_rotate(h, w, math.radians(60)), reflect(h, w), atol=1e-6, rtol=0)


@SETTINGS
@given(case=cases(specials=SPECIALS))
def test_no_nan_or_inf_for_finite_input(case: Case) -> None:
    mask = edit_mask(case.h, case.w)
    for out in (
        pseudo_rotate(case.h, case.w, case.theta),
        apply_hpr(case.h, case.w, case.theta, mask),
        reflect(case.h, case.w),
        angle_between(case.h, case.w.to(case.dtype).expand_as(case.h)),
        reflection_angle(case.h, case.w),
        probe_logits(case.h, case.w).sign(),
    ):
        assert torch.isfinite(out).all()


@SETTINGS
@given(
    case=cases(
        dtypes=(torch.float32, torch.bfloat16, torch.float64), specials=("zero", "parallel", "antiparallel")
    )
)
def test_degenerate_rows_unchanged_bit_for_bit(case: Case) -> None:
    out = pseudo_rotate(case.h, case.w, case.theta)
    for kind in ("zero", "parallel", "antiparallel"):
        rows = case.special.get(kind)
        if rows is not None and rows.any():
            assert torch.equal(_bits(out[rows]), _bits(case.h[rows])), kind


def test_degenerate_examples() -> None:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for scale in (1e-30, 1e-3, 1.0, 7.0, 1e30):
        for sign in (1.0, -1.0):
            h = (sign * scale / 3.0) * w
            assert torch.equal(pseudo_rotate(h, w, 1.0), h)
    zero = torch.zeros(3, 4)
    assert torch.equal(pseudo_rotate(zero, w, 2.0), zero)
    # w = 0 defines no hyperplane: unchanged
    h = torch.randn(5, 4)
    assert torch.equal(pseudo_rotate(h, torch.zeros(4), 1.0), h)
    # d = 1: every h is parallel to w
    h1 = torch.tensor([[-2.0], [3.0], [0.0]])
    assert torch.equal(pseudo_rotate(h1, torch.tensor([0.7]), 1.0), h1)


def test_orthogonal_token_rotates_towards_w_hat() -> None:
    w = torch.tensor([0.0, 0.0, 4.0, 0.0])
    h = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 1e-30, 0.0, 0.0]])
    assert (h @ w == 0).all()
    assert edit_mask(h, w).all()  # w·h = 0 counts as negative
    theta = torch.tensor([0.3, 1.2])
    out = pseudo_rotate(h, w, theta)
    norm = torch.linalg.vector_norm(h.double(), dim=-1, keepdim=True).float()  # float32 squares underflow
    expected = torch.cos(theta).unsqueeze(-1) * h + norm * torch.sin(theta).unsqueeze(-1) * torch.tensor(
        [0, 0, 1.0, 0]
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_broadcasting_of_theta_and_leading_dims() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g)
    w = torch.randn(8, generator=g)
    theta = torch.rand(2, 1, generator=g)
    out = pseudo_rotate(h, w, theta)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(
                out[i, j], pseudo_rotate(h[i, j], w, theta[i, 0]), rtol=1e-6, atol=1e-6
            )
    torch.testing.assert_close(pseudo_rotate(h, w, 0.7), pseudo_rotate(h, w, torch.full((2, 3), 0.7)))
    # theta = 0 leaves h (numerically) where it is
    torch.testing.assert_close(pseudo_rotate(h, w, 0.0), h, rtol=1e-6, atol=1e-6)


def test_float64_stays_float64_and_half_precision_is_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    theta = torch.rand(64, generator=g, dtype=torch.float64)
    out64 = pseudo_rotate(h, w, theta)
    assert out64.dtype == torch.float64
    neg = h @ w < 0
    torch.testing.assert_close(out64[neg], slerp_reference(h, w, theta)[neg], rtol=1e-10, atol=1e-10)
    for dt in (torch.bfloat16, torch.float16):
        out = pseudo_rotate(h.to(dt), w.float(), theta.float())
        # exactly the float32 result rounded once: no arithmetic was done in the low precision
        expected = pseudo_rotate(h.to(dt).float(), w.float(), theta.float()).to(dt)
        assert torch.equal(out, expected)


def test_no_d_by_d_matrix() -> None:
    # a d x d float32 matrix at d = 300_000 would need 360 GB: this only works if the edit is O(d)
    d = 300_000
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, d, generator=g)
    w = torch.randn(d, generator=g)
    out = pseudo_rotate(h, w, torch.tensor([0.1, 0.5, 2.0]))
    assert _rel_norm_err(h, out).max() < 1e-5
    assert torch.isfinite(reflect(h, w)).all()


# ----------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.float64), specials=SPECIALS), use_mask=st.booleans())
def test_gradients_finite_everywhere(case: Case, use_mask: bool) -> None:
    # h up to 1e30 times grads of order 1 stay finite in float32 when the probe scale is moderate
    w = (case.w / case.w.abs().max().clamp(min=1e-30)).clone().requires_grad_(True)
    h = case.h.clone().requires_grad_(True)
    theta = case.theta.clone().requires_grad_(True)
    out = apply_hpr(h, w, theta, edit_mask(case.h, w.detach())) if use_mask else pseudo_rotate(h, w, theta)
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (out * upstream).sum().backward()
    for name, t in (("h", h), ("w", w), ("theta", theta)):
        assert t.grad is None or torch.isfinite(t.grad).all(), name


def test_gradients_match_finite_differences_and_the_paper_formula() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    h = torch.randn(5, 6, generator=g, dtype=torch.float64)
    h = torch.where((h @ w < 0).unsqueeze(-1), h, -h)  # negative tokens: slerp is the same map
    theta = torch.rand(5, generator=g, dtype=torch.float64) * 2.0
    inputs = tuple(t.clone().requires_grad_(True) for t in (h, w, theta))
    assert torch.autograd.gradcheck(pseudo_rotate, inputs)
    upstream = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((pseudo_rotate(*inputs) * upstream).sum(), inputs)
    paper = torch.autograd.grad((slerp_reference(*inputs) * upstream).sum(), inputs)
    for a, b in zip(ours, paper, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    a_in = (h.clone().requires_grad_(True), h.flip(0).clone().requires_grad_(True))
    assert torch.autograd.gradcheck(angle_between, a_in)


def test_gradients_finite_at_exact_degenerate_points() -> None:
    w = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    h = torch.stack([torch.zeros(3), 3.0 * w.detach(), -2.0 * w.detach(), torch.tensor([1.0, 0, 0])])
    h.requires_grad_(True)
    theta = torch.full((4,), 1.0, requires_grad=True)
    pseudo_rotate(h, w, theta).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(theta.grad).all()
    wz = torch.zeros(3, requires_grad=True)
    (
        pseudo_rotate(h.detach(), wz, 1.0).sum()
        + angle_between(wz, wz)
        + reflection_angle(h.detach(), wz).sum()
    ).backward()
    assert wz.grad is None or torch.isfinite(wz.grad).all()
    a = torch.zeros(2, 3, requires_grad=True)
    angle_between(a, h.detach()[:2]).sum().backward()
    assert torch.isfinite(a.grad).all()


# ----------------------------------------------------------------------------------------------------
# apply_hpr / edit_mask
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_path", [True, False], ids=["index", "where"])
@SETTINGS
@given(case=cases(), mask_seed=st.integers(0, 2**31 - 1))
def test_apply_hpr_untouched_tokens_bit_identical(case: Case, mask_seed: int, index_path: bool) -> None:
    g = torch.Generator().manual_seed(mask_seed)
    mask = torch.rand(case.h.shape[:-1], generator=g) < torch.rand((), generator=g)
    theta = torch.where(mask, case.theta, torch.full_like(case.theta, math.nan))  # unread where unmasked
    with pytest.MonkeyPatch.context() as mp:
        # index_path=False exercises the torch.where path used on accelerators
        mp.setattr(rotation, "_index_path", lambda device: index_path)
        out = apply_hpr(case.h, case.w, theta, mask)
    assert out.dtype == case.dtype and out.shape == case.h.shape
    assert torch.equal(_bits(out[~mask]), _bits(case.h[~mask]))
    edited = out[mask].double()
    expected = pseudo_rotate(case.h[mask], case.w, case.theta[mask]).double()
    nh = torch.linalg.vector_norm(case.h[mask].double(), dim=-1)
    # rows within ~1e-2 rad of ±w have an ill-conditioned plane: rounding differences between a
    # batched and a per-row computation may turn them in slightly different directions
    sin_alpha, _, _ = _geometry(case.h[mask], case.w)
    ok = sin_alpha > 1e-2
    diff = torch.linalg.vector_norm(edited - expected, dim=-1)
    assert (diff[ok] <= 2 * NORM_TOL[case.dtype] * nh[ok]).all()


def test_apply_hpr_nothing_masked_returns_input() -> None:
    h = torch.randn(2, 3, 4)
    out = apply_hpr(h, torch.randn(4), 1.0, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, h)


@SETTINGS
@given(case=cases(specials=("zero", "orthogonal", "negzero")), threshold=st.floats(0.01, 0.99))
def test_edit_mask_matches_sigmoid_rule(case: Case, threshold: float) -> None:
    score = case.h.double() @ case.w.double()
    expected = torch.sigmoid(score) < threshold
    if threshold == 0.5:
        expected = score <= 0
    mask = edit_mask(case.h, case.w, threshold)
    assert mask.shape == case.h.shape[:-1] and mask.dtype == torch.bool
    logit = math.log(threshold / (1 - threshold))
    terms = case.h.double().abs() @ case.w.double().abs()  # float32 rounding of w·h scales with this
    clear = (score - logit).abs() > 1e-4 * (terms + abs(logit))  # away from the boundary
    assert torch.equal(mask[clear], expected[clear])
    # the sign rule at 0.5 holds at any scale (no underflow of tiny scores to 0), zero scores included
    clear = (score.abs() > 1e-4 * terms) | (score == 0)
    assert torch.equal(edit_mask(case.h, case.w)[clear], (score <= 0)[clear])


def test_edit_mask_threshold_semantics() -> None:
    w = torch.tensor([1.0, 0.0])
    # scores -2, -0.5, 0, 0.5, 2, and a tiny positive one that float32 products would flush to 0
    h = torch.tensor([[-2.0, 1.0], [-0.5, 1.0], [0.0, 1.0], [0.5, 1.0], [2.0, 1.0], [1e-30, 1e-30]])
    assert edit_mask(h, w).tolist() == [True, True, True, False, False, False]
    # threshold 0.8 (logit 1.386): also the 0.5 and 0 scores; threshold 0.3 (logit -0.847): only -2
    assert edit_mask(h, w, 0.8).tolist() == [True, True, True, True, False, True]
    assert edit_mask(h, w, 0.3).tolist() == [True, False, False, False, False, False]
    assert not edit_mask(h, w, 0.0).any()
    assert edit_mask(h, w, 1.0).all()
    # logit comparison, not float32 sigmoid (which saturates to 1.0 at score 20)
    h_hi = torch.tensor([[20.0, 0.0]])
    assert edit_mask(h_hi, w, 1.0 - 1e-12).item() is True
    assert edit_mask(h_hi, w * 2, 1.0 - 1e-12).item() is False
    # a zero probe scores 0 everywhere: edited at thresholds >= 0.5 only
    assert edit_mask(h, torch.zeros(2)).all() and not edit_mask(h, torch.zeros(2), 0.4).any()
    assert edit_mask(h, torch.zeros(2), 0.6).all()
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            edit_mask(h, w, bad)
    with pytest.raises(TypeError, match="threshold"):
        edit_mask(h, w, "0.5")  # type: ignore[arg-type]
    scores = torch.tensor([-math.inf, -30.0, 0.0, 1.0, 30.0, math.inf])
    assert mask_from_logits(scores).tolist() == [True, True, True, False, False, False]
    assert mask_from_logits(scores, 0.9).tolist() == [True, True, True, True, False, False]
    assert mask_from_logits(scores, 1.0).tolist() == [True, True, True, True, True, False]
    assert not mask_from_logits(scores, 0.0).any()
    torch.testing.assert_close(
        mask_from_logits(probe_logits(h, w), 0.8),
        edit_mask(h, w, 0.8)[:5].new_tensor([True, True, True, True, False, False])
        | torch.tensor([False] * 5 + [True]),
    )


def test_probe_logits_is_w_dot_h_at_any_scale() -> None:
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, 12, generator=g)
    w = torch.randn(12, generator=g)
    torch.testing.assert_close(probe_logits(h, w), h @ w, rtol=1e-5, atol=1e-5)
    big = probe_logits(h, w * 1e30)
    torch.testing.assert_close(big / 1e30, h @ w, rtol=1e-5, atol=1e-5)
    assert probe_logits(h.bfloat16(), w).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# reflect / angles
# ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.float64), specials=("zero", "orthogonal", "parallel")))
def test_reflect_is_a_norm_preserving_involution(case: Case) -> None:
    r = reflect(case.h, case.w)
    assert r.dtype == case.dtype
    tol = 1e-5 if case.dtype == torch.float32 else 1e-12
    assert _rel_norm_err(case.h, r).max().item() <= tol
    back = reflect(r, case.w)
    nh = torch.linalg.vector_norm(case.h.double(), dim=-1)
    assert (torch.linalg.vector_norm(back.double() - case.h.double(), dim=-1) <= 2 * tol * nh).all()
    # the probe score flips sign, the component in the hyperplane is kept
    w_hat = case.w.double() / torch.linalg.vector_norm(case.w.double())
    s_h, s_r = case.h.double() @ w_hat, r.double() @ w_hat
    assert ((s_r + s_h).abs() <= 2 * tol * nh).all()
    # reflection_angle is the angle between h and its reflection (away from gamma ~ 0, pi)
    gamma = reflection_angle(case.h.double(), case.w.double())
    direct = angle_between(case.h.double(), r.double())
    ok = (nh > 0) & (gamma > 1e-3) & (gamma < math.pi - 1e-3)
    assert ((gamma - direct).abs()[ok] <= 1e-4).all()


def test_reflect_matches_the_householder_matrix_for_small_d() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    householder = torch.eye(5, dtype=torch.float64) - 2.0 * torch.outer(w, w) / (w @ w)  # test only, tiny d
    torch.testing.assert_close(reflect(h, w), h @ householder.T)
    torch.testing.assert_close(reflect(h, torch.zeros(5, dtype=torch.float64)), h)


def test_angle_between_known_values_and_tiny_angles() -> None:
    e = torch.eye(3)
    assert angle_between(e[0], e[0]).item() == 0.0
    assert angle_between(e[0], -e[0]).item() == pytest.approx(math.pi, abs=1e-6)
    assert angle_between(e[0], 5 * e[1]).item() == pytest.approx(math.pi / 2, abs=1e-6)
    assert angle_between(torch.zeros(3), e[1]).item() == 0.0
    assert angle_between(e, e[0]).shape == (3,)  # broadcasting
    # a 1e-6 rad angle in float32: acos(cos) would return 0 (cos rounds to 1); Kahan's form does not
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(1e-6), math.sin(1e-6)], dtype=torch.float32)
    assert angle_between(a, b).item() == pytest.approx(1e-6, rel=1e-3)
    assert angle_between(a * 1e30, b * 1e-30).item() == pytest.approx(1e-6, rel=1e-3)
    assert angle_between(a.bfloat16(), b.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="last dimension"):
        angle_between(torch.zeros(3), torch.zeros(4))


def test_unit_direction_handles_extreme_scales() -> None:
    for scale in (1e-37, 1e-30, 1.0, 1e30, 3e37):
        w_hat, zero = unit_direction(torch.tensor([3.0, 4.0]) * scale)
        torch.testing.assert_close(w_hat, torch.tensor([0.6, 0.8]))
        assert not zero
    w_hat, zero = unit_direction(torch.zeros(4))
    assert bool(zero) and torch.equal(w_hat, torch.zeros(4))


# ----------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    h = torch.randn(2, 3, 4)
    w = torch.randn(4)
    with pytest.raises(ValueError, match="hidden size"):
        pseudo_rotate(h, torch.randn(5), 1.0)
    with pytest.raises(ValueError, match=r"shape \(d,\)"):
        pseudo_rotate(h, torch.randn(1, 4), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        pseudo_rotate(h.long(), w, 1.0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        reflect([[1.0, 2.0]], torch.randn(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="theta"):
        pseudo_rotate(h, w, torch.rand(3, 2))
    with pytest.raises(TypeError, match="mask"):
        apply_hpr(h, w, 1.0, torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        apply_hpr(h, w, 1.0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0-dim"):
        reflect(torch.tensor(1.0), w)


# ----------------------------------------------------------------------------------------------------
# probe-consistent angle target θ* = max(0, ∠(x⁻, ŵ) − ∠(x⁺, ŵ))
# ----------------------------------------------------------------------------------------------------


@st.composite
def pair_cases(draw, dtypes=(torch.float32, torch.float64)):
    """Pairs (x⁻, x⁺) of shape (n, d) and a probe w, each with its own random scale."""
    dtype = draw(st.sampled_from(dtypes))
    d = draw(st.integers(2, 40))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    e_neg, e_pos, e_w = (draw(st.integers(-12, 12)) for _ in range(3))
    g = torch.Generator().manual_seed(seed)
    x_neg = (torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0**e_neg).to(dtype)
    x_pos = (torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0**e_pos).to(dtype)
    w = (torch.randn(d, generator=g, dtype=torch.float64) * 10.0**e_w).to(dtype)
    return x_neg, x_pos, w


def _probe_coordinate(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ŵ·h/|h| in float64 (test reference)."""
    h, w = h.double(), w.double()
    return (h @ (w / w.norm())) / h.norm(dim=-1)


@SETTINGS
@given(case=pair_cases())
def test_probe_consistent_angle_is_zero_for_equal_or_closer_negatives(case) -> None:
    x_neg, x_pos, w = case
    out = probe_consistent_angle(x_neg, x_pos, w)
    assert out.shape == x_neg.shape[:-1] and torch.isfinite(out).all() and (out >= 0).all()
    assert out.dtype == (torch.float64 if x_neg.dtype == torch.float64 else torch.float32)
    assert torch.equal(probe_consistent_angle(x_neg, x_neg, w), torch.zeros_like(out))
    # of (x, y) and (y, x) the one whose "negative" is already closer to ŵ gets exactly 0
    swapped = probe_consistent_angle(x_pos, x_neg, w)
    assert torch.equal(torch.minimum(out, swapped), torch.zeros_like(out))
    closer = _probe_coordinate(x_neg, w) > _probe_coordinate(x_pos, w) + 1e-6
    assert (out[closer] == 0).all()


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(2, 64),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_probe_consistent_angle_matches_planar_toy_vectors(seed: int, d: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 16
    a_neg, a_pos = (torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi for _ in range(2))
    a_w = float(torch.rand(1, generator=g, dtype=torch.float64)) * 2 * math.pi
    r_neg, r_pos = (
        10.0 ** torch.empty(n, dtype=torch.float64).uniform_(-3, 3, generator=g) for _ in range(2)
    )
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))  # a plane in R^d

    def embed(angle: torch.Tensor, radius) -> torch.Tensor:
        radius = torch.as_tensor(radius, dtype=torch.float64).unsqueeze(-1)
        return (radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)) @ basis.T

    def unsigned(a: torch.Tensor) -> torch.Tensor:  # |a - a_w| wrapped into [0, π]
        return torch.remainder(a - a_w + math.pi, 2 * math.pi).sub(math.pi).abs()

    expected = (unsigned(a_neg) - unsigned(a_pos)).clamp_min(0.0)
    w = embed(torch.tensor(a_w, dtype=torch.float64), 3.0)
    out = probe_consistent_angle(embed(a_neg, r_neg).to(dtype), embed(a_pos, r_pos).to(dtype), w.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)


@SETTINGS
@given(case=pair_cases(), scales=st.tuples(*[st.integers(-20, 20)] * 3))
def test_probe_consistent_angle_invariant_to_positive_rescaling(case, scales) -> None:
    x_neg, x_pos, w = case
    a, b, c = (10.0**e for e in scales)
    out = probe_consistent_angle(x_neg, x_pos, w)
    scaled = probe_consistent_angle(x_neg * a, x_pos * b, w * c)
    tol = 1e-5 if x_neg.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(scaled, out, atol=tol, rtol=0)


@SETTINGS
@given(case=pair_cases())
def test_rotating_by_probe_consistent_angle_reaches_the_positive_probe_coordinate(case) -> None:
    x_neg, x_pos, w = case
    theta = probe_consistent_angle(x_neg, x_pos, w)
    rotated = pseudo_rotate(x_neg, w, theta)
    moved = theta > 0
    target = _probe_coordinate(x_pos, w)
    tol = 1e-5 if x_neg.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(_probe_coordinate(rotated, w)[moved], target[moved], atol=tol, rtol=0)
    # pairs with θ* = 0 are left where they are, already at least as positive as their positive
    kept, original = rotated[~moved].double(), x_neg[~moved].double()
    assert ((kept - original).norm(dim=-1) <= tol * original.norm(dim=-1)).all()  # θ = 0: unchanged
    assert (_probe_coordinate(x_neg, w)[~moved] >= target[~moved] - tol).all()


def test_probe_consistent_angle_examples_and_degenerate_inputs() -> None:
    w = torch.tensor([1.0, 0.0, 0.0])
    x_neg = torch.tensor([0.0, 1.0, 0.0])  # 90° from ŵ
    x_pos = torch.tensor([1.0, 0.0, 1.0])  # 45° from ŵ, out of the (x⁻, w) plane
    assert probe_consistent_angle(x_neg, x_pos, w).item() == pytest.approx(math.pi / 4, abs=1e-6)
    assert probe_consistent_angle(x_pos, x_neg, w).item() == 0.0
    # a 1e-6 rad gap near the hyperplane (where Gemma's targets live) is resolved in float32
    eps = 1e-6
    near = torch.tensor([math.sin(-eps), math.cos(-eps), 0.0])
    assert probe_consistent_angle(near, x_neg, w).item() == pytest.approx(eps, rel=1e-4)
    assert probe_consistent_angle(x_neg, near, w).item() == 0.0
    far = torch.tensor([math.sin(-eps), math.cos(-eps), 0.0]) * 1e20
    close = torch.tensor([math.sin(eps), math.cos(eps), 1.0]) * 1e-20
    # close is eps / sqrt(2) from the hyperplane on the positive side (its third entry is off-plane)
    assert probe_consistent_angle(far, close, w).item() == pytest.approx(eps * (1 + 0.5**0.5), rel=1e-4)
    assert probe_consistent_angle(near, torch.tensor([math.sin(eps), math.cos(eps), 0.0]), w).item() == (
        pytest.approx(2 * eps, rel=1e-4)
    )
    zeros = torch.zeros(3)
    assert probe_consistent_angle(zeros, x_pos, w).item() == 0.0
    assert probe_consistent_angle(x_neg, zeros, w).item() == 0.0
    assert probe_consistent_angle(x_neg, x_pos, zeros).item() == 0.0
    assert probe_consistent_angle(x_neg.expand(4, 3), x_pos, w).shape == (4,)  # broadcasting
    assert probe_consistent_angle(x_neg.bfloat16(), x_pos.bfloat16(), w).dtype == torch.float32
    h = x_neg.detach().requires_grad_(True)
    probe_consistent_angle(h, x_pos, w).backward()
    assert torch.isfinite(h.grad).all()
    with pytest.raises(ValueError, match="last dimension"):
        probe_consistent_angle(x_neg, torch.zeros(4), w)
    with pytest.raises(ValueError, match="hidden size"):
        probe_consistent_angle(x_neg, x_pos, torch.zeros(4))


# ----------------------------------------------------------------------------------------------------
# other directions and protected (massive) dimensions
# ----------------------------------------------------------------------------------------------------


@st.composite
def protected_cases(draw, dtypes=tuple(ALL_DTYPES)):
    """A :func:`cases` batch and 0..d-1 distinct protected dimensions."""
    case = draw(cases(dtypes=dtypes, min_d=3))
    d = case.h.shape[-1]
    k = draw(st.integers(0, d - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    protected = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return case, protected


@SETTINGS
@given(pc=protected_cases())
def test_protected_dims_keep_their_values_and_the_norm_is_preserved(pc) -> None:
    case, protected = pc
    out = pseudo_rotate(case.h, case.w, case.theta, protected)
    assert out.dtype == case.h.dtype and out.shape == case.h.shape
    assert torch.equal(_bits(out[..., protected]), _bits(case.h[..., protected]))
    assert _rel_norm_err(case.h, out).max() <= NORM_TOL[case.dtype]
    rest = rotation.zero_dims(case.h, protected)  # the rest turns as a rotation of its own
    expected = pseudo_rotate(rest, rotation.zero_dims(case.w, protected), case.theta)
    mask = torch.ones(case.h.shape[-1], dtype=torch.bool)
    mask[protected] = False
    assert torch.equal(_bits(out[..., mask]), _bits(expected[..., mask]))


@pytest.mark.parametrize("index_path", [True, False], ids=["index", "where"])
@SETTINGS
@given(pc=protected_cases(dtypes=(torch.float32, torch.float64)), mask_seed=st.integers(0, 2**31 - 1))
def test_a_zero_angle_or_an_unflagged_token_is_identity_with_protected_dims(
    pc, mask_seed: int, index_path: bool
) -> None:
    case, protected = pc
    still = pseudo_rotate(case.h, case.w, 0.0, protected)
    tol = 1e-5 if case.dtype == torch.float32 else 1e-12
    scale = case.h.double().abs().amax(-1, keepdim=True)
    assert ((still.double() - case.h.double()).abs() <= tol * scale).all()
    g = torch.Generator().manual_seed(mask_seed)
    mask = torch.rand(case.h.shape[:-1], generator=g) < 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rotation, "_index_path", lambda device: index_path)  # False: the accelerator path
        out = apply_hpr(case.h, case.w, case.theta, mask, protected)
        nothing = apply_hpr(case.h, case.w, case.theta, torch.zeros_like(mask), protected)
    assert torch.equal(_bits(out[~mask]), _bits(case.h[~mask]))
    assert torch.equal(_bits(nothing), _bits(case.h))
    rotated = pseudo_rotate(case.h[mask], case.w, case.theta[mask], protected)
    assert ((out[mask].double() - rotated.double()).abs() <= 1e-4 * scale[mask]).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(3, 40), k=st.integers(0, 2), theta=st.floats(1e-3, 0.05))
def test_rotation_moves_h_toward_the_direction(seed: int, d: int, k: int, theta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    h, u = (
        torch.randn(4, d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    protected = torch.randperm(d, generator=g)[:k]
    rest_h, rest_u = rotation.zero_dims(h, protected), rotation.zero_dims(u, protected)
    before = angle_between(rest_h, rest_u.expand_as(rest_h))
    out = pseudo_rotate(h, u, theta, protected)
    after = angle_between(rotation.zero_dims(out, protected), rest_u.expand_as(rest_h))
    turned = (before > 2 * theta) & (before < math.pi - 1e-6)  # a plane (h, u) is defined
    assert torch.allclose(after[turned], before[turned] - theta, atol=1e-9)
    cos = torch.nn.functional.cosine_similarity
    assert (
        cos(out[turned], u.expand_as(h)[turned], dim=-1) > cos(h[turned], u.expand_as(h)[turned], dim=-1)
    ).all()


def test_a_direction_equal_to_the_probe_gives_the_probe_rotation() -> None:
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(6, 24, generator=g), torch.randn(24, generator=g)
    theta = torch.rand(6, generator=g)
    u_hat = rotation.unit_direction(w)[0]
    assert torch.allclose(pseudo_rotate(h, u_hat, theta), pseudo_rotate(h, w, theta), atol=1e-6)
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.equal(pseudo_rotate(h, w, theta, empty), pseudo_rotate(h, w, theta))


def test_a_direction_inside_the_protected_dims_leaves_tokens_unchanged() -> None:
    h = torch.randn(5, 8)
    u = torch.zeros(8)
    u[2] = 1.0  # all of u is protected: no direction is left to turn toward
    out = pseudo_rotate(h, u, 0.7, torch.tensor([2, 5]))
    assert torch.equal(out, h)


def test_no_d_by_d_matrix_with_protected_dims() -> None:
    d = 300_000  # a d x d matrix would need 360 GB
    g = torch.Generator().manual_seed(5)
    h, u = torch.randn(3, d, generator=g), torch.randn(d, generator=g)
    protected = torch.tensor([7, 1000, 299_999])
    out = pseudo_rotate(h, u, torch.tensor([0.1, 0.5, 2.0]), protected)
    assert _rel_norm_err(h, out).max() < 1e-5 and torch.equal(out[:, protected], h[:, protected])


def test_massive_dimensions_and_mean_difference_direction() -> None:
    g = torch.Generator().manual_seed(6)
    states = torch.randn(50, 16, generator=g)
    states[:, 3] += 1e4
    states[:, 11] -= 300.0
    assert rotation.massive_dimensions(states, 2).tolist() == [3, 11]
    assert rotation.massive_dimensions(states * 1e30, 1).tolist() == [3]  # any finite scale
    assert rotation.massive_dimensions(states, 0).numel() == 0
    positives, negatives = torch.randn(30, 16, generator=g) + 2.0, torch.randn(20, 16, generator=g)
    u = rotation.mean_difference_direction(positives, negatives)
    expected = positives.double().mean(0) - negatives.double().mean(0)
    assert torch.allclose(u.double(), expected / expected.norm(), atol=1e-6) and u.dtype == torch.float32
    assert torch.equal(rotation.mean_difference_direction(negatives, negatives), torch.zeros(16))


def test_bad_protected_dims_and_massive_counts_raise_clear_errors() -> None:
    h, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(TypeError, match="int64"):
        pseudo_rotate(h, w, 0.3, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="1-D"):
        pseudo_rotate(h, w, 0.3, torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        rotation.massive_dimensions(h, 8)
    with pytest.raises(ValueError, match="same d"):
        rotation.mean_difference_direction(h, torch.randn(2, 7))
