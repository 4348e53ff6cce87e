"""Training of HPR editors (probe + angle net per layer), layer selection, and :func:`fit_hpr`.

Per layer the loss is the paper's ``BCE(p(x), label) + MSE(f(x), angle(x, x⁺))`` over positives
(label 1, target angle 0) and negatives (label 0, target ``angle(x⁻, x⁺)``) stacked, with AdamW,
a linear warm-up over the first ``warmup`` fraction of steps and a linear decay to 0 after it.

``angle_target="probe"`` replaces the negatives' target by the probe-consistent angle
``θ* = max(0, ∠(x⁻, ŵ) − ∠(x⁺, ŵ))`` (:func:`hpr_peft.rotation.probe_consistent_angle`) and trains in
two stages: first the probe alone (BCE, best epoch by validation accuracy), then, with that probe
fixed, the angle nets (MSE against θ* computed from the raw activations and the raw probe, best epoch
by validation angle MSE). ``"paper"`` (the default) is the paper's single joint stage.

Two prototype lessons are built in (DESIGN §2):

- features are divided by a per-feature scale (root mean square over the training rows) — *scale
  only, never centred*: centring would add a bias and move the hyperplane off the origin, breaking
  the norm preservation of the reflection. The scale is folded into the weights afterwards
  (``w_eff = w / s``; first angle Linear ``W_eff = W / s``), so the installed layer sees raw ``h``;
- the angle net's output bias starts at ``logit(mean target angle / π)`` so it does not saturate.

All layers train in one loop as batched tensors (``torch.bmm``/``baddbmm``; AdamW is elementwise,
so one optimizer over the stacked ``(L, ...)`` parameters equals one optimizer per layer). Each
layer's initial weights come from a generator seeded by ``(seed, layer)`` and minibatches from
``seed`` alone, so a layer's fit does not depend on which other layers are fitted alongside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpr_peft.fitting.activations import PairActivations, collect_activations, iter_layer_chunks
from hpr_peft.fitting.report import FitReport, LayerFitResult

LayerScorer = Callable[[Any, int], float]
ANGLE_TARGETS = ("paper", "probe")


def _check_angle_target(angle_target: object) -> str:
    if not isinstance(angle_target, str) or angle_target not in ANGLE_TARGETS:
        raise ValueError(
            f"angle_target must be one of {list(ANGLE_TARGETS)} ('paper': the paper's angle(x⁻, x⁺); "
            f"'probe': the probe-consistent angle θ*), got {angle_target!r}."
        )
    return angle_target


@dataclass
class EditorWeights:
    """Fitted weights of one layer, already folded to act on raw hidden states."""

    probe_weight: torch.Tensor  # (d,)
    angle_state_dict: dict[str, torch.Tensor]  # keys of build_angle_net(d, hidden_sizes)


def _angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        from hpr_peft.rotation import angle_between
    except ImportError:  # pragma: no cover - rotation.py is the math colleague's; fallback formula
        a_hat = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        b_hat = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return 2 * torch.atan2((a_hat - b_hat).norm(dim=-1), (a_hat + b_hat).norm(dim=-1))
    return angle_between(a, b).float()


def _layer_seed(seed: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(layer) * 7919 + 17) % (2**63 - 1)


def _init_angle_params(d: int, hidden_sizes: list[int], seed: int, layers: list[int], device: torch.device):
    """Stacked (L, in, out) weights / (L, out) biases of the angle nets, nn.Linear default init
    per layer from a generator seeded by (seed, layer)."""
    from hpr_peft.tuner.layer import build_angle_net

    weights: list[list[torch.Tensor]] = []
    biases: list[list[torch.Tensor]] = []
    for layer in layers:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_layer_seed(seed, layer))
            net = build_angle_net(d, hidden_sizes)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        weights.append([lin.weight.detach().t().contiguous() for lin in linears])
        biases.append([lin.bias.detach().clone() for lin in linears])
    n_lin = len(weights[0])
    W = [
        torch.stack([weights[i][k] for i in range(len(layers))]).to(device).requires_grad_(True)
        for k in range(n_lin)
    ]
    B = [
        torch.stack([biases[i][k] for i in range(len(layers))]).to(device).requires_grad_(True)
        for k in range(n_lin)
    ]
    return W, B


def _angle_logits(x: torch.Tensor, W: list[torch.Tensor], B: list[torch.Tensor]) -> torch.Tensor:
    h = x
    for k in range(len(W)):
        h = torch.baddbmm(B[k].unsqueeze(1), h, W[k])
        if k < len(W) - 1:
            h = F.gelu(h)
    return h.squeeze(-1)


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one pass over the weights; ~5x faster than foreach on CPU) where supported."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - old torch / exotic device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _probe_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)


def _load_stack(
    acts: PairActivations, layers: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = [], []
    for layer in layers:
        p, n = acts.pair_tensors(layer)
        pos.append(p.to(device=device, dtype=torch.float32))
        neg.append(n.to(device=device, dtype=torch.float32))
    return torch.stack(pos), torch.stack(neg)


@torch.no_grad()
def _evaluate(
    xp: torch.Tensor,
    xn: torch.Tensor,
    target: torch.Tensor,
    w,
    W,
    B,
    with_angle: bool = True,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer probe accuracy, angle MSE (NaN unless ``with_angle``), probe accuracy on positives
    (all on standardised x)."""
    n = xp.shape[1]
    correct = torch.zeros(xp.shape[0], dtype=torch.float64, device=xp.device)
    correct_pos = torch.zeros_like(correct)
    sq = torch.zeros_like(correct)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        lp, ln = _probe_logits(xp[:, sl], w), _probe_logits(xn[:, sl], w)
        correct_pos += (lp > 0).sum(1).double()
        correct += (lp > 0).sum(1).double() + (ln <= 0).sum(1).double()
        if not with_angle:
            continue
        ap = math.pi * torch.sigmoid(_angle_logits(xp[:, sl], W, B))
        an = math.pi * torch.sigmoid(_angle_logits(xn[:, sl], W, B))
        sq += ap.pow(2).sum(1).double() + (an - target[:, sl]).pow(2).sum(1).double()
    mse = sq / (2 * n) if with_angle else torch.full_like(sq, math.nan)
    return correct / (2 * n), mse, correct_pos / n


def train_editors(
    train: PairActivations,
    validation: PairActivations | None = None,
    *,
    layers: Sequence[int] | None = None,
    angle_hidden_sizes: Sequence[int] | None = None,
    epochs: int = 5,
    lr: float = 5e-4,
    batch_size: int = 16,
    warmup: float = 0.05,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    layers_per_chunk: int | None = None,
    device: str | torch.device | None = None,
    angle_target: str = "paper",
) -> tuple[dict[int, EditorWeights], list[LayerFitResult]]:
    """Train one probe + angle net per layer from paired activations; returns folded weights and
    per-layer metrics at each layer's best epoch (by validation probe accuracy, ties to the lower
    validation angle MSE; by training accuracy when there is no validation data).

    ``batch_size`` counts pairs (rows of positives and negatives: ``2 * batch_size`` inputs per step).
    ``layers_per_chunk`` trains that many layers at a time (bounds RAM for disk-backed activations).
    ``device`` is where training runs (default CPU); the returned weights are always on CPU.

    ``angle_target``: ``"paper"`` (default) trains probe and angle net jointly on the paper's target
    ``angle(x⁻, x⁺)``. ``"probe"`` trains the probe first (same BCE, optimiser and best-epoch rule),
    then the angle nets for ``epochs`` more epochs with the chosen probe fixed, on the
    probe-consistent target θ* (:func:`hpr_peft.rotation.probe_consistent_angle`, from raw activations
    and the raw probe); each layer keeps the angle net of its lowest validation angle MSE (training
    MSE without validation data), reported as ``angle_best_epoch``.
    """
    angle_target = _check_angle_target(angle_target)
    layers = list(train.layers if layers is None else layers)
    if not layers:
        raise ValueError("layers is empty: nothing to train.")
    missing = [x for x in layers if x not in train.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the activations (collected layers: {train.layers}).")
    if train.n_rows == 0:
        raise ValueError("the training activations have no rows: give fit_hpr some training pairs.")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (pairs per step), got {batch_size!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    if not (0.0 <= warmup < 1.0):
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {warmup!r}.")
    if validation is not None and validation.n_rows == 0:
        validation = None
    d = train.hidden_size
    from hpr_peft.tuner.layer import build_angle_net, default_angle_hidden_sizes

    hidden_sizes = default_angle_hidden_sizes(d) if angle_hidden_sizes is None else list(angle_hidden_sizes)

    weights: dict[int, EditorWeights] = {}
    results: list[LayerFitResult] = []
    for chunk in iter_layer_chunks(layers, layers_per_chunk):
        w_chunk, r_chunk = _train_chunk(
            train,
            validation,
            chunk,
            hidden_sizes,
            epochs,
            lr,
            batch_size,
            warmup,
            weight_decay,
            seed,
            progress,
            torch.device(device) if device is not None else torch.device("cpu"),
            angle_target,
        )
        for layer in chunk:
            template = build_angle_net(d, hidden_sizes)
            keys = [name for name, _ in template.named_parameters()]
            probe, tensors = w_chunk[layer]
            if len(keys) != len(tensors):  # pragma: no cover - defensive: layout drift in layer.py
                raise RuntimeError(
                    "angle net layout of hpr_peft.tuner.layer.build_angle_net changed unexpectedly."
                )
            weights[layer] = EditorWeights(probe, dict(zip(keys, tensors, strict=True)))
        results.extend(r_chunk)
    results.sort(key=lambda r: r.layer)
    return weights, results


def _linear_schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first ``warmup`` fraction of ``total`` steps, then linear decay to 0."""
    warm_steps = round(warmup * total)

    def lr_factor(step: int) -> float:
        if warm_steps and step < warm_steps:
            return (step + 1) / warm_steps
        return max(0.0, (total - step) / max(1, total - warm_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _fold(
    layers: list[int],
    scale: torch.Tensor,
    w_best: torch.Tensor,
    W_best: list[torch.Tensor],
    B_best: list[torch.Tensor],
) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Fold the feature scale into the (CPU) weights: the installed layer sees raw h."""
    scale = scale.cpu()
    out: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for i, layer in enumerate(layers):
        probe = (w_best[i] / scale[i]).contiguous()
        tensors: list[torch.Tensor] = []
        for k in range(len(W_best)):
            weight = W_best[k][i].t().contiguous()  # (out, in) like nn.Linear
            if k == 0:
                weight = (weight / scale[i].unsqueeze(0)).contiguous()
            tensors += [weight, B_best[k][i].clone().contiguous()]
        out[layer] = (probe, tensors)
    return out


@torch.no_grad()
def _probe_metrics(
    xp: torch.Tensor, xn: torch.Tensor, w: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer probe accuracy and mean BCE over positives and negatives (standardised x)."""
    n = xp.shape[1]
    correct = torch.zeros(xp.shape[0], dtype=torch.float64, device=xp.device)
    bce = torch.zeros_like(correct)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        lp, ln = _probe_logits(xp[:, sl], w), _probe_logits(xn[:, sl], w)
        correct += (lp > 0).sum(1).double() + (ln <= 0).sum(1).double()
        bce += F.softplus(-lp).sum(1).double() + F.softplus(ln).sum(1).double()
    return correct / (2 * n), bce / (2 * n)


def _pair_batches(xp: torch.Tensor, xn: torch.Tensor, perm: torch.Tensor, batch_size: int):
    """``(idx, b, x)`` per minibatch of ``perm``: ``x`` stacks the positives then the negatives, ``(L, 2b, d)``."""
    for start in range(0, perm.numel(), batch_size):
        idx = perm[start : start + batch_size]
        yield idx, idx.numel(), torch.cat([xp.index_select(1, idx), xn.index_select(1, idx)], dim=1)


def _init_angle_output_bias(B: list[torch.Tensor], target: torch.Tensor, n: int) -> None:
    """Start each angle net at logit(mean target / π) (positives' target 0 counts), not near 0."""
    mean_angle = (target.sum(1) / (2 * n)).clamp(1e-4, math.pi * (1 - 1e-4))
    with torch.no_grad():
        p = mean_angle / math.pi
        B[-1][:, 0] = torch.log(p) - torch.log1p(-p)


def _keep_best(best: list[torch.Tensor], params: list[torch.Tensor], improved: torch.Tensor) -> None:
    """Copy the layers whose epoch ``improved`` from ``params`` into ``best`` (layer-major tensors)."""
    with torch.no_grad():
        for kept, current in zip(best, params, strict=True):
            mask = improved.view(-1, *([1] * (current.dim() - 1)))
            kept.copy_(torch.where(mask, current.detach(), kept))


def _probe_targets(acts: PairActivations, layers: list[int], w_raw: torch.Tensor, device) -> torch.Tensor:
    """θ* of every pair, ``(L, N)``, from the raw activations (re-read one layer at a time, so the
    standardised training stack is not unscaled with rounding) and the raw probes ``(L, d)``."""
    from hpr_peft.rotation import probe_consistent_angle

    out = []
    for i, layer in enumerate(layers):
        pos, neg = acts.pair_tensors(layer)
        pos = pos.to(device=device, dtype=torch.float32)
        neg = neg.to(device=device, dtype=torch.float32)
        out.append(probe_consistent_angle(neg, pos, w_raw[i]).float())
    return torch.stack(out)


def _train_chunk_two_stage(
    train: PairActivations,
    validation: PairActivations | None,
    layers: list[int],
    hidden_sizes: list[int],
    epochs: int,
    lr: float,
    batch_size: int,
    warmup: float,
    weight_decay: float,
    seed: int,
    progress: bool,
    device: torch.device,
    xp: torch.Tensor,
    xn: torch.Tensor,
    vp: torch.Tensor | None,
    vn: torch.Tensor | None,
    scale: torch.Tensor,
):
    """``angle_target="probe"``: stage 1 trains the probes (BCE), stage 2 the angle nets (MSE against
    θ* of the stage-1 probes, held fixed). ``xp``/``xn``/``vp``/``vn`` are already standardised."""
    L, N, d = xp.shape
    steps_per_epoch = math.ceil(N / batch_size)
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).to(device)
    history: list[list[dict[str, float | None]]] = [
        [{"epoch": e} for e in range(1, epochs + 1)] for _ in range(L)
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * total, desc=f"fitting {L} layer(s), probe then angle", unit="step")

    # ---- stage 1: probes only; best epoch by validation accuracy, ties to the lower validation BCE
    w = torch.zeros(L, d, device=device, requires_grad=True)
    optimizer = _adamw([w], lr=lr, weight_decay=weight_decay)
    scheduler = _linear_schedule(optimizer, total, warmup)
    best_key = torch.full((L,), -math.inf, dtype=torch.float64, device=device)
    best_bce = torch.full((L,), math.inf, dtype=torch.float64, device=device)
    w_best = w.detach().clone()
    probe_epoch = [0] * L
    probe_metrics: list[dict[str, float | None]] = [{} for _ in range(L)]
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(N, generator=gen).to(device)
        for _idx, b, x in _pair_batches(xp, xn, perm, batch_size):
            y = labels if b == batch_size else labels.new_tensor([1.0] * b + [0.0] * b)
            logits = _probe_logits(x, w)
            bce = F.binary_cross_entropy_with_logits(logits, y.expand(L, -1), reduction="none").mean(1)
            optimizer.zero_grad(set_to_none=True)
            bce.sum().backward()
            optimizer.step()
            scheduler.step()
            if bar is not None:
                bar.update(1)
        train_acc, train_bce = _probe_metrics(xp, xn, w.detach())
        val_acc = None
        if vp is not None:
            val_acc, val_bce = _probe_metrics(vp, vn, w.detach())
            key, key_bce = val_acc, val_bce
        else:
            key, key_bce = train_acc, train_bce
        improved = (key > best_key) | ((key == best_key) & (key_bce < best_bce))
        for i in range(L):
            record = history[i][epoch - 1]
            record["train_accuracy"] = float(train_acc[i])
            record["val_accuracy"] = None if val_acc is None else float(val_acc[i])
            if bool(improved[i]):
                probe_epoch[i] = epoch
                probe_metrics[i] = dict(record)
        with torch.no_grad():
            w_best.copy_(torch.where(improved.unsqueeze(1), w.detach(), w_best))
        best_key = torch.where(improved, key, best_key)
        best_bce = torch.where(improved, key_bce, best_bce)
        if bar is not None:
            shown = val_acc if val_acc is not None else train_acc
            bar.set_postfix(stage="probe", epoch=epoch, acc=f"{float(shown.mean()):.3f}")

    # ---- stage 2: angle nets on θ* of the fixed probes (raw coordinates: w_raw = w / s, as folded)
    w_raw = w_best / scale
    target = _probe_targets(train, layers, w_raw, device)  # (L, N)
    vtarget = _probe_targets(validation, layers, w_raw, device) if vp is not None else None
    W, B = _init_angle_params(d, hidden_sizes, seed, layers, device)
    _init_angle_output_bias(B, target, N)
    params = [*W, *B]
    optimizer = _adamw(params, lr=lr, weight_decay=weight_decay)
    scheduler = _linear_schedule(optimizer, total, warmup)
    best_mse = torch.full((L,), math.inf, dtype=torch.float64, device=device)
    best = [t.detach().clone() for t in params]
    angle_epoch = [0] * L
    angle_metrics: list[dict[str, float | None]] = [{} for _ in range(L)]
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(N, generator=gen).to(device)
        mse_sum = torch.zeros(L, dtype=torch.float64, device=device)
        for idx, b, x in _pair_batches(xp, xn, perm, batch_size):
            t = torch.cat([target.new_zeros(L, b), target.index_select(1, idx)], dim=1)
            angle = math.pi * torch.sigmoid(_angle_logits(x, W, B))
            mse = (angle - t).pow(2).mean(1)
            optimizer.zero_grad(set_to_none=True)
            mse.sum().backward()
            optimizer.step()
            scheduler.step()
            mse_sum += mse.detach().double() * b
            if bar is not None:
                bar.update(1)
        train_mse = mse_sum / N
        val_mse = None
        if vp is not None:
            _, val_mse, _ = _evaluate(
                vp, vn, vtarget, w_best, [t.detach() for t in W], [t.detach() for t in B]
            )
            key_mse = val_mse
        else:
            key_mse = train_mse
        improved = (key_mse < best_mse) | ~torch.isfinite(best_mse)  # epoch 1 always counts
        for i in range(L):
            record = history[i][epoch - 1]
            record["train_angle_mse"] = float(train_mse[i])
            record["val_angle_mse"] = None if val_mse is None else float(val_mse[i])
            if bool(improved[i]):
                angle_epoch[i] = epoch
                angle_metrics[i] = dict(record)
        _keep_best(best, params, improved)
        best_mse = torch.where(improved, key_mse, best_mse)
        if bar is not None:
            shown = val_mse if val_mse is not None else train_mse
            bar.set_postfix(stage="angle", epoch=epoch, mse=f"{float(shown.mean()):.2e}")
    if bar is not None:
        bar.close()

    n_lin = len(W)
    best = [t.cpu() for t in best]
    out = _fold(layers, scale, w_best.cpu(), best[:n_lin], best[n_lin:])
    results = [
        LayerFitResult(
            layer=layer,
            train_accuracy=float(probe_metrics[i]["train_accuracy"]),
            train_angle_mse=float(angle_metrics[i]["train_angle_mse"]),
            val_accuracy=probe_metrics[i]["val_accuracy"],
            val_angle_mse=angle_metrics[i]["val_angle_mse"],
            best_epoch=probe_epoch[i],
            angle_best_epoch=angle_epoch[i],
            history=history[i],
        )
        for i, layer in enumerate(layers)
    ]
    return out, results


def _train_chunk(
    train: PairActivations,
    validation: PairActivations | None,
    layers: list[int],
    hidden_sizes: list[int],
    epochs: int,
    lr: float,
    batch_size: int,
    warmup: float,
    weight_decay: float,
    seed: int,
    progress: bool,
    device: torch.device,
    angle_target: str = "paper",
):
    L = len(layers)
    xp, xn = _load_stack(train, layers, device)  # (L, N, d)
    N, d = xp.shape[1], xp.shape[2]
    if angle_target == "paper":
        target = torch.stack([_angle_between(xn[i], xp[i]) for i in range(L)])  # (L, N)
    # per-feature scale (RMS over training rows), no centring
    scale = torch.sqrt((xp.pow(2).sum(1) + xn.pow(2).sum(1)) / (2 * N))  # (L, d)
    floor = scale.amax(dim=1, keepdim=True) * 1e-6 + 1e-12
    scale = torch.maximum(scale, floor)
    xp.div_(scale.unsqueeze(1))
    xn.div_(scale.unsqueeze(1))
    vp = vn = None
    if validation is not None:
        vp, vn = _load_stack(validation, layers, device)
        if angle_target == "paper":
            vtarget = torch.stack([_angle_between(vn[i], vp[i]) for i in range(L)])
        vp.div_(scale.unsqueeze(1))
        vn.div_(scale.unsqueeze(1))
    if angle_target == "probe":
        return _train_chunk_two_stage(
            train, validation, layers, hidden_sizes, epochs, lr, batch_size, warmup, weight_decay, seed,
            progress, device, xp, xn, vp, vn, scale,
        )  # fmt: skip

    w = torch.zeros(L, d, device=device, requires_grad=True)
    W, B = _init_angle_params(d, hidden_sizes, seed, layers, device)
    _init_angle_output_bias(B, target, N)
    params = [w, *W, *B]
    optimizer = _adamw(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(N / batch_size)
    total = steps_per_epoch * epochs
    scheduler = _linear_schedule(optimizer, total, warmup)
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).to(device)

    best_key = torch.full((L,), -math.inf, dtype=torch.float64, device=device)
    best_mse = torch.full((L,), math.inf, dtype=torch.float64, device=device)
    best = [t.detach().clone() for t in params]
    best_epoch = [0] * L
    history: list[list[dict[str, float | None]]] = [[] for _ in range(L)]
    best_metrics: list[dict[str, float | None]] = [{} for _ in range(L)]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"fitting {L} layer(s)", unit="step")
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(N, generator=gen).to(device)
        mse_sum = torch.zeros(L, dtype=torch.float64, device=device)
        for idx, b, x in _pair_batches(xp, xn, perm, batch_size):
            y = labels if b == batch_size else labels.new_tensor([1.0] * b + [0.0] * b)
            t = torch.cat([target.new_zeros(L, b), target.index_select(1, idx)], dim=1)
            logits = _probe_logits(x, w)
            angle = math.pi * torch.sigmoid(_angle_logits(x, W, B))
            bce = F.binary_cross_entropy_with_logits(logits, y.expand(L, -1), reduction="none").mean(1)
            mse = (angle - t).pow(2).mean(1)
            loss = (bce + mse).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            mse_sum += mse.detach().double() * b
            if bar is not None:
                bar.update(1)
        train_mse = mse_sum / N
        train_acc, _, _ = _evaluate(
            xp, xn, target, w.detach(), [t.detach() for t in W], [t.detach() for t in B], with_angle=False
        )
        if validation is not None:
            val_acc, val_mse, _ = _evaluate(
                vp, vn, vtarget, w.detach(), [t.detach() for t in W], [t.detach() for t in B]
            )
            key, key_mse = val_acc, val_mse
        else:
            val_acc = val_mse = None
            key, key_mse = train_acc, train_mse
        improved = (key > best_key) | ((key == best_key) & (key_mse < best_mse))
        for i in range(L):
            record = {
                "epoch": epoch,
                "train_accuracy": float(train_acc[i]),
                "train_angle_mse": float(train_mse[i]),
                "val_accuracy": None if val_acc is None else float(val_acc[i]),
                "val_angle_mse": None if val_mse is None else float(val_mse[i]),
            }
            history[i].append(record)
            if bool(improved[i]):
                best_epoch[i] = epoch
                best_metrics[i] = record
        _keep_best(best, params, improved)
        best_key = torch.where(improved, key, best_key)
        best_mse = torch.where(improved, key_mse, best_mse)
        if bar is not None:
            shown = val_acc if val_acc is not None else train_acc
            bar.set_postfix(epoch=epoch, acc=f"{float(shown.mean()):.3f}")
    if bar is not None:
        bar.close()

    n_lin = len(W)
    best = [t.cpu() for t in best]
    out = _fold(layers, scale, best[0], best[1 : 1 + n_lin], best[1 + n_lin :])
    results: list[LayerFitResult] = []
    for i, layer in enumerate(layers):
        m = best_metrics[i]
        results.append(
            LayerFitResult(
                layer=layer,
                train_accuracy=float(m["train_accuracy"]),
                train_angle_mse=float(m["train_angle_mse"]),
                val_accuracy=m["val_accuracy"],
                val_angle_mse=m["val_angle_mse"],
                best_epoch=best_epoch[i],
                history=history[i],
            )
        )
    return out, results


def select_layers(
    results: Sequence[LayerFitResult],
    top_k: int | None = 5,
    min_accuracy: float | None = None,
    scores: dict[int, float] | None = None,
) -> tuple[list[int], str]:
    """Choose the editing layers; returns ``(sorted layers, description)``.

    With ``scores`` (a user scorer's values, higher is better) layers are ranked by score, else by
    validation probe accuracy (training accuracy without validation data). ``min_accuracy`` keeps
    layers whose probe accuracy reaches it; ``top_k`` then keeps the best ``k``. Ties break toward
    the lower layer index.
    """
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
    if top_k is None and min_accuracy is None and scores is None:
        raise ValueError("give top_k, min_accuracy or a layer scorer to select layers.")
    pool = list(results)
    parts = []
    if min_accuracy is not None:
        pool = [r for r in pool if r.selection_accuracy >= min_accuracy]
        parts.append(f"probe accuracy >= {min_accuracy:g}")

    def rank(r: LayerFitResult) -> tuple[float, int]:
        value = scores[r.layer] if scores is not None else r.selection_accuracy
        return (-(value if value is not None and math.isfinite(value) else -math.inf), r.layer)

    pool.sort(key=rank)
    criterion = (
        "layer scorer"
        if scores is not None
        else (
            "validation probe accuracy"
            if any(r.val_accuracy is not None for r in results)
            else "training probe accuracy"
        )
    )
    if top_k is not None:
        pool = pool[:top_k]
        parts.append(f"top {top_k} by {criterion}")
    elif scores is not None:
        parts.append("ranked by layer scorer")
    return sorted(r.layer for r in pool), ", ".join(parts)


def _hpr_parts(model: Any, adapter_name: str | None):
    from hpr_peft.tuner.model import HPRModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, HPRModel):
        raise TypeError(
            f"fit_hpr needs a PEFT model with an HPR adapter, got {type(model).__name__}: wrap the base model "
            "with peft.get_peft_model(model, hpr_peft.HPRConfig(target_layers=[...])) first."
        )
    adapter = adapter_name or model.active_adapter
    if adapter not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter!r}; adapters: {sorted(model.peft_config)}.")
    return tuner, adapter, model.peft_config[adapter]


def _broadcast(obj: Any) -> Any:
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def fit_hpr(
    model: Any,
    tokenizer: Any = None,
    pairs: Sequence[Any] | None = None,
    layers: Sequence[int] | None = None,
    *,
    validation_pairs: Sequence[Any] | None = None,
    validation_fraction: float = 0.2,
    top_k: int | None = 5,
    min_accuracy: float | None = None,
    layer_scorer: LayerScorer | None = None,
    epochs: int = 5,
    lr: float = 5e-4,
    batch_size: int = 16,
    warmup: float = 0.05,
    weight_decay: float = 0.01,
    seed: int = 0,
    token_selection: str = "last",
    activations: PairActivations | None = None,
    validation_activations: PairActivations | None = None,
    collection_batch_size: int = 8,
    storage_dtype: torch.dtype = torch.float32,
    adapter_name: str | None = None,
    progress: bool = True,
    training_device: str | torch.device | None = None,
    angle_target: str = "paper",
) -> FitReport:
    """Collect activations, train an editor per layer, install them and choose the editing layers.

    ``model`` is a PEFT model with an HPR adapter (``get_peft_model(base, HPRConfig(...))``);
    ``layers`` defaults to the adapter's target layers. Validation: ``validation_pairs`` if given,
    else a ``validation_fraction`` of the groups of ``pairs`` (split by group with
    :func:`hpr_peft.data.splits.split_groups`, seeded; 0 = no validation). Precomputed ``activations``
    (and ``validation_activations``) skip collection. Layers are chosen by ``top_k`` /
    ``min_accuracy`` on validation probe accuracy, or by ``layer_scorer(model, layer) -> float``
    (higher is better; called once per fitted layer after all editors are installed; use
    ``hpr_peft.tuner.control.edit_settings(model, layers=[layer])`` inside it to score one layer alone).
    Every fitted layer gets its editor; only the selected ones edit. ``selected_layers`` and the
    report (``fit_results``) are written into the adapter's config, so they are saved with it.
    Under ``torch.distributed`` collection is split over ranks, training runs on rank 0 and the
    weights are broadcast, so every rank ends with the same adapter. ``training_device`` is where the
    editors train (default CPU; e.g. ``"cuda"``). ``angle_target`` is ``"paper"`` (default, the
    paper's target ``angle(x⁻, x⁺)``) or ``"probe"`` (the probe-consistent θ*, two-stage training; see
    :func:`train_editors`); it is recorded in ``report.settings``.
    """
    angle_target = _check_angle_target(angle_target)
    t0 = time.perf_counter()
    tuner, adapter, config = _hpr_parts(model, adapter_name)
    hpr_layers = tuner.hpr_layers(adapter)
    targets = sorted(hpr_layers)
    layers = targets if layers is None else sorted({int(x) for x in layers})
    outside = [x for x in layers if x not in hpr_layers]
    if outside:
        raise ValueError(
            f"layers {outside} are not target layers of adapter {adapter!r} (targets: {targets}): add them to "
            "HPRConfig.target_layers."
        )
    if not layers:
        raise ValueError("layers is empty: name at least one target layer to fit.")
    if not (0.0 <= validation_fraction < 1.0):
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")

    timings: dict[str, float] = {}
    if activations is None:
        if pairs is None or len(pairs) == 0:
            raise ValueError("pairs is empty: fit_hpr needs contrastive pairs (or precomputed activations).")
        if tokenizer is None:
            raise ValueError("tokenizer is required to collect activations from pairs.")
        all_pairs = list(pairs) + list(validation_pairs or [])
        t = time.perf_counter()
        collected = collect_activations(
            model,
            tokenizer,
            all_pairs,
            layers=layers,
            token_selection=token_selection,
            batch_size=collection_batch_size,
            storage_dtype=storage_dtype,
            progress=progress,
        )
        timings["collection"] = time.perf_counter() - t
        n_train = len(pairs)
        train_acts = collected.select_pairs(range(n_train))
        val_acts = collected.select_pairs(range(n_train, len(all_pairs))) if validation_pairs else None
    else:
        if not isinstance(activations, PairActivations):
            raise TypeError(f"activations must be a PairActivations, got {type(activations).__name__}.")
        train_acts, val_acts = activations, validation_activations
        token_selection = activations.token_selection
    if train_acts.n_pairs == 0 or train_acts.n_rows == 0:
        raise ValueError("no training pairs: fit_hpr needs at least one contrastive pair.")

    if val_acts is None and validation_fraction > 0:
        from hpr_peft.data.splits import split_groups

        groups = sorted({train_acts.pair_group_ids[i] for i in train_acts.row_pair.unique().tolist()})
        if len(groups) < 2:
            raise ValueError(
                f"validation_fraction={validation_fraction} needs at least 2 groups of pairs, found {len(groups)}: "
                "pass validation_pairs, more data, or validation_fraction=0."
            )
        split = split_groups(
            groups, fractions=(1.0 - validation_fraction, validation_fraction, 0.0), seed=seed
        )
        val_acts = train_acts.select_groups(split.validation)
        train_acts = train_acts.select_groups(split.train)

    rank = (
        torch.distributed.get_rank()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 0
    )
    t = time.perf_counter()
    trained = None
    if rank == 0:
        trained = train_editors(
            train_acts,
            val_acts,
            layers=layers,
            angle_hidden_sizes=config.angle_hidden_sizes,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            warmup=warmup,
            weight_decay=weight_decay,
            seed=seed,
            progress=progress,
            device=training_device,
            angle_target=angle_target,
        )
    weights, results = _broadcast(trained)
    timings["training"] = time.perf_counter() - t

    for layer, editor in weights.items():
        hpr_layers[layer].set_editor(adapter, editor.probe_weight, editor.angle_state_dict)

    scores = None
    if layer_scorer is not None:
        scores = {}
        for r in results:
            scores[r.layer] = float(layer_scorer(model, r.layer))
            r.score = scores[r.layer]
    selected, description = select_layers(results, top_k=top_k, min_accuracy=min_accuracy, scores=scores)
    if not selected:
        raise ValueError(
            f"no layer passed the selection ({description}); probe accuracies: "
            f"{ {r.layer: round(r.selection_accuracy, 3) for r in results} }. Lower min_accuracy or use top_k."
        )
    tuner.set_selected_layers(selected, adapter)
    timings["total"] = time.perf_counter() - t0
    report = FitReport(
        layers=results,
        selected_layers=selected,
        selection=description,
        token_selection=token_selection,
        n_train_pairs=len(set(train_acts.row_pair.tolist())),
        n_val_pairs=0 if val_acts is None else len(set(val_acts.row_pair.tolist())),
        n_train_rows=train_acts.n_rows,
        n_val_rows=0 if val_acts is None else val_acts.n_rows,
        timings=timings,
        settings={
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "warmup": warmup,
            "lr_schedule": "linear warmup, then linear decay to 0",
            "weight_decay": weight_decay,
            "seed": seed,
            "angle_target": angle_target,
            "feature_scaling": "per-feature RMS (no centring), folded into the weights",
            "validation_fraction": validation_fraction
            if validation_pairs is None and activations is None
            else None,
        },
    )
    config.fit_results = report.to_dict()
    return report


__all__ = [
    "ANGLE_TARGETS",
    "EditorWeights",
    "FitReport",
    "LayerFitResult",
    "fit_hpr",
    "select_layers",
    "train_editors",
]
