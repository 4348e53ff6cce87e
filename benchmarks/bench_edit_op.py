"""Benchmark: the O(d) HPR edit vs a naive edit that builds the Householder matrix.

The naive op is the paper's recipe taken literally: build ``H = I - 2 w wᵀ / wᵀw`` (d x d), reflect
every token with a matmul ``r = h Hᵀ``, take ``gamma = acos(h·r / |h||r|)`` and interpolate
``h' = sin(θ)/sin(γ) r + sin(γ-θ)/sin(γ) h``. Ours is :func:`hpr_peft.rotation.pseudo_rotate`
(the stable form of docs/math.md, O(d) per token, never a d x d matrix). Both run in float32 on CPU on
the same tokens (all on the negative side of the probe, so both formulas describe the same edit), and
both are compared with the float64 reference (:func:`hpr_peft.rotation.slerp_reference`). At
d = 4096 random tokens lie close to the hyperplane (sin gamma ~ 0.02), where the naive float32 slerp
loses digits or returns NaN (gamma rounds to 0): agreement is checked on tokens with sin gamma >= 0.03
and the naive op's failures elsewhere are counted.

Run: ``python benchmarks/bench_edit_op.py [--dim 4096] [--tokens 4096] [--repeats 5] [--threads N]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from hpr_peft.rotation import pseudo_rotate, reflection_angle, slerp_reference


def naive_edit(h: torch.Tensor, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The paper's formula with an explicit d x d Householder matrix (what NOT to do)."""
    d = w.shape[0]
    householder = torch.eye(d, dtype=h.dtype) - 2.0 * torch.outer(w, w) / (w @ w)
    r = h @ householder.T
    cos_gamma = (h * r).sum(-1) / (torch.linalg.vector_norm(h, dim=-1) * torch.linalg.vector_norm(r, dim=-1))
    gamma = torch.acos(cos_gamma.clamp(-1.0, 1.0))
    sin_gamma = torch.sin(gamma)
    return (torch.sin(theta) / sin_gamma).unsqueeze(-1) * r + (
        torch.sin(gamma - theta) / sin_gamma
    ).unsqueeze(-1) * h


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token relative error ``|out - ref| / |ref|`` in float64."""
    diff = torch.linalg.vector_norm(out.double() - ref, dim=-1)
    return diff / torch.linalg.vector_norm(ref, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=4096, help="hidden size d (default 4096)")
    parser.add_argument("--tokens", type=int, default=4096, help="number of tokens (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each op (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dim < 2 or args.tokens < 1 or args.repeats < 1:
        parser.error("--dim must be >= 2, --tokens and --repeats >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(args.dim, generator=g)
    h = torch.randn(args.tokens, args.dim, generator=g) * 10.0
    h = torch.where((h @ w > 0).unsqueeze(-1), -h, h)  # negative tokens: the ones HPR edits
    theta = torch.rand(args.tokens, generator=g) * math.pi

    with torch.no_grad():
        ours_out = pseudo_rotate(h, w, theta)  # warm-up, and the results compared below
        naive_out = naive_edit(h, w, theta)
        ours_t, naive_t = [], []
        for _ in range(args.repeats):  # interleaved, so that machine load drifts hit both alike
            naive_t.append(_timed(lambda: naive_edit(h, w, theta)))
            ours_t.append(_timed(lambda: pseudo_rotate(h, w, theta)))
        ref = slerp_reference(h, w, theta)

    ours_med, naive_med = statistics.median(ours_t), statistics.median(naive_t)
    print(
        f"edit op, {args.tokens} tokens x d={args.dim}, float32, CPU, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(
        f"  naive (d x d Householder matrix + slerp): {naive_med * 1e3:10.2f} ms  (min {min(naive_t) * 1e3:.2f})"
    )
    print(
        f"  hpr_peft.rotation.pseudo_rotate (O(d)):  {ours_med * 1e3:10.2f} ms  (min {min(ours_t) * 1e3:.2f})"
    )
    print(f"  speed-up (naive / ours, medians):        {naive_med / ours_med:10.1f}x")
    # sin(gamma) from the stable formula in float64: how close each token is to the hyperplane (or to -w)
    sin_gamma = torch.sin(reflection_angle(h.double(), w.double()))
    well = sin_gamma >= 0.03
    agree = _rel_err(ours_out, naive_out.double())[well]
    tol = 1e-3
    ok = bool((agree <= tol).all())
    print(
        f"  same result on well-conditioned tokens (sin gamma >= 0.03: {int(well.sum())} of {args.tokens}): "
        f"max |ours - naive| / |h| = {agree.max().item():.2e} -> {'yes' if ok else 'NO'} (tol {tol:g})"
    )
    for name, out in (("ours", ours_out), ("naive", naive_out)):
        finite = torch.isfinite(out).all(-1)
        err = _rel_err(out, ref)
        err_f = err[finite]
        print(
            f"  {name:5s} vs float64 reference (all tokens): non-finite {int((~finite).sum())}, "
            f"max rel err {err_f.max().item():.2e}, median {err_f.median().item():.2e}, "
            f"tokens off by > 1e-3: {int((err > 1e-3).sum() + (~finite).sum())}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
