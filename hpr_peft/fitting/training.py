"""Training of HPR editors (a probe and an angle net per layer) from paired activations.

Per layer the loss is the paper's ``BCE(p(x), label) + MSE(f(x), target)`` over positives (label 1,
target angle 0) and negatives (label 0, target from the angle-target strategy,
:mod:`hpr_peft.fitting.angle_targets`) stacked, with AdamW, a linear warm-up over the first ``warmup``
fraction of steps and a linear decay to 0 after it. A target that needs no probe (``"paper"``) trains
probe and angle nets jointly in one stage; one that does (``"probe"``) trains the probe first (BCE,
best epoch by validation accuracy) and then, with that probe fixed, the angle nets (MSE, best epoch by
validation angle MSE). Every stage runs the same loop (:func:`_run_stage`).

Two lessons from fitting real models are built in:

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hpr_peft.fitting.activations import PairActivations
from hpr_peft.fitting.angle_targets import AngleTarget, angle_target_named
from hpr_peft.fitting.edit_geometry import (
    LayerGeometry,
    check_rotation_options,
    layer_geometries,
    target_inputs,
)
from hpr_peft.fitting.report import LayerFitResult
from hpr_peft.runtime.progress import progress_bar
from hpr_peft.tuner.angle_net import StackedAngleNets, angle_from_logits, default_angle_hidden_sizes

__all__ = ["EditorWeights", "TrainingSettings", "iter_layer_chunks", "train_editors"]


@dataclass
class EditorWeights:
    """Fitted weights of one layer, already folded to act on raw hidden states."""

    probe_weight: torch.Tensor  # (d,)
    angle_state_dict: dict[str, torch.Tensor]  # keys of build_angle_net(d, hidden_sizes)
    direction: torch.Tensor | None = None  # (d,) unit mean difference (rotation_direction="mean_difference")
    protected_dims: torch.Tensor | None = None  # int64 (k,) massive dimensions (exclude_massive_dims=k)


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings shared by every stage (``batch_size`` counts pairs)."""

    epochs: int = 5
    lr: float = 5e-4
    batch_size: int = 16
    warmup: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (pairs per step), got {self.batch_size!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}.")
        if not (0.0 <= self.warmup < 1.0):
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}.")


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
    rotation_direction: str = "probe",
    exclude_massive_dims: int = 0,
) -> tuple[dict[int, EditorWeights], list[LayerFitResult]]:
    """Train one probe + angle net per layer from paired activations; returns folded weights and
    per-layer metrics at each layer's best epoch (by validation probe accuracy, ties to the lower
    validation angle MSE; by training accuracy when there is no validation data).

    ``batch_size`` counts pairs (rows of positives and negatives: ``2 * batch_size`` inputs per step).
    ``layers_per_chunk`` trains that many layers at a time (bounds RAM for disk-backed activations).
    ``device`` is where training runs (default CPU); the returned weights are always on CPU.
    ``angle_target`` names a strategy of :mod:`hpr_peft.fitting.angle_targets`: ``"paper"`` (default,
    joint training on ``angle(x⁻, x⁺)``) or ``"probe"`` (the probe first, then the angle nets on the
    probe-consistent θ*; each layer keeps the angle net of its lowest validation angle MSE, reported as
    ``angle_best_epoch``). ``rotation_direction`` and ``exclude_massive_dims`` (as in ``HPRConfig``)
    add each layer's direction / protected dimensions to its weights and make the targets consistent
    with them (:mod:`hpr_peft.fitting.edit_geometry`).
    """
    target = angle_target_named(angle_target)
    layers = _checked_layers(train, layers)
    settings = TrainingSettings(
        epochs, lr, batch_size, warmup, weight_decay, seed, progress, torch.device(device or "cpu")
    )
    settings.validate()
    check_rotation_options(rotation_direction, exclude_massive_dims, train.hidden_size)
    if validation is not None and validation.n_rows == 0:
        validation = None
    d = train.hidden_size
    hidden_sizes = default_angle_hidden_sizes(d) if angle_hidden_sizes is None else list(angle_hidden_sizes)
    weights: dict[int, EditorWeights] = {}
    results: list[LayerFitResult] = []
    for chunk in iter_layer_chunks(layers, layers_per_chunk):
        geometries = layer_geometries(train, chunk, rotation_direction, exclude_massive_dims)
        chunk_weights, chunk_results = _train_chunk(
            train, validation, chunk, hidden_sizes, target, settings, geometries
        )
        weights.update(chunk_weights)
        results.extend(chunk_results)
    results.sort(key=lambda r: r.layer)
    return weights, results


def _checked_layers(train: PairActivations, layers: Sequence[int] | None) -> list[int]:
    layers = list(train.layers if layers is None else layers)
    if not layers:
        raise ValueError("layers is empty: nothing to train.")
    missing = [x for x in layers if x not in train.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the activations (collected layers: {train.layers}).")
    if train.n_rows == 0:
        raise ValueError("the training activations have no rows: give fit_hpr some training pairs.")
    return layers


def iter_layer_chunks(layers: Sequence[int], chunk: int | None) -> Iterator[list[int]]:
    """Split ``layers`` into chunks of at most ``chunk`` (None = one chunk)."""
    layers = list(layers)
    if chunk is None or chunk >= len(layers):
        yield layers
        return
    for i in range(0, len(layers), max(1, chunk)):
        yield layers[i : i + chunk]


# --------------------------------------------------------------------------------------------------
# Data of one chunk of layers


@dataclass
class _PairStack:
    """Standardised activations of a chunk of layers, ``(L, N, d)`` each, and the pairs' targets."""

    positives: torch.Tensor
    negatives: torch.Tensor
    source: PairActivations
    targets: torch.Tensor | None = None  # (L, N), set by the stage that needs them

    @property
    def n_pairs(self) -> int:
        return self.positives.shape[1]


def _raw_stack(
    acts: PairActivations, layers: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = [], []
    for layer in layers:
        p, n = acts.pair_tensors(layer)
        pos.append(p.to(device=device, dtype=torch.float32))
        neg.append(n.to(device=device, dtype=torch.float32))
    return torch.stack(pos), torch.stack(neg)


def _feature_scale(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Per-feature root mean square over the training rows, ``(L, d)``, floored away from 0."""
    n = positives.shape[1]
    scale = torch.sqrt((positives.pow(2).sum(1) + negatives.pow(2).sum(1)) / (2 * n))
    floor = scale.amax(dim=1, keepdim=True) * 1e-6 + 1e-12
    return torch.maximum(scale, floor)


def _scaled_stacks(
    train: PairActivations, validation: PairActivations | None, layers: list[int], device: torch.device
) -> tuple[_PairStack, _PairStack | None, torch.Tensor]:
    """Training and validation stacks divided (in place) by the training feature scale."""
    xp, xn = _raw_stack(train, layers, device)
    scale = _feature_scale(xp, xn)
    xp.div_(scale.unsqueeze(1))
    xn.div_(scale.unsqueeze(1))
    val = None
    if validation is not None:
        vp, vn = _raw_stack(validation, layers, device)
        vp.div_(scale.unsqueeze(1))
        vn.div_(scale.unsqueeze(1))
        val = _PairStack(vp, vn, validation)
    return _PairStack(xp, xn, train), val, scale


def _pair_targets(
    stack: _PairStack,
    layers: list[int],
    target: AngleTarget,
    raw_probes: torch.Tensor | None,
    geometries: list[LayerGeometry],
) -> torch.Tensor:
    """Targets ``(L, N)`` from the raw activations (re-read one layer at a time, so the standardised
    stack is never unscaled with rounding) and, for probe-based targets, the raw probes ``(L, d)``,
    seen through each layer's geometry (its direction, its protected dimensions zeroed)."""
    device = stack.positives.device
    out = []
    for i, layer in enumerate(layers):
        pos, neg = stack.source.pair_tensors(layer)
        pos = pos.to(device=device, dtype=torch.float32)
        neg = neg.to(device=device, dtype=torch.float32)
        probe = None if raw_probes is None else raw_probes[i]
        out.append(target.pair_targets(*target_inputs(neg, pos, probe, geometries[i])))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# One chunk: the stages of the angle target, then the folded weights and per-layer results


@dataclass(frozen=True)
class _Stage:
    """What one stage trains and how it ranks epochs: ``selection`` lists ``(metric, +1 | -1)``, the
    first decides, later ones break ties (+1: higher is better)."""

    name: str
    trains_probe: bool
    trains_angle: bool
    selection: tuple[tuple[str, int], ...]


_JOINT = _Stage("joint", True, True, (("accuracy", 1), ("angle_mse", -1)))
_PROBE = _Stage("probe", True, False, (("accuracy", 1), ("bce", -1)))
_ANGLE = _Stage("angle", False, True, (("angle_mse", -1),))


@dataclass
class _StageOutcome:
    best: list[torch.Tensor]  # the stage's parameters at each layer's best epoch (layer-major)
    best_epoch: list[int]
    best_record: list[dict[str, float | None]]


def _train_chunk(
    train: PairActivations,
    validation: PairActivations | None,
    layers: list[int],
    hidden_sizes: list[int],
    target: AngleTarget,
    settings: TrainingSettings,
    geometries: list[LayerGeometry],
) -> tuple[dict[int, EditorWeights], list[LayerFitResult]]:
    """Train the editors of ``layers`` with ``target``'s stages (one joint stage, or probe then angle)."""
    train_stack, val_stack, scale = _scaled_stacks(train, validation, layers, settings.device)
    L, N, d = train_stack.positives.shape
    stages = [_JOINT] if not target.needs_probe else [_PROBE, _ANGLE]
    loop = _Loop(settings, stages, L, N)
    probe = torch.zeros(L, d, device=settings.device, requires_grad=True)
    nets = None
    if stages[0] is _JOINT:
        _set_targets(train_stack, val_stack, layers, target, None, geometries)
        nets = _new_nets(d, hidden_sizes, layers, settings, train_stack)
        joint = loop.run(_JOINT, [probe, *nets.parameters()], probe, nets, train_stack, val_stack)
        probe_best, net_best, probe_outcome, angle_outcome = joint.best[0], joint.best[1:], joint, joint
    else:
        probe_outcome = loop.run(_PROBE, [probe], probe, None, train_stack, val_stack)
        probe_best = probe_outcome.best[0]
        _set_targets(train_stack, val_stack, layers, target, probe_best / scale, geometries)
        nets = _new_nets(d, hidden_sizes, layers, settings, train_stack)
        angle_outcome = loop.run(_ANGLE, nets.parameters(), probe_best, nets, train_stack, val_stack)
        net_best = angle_outcome.best
    loop.close()
    weights = _folded_weights(layers, scale, probe_best, net_best, nets)
    for layer, geometry in zip(layers, geometries, strict=True):
        weights[layer].direction, weights[layer].protected_dims = geometry.direction, geometry.protected
    results = _layer_results(layers, loop.history, probe_outcome, angle_outcome, separate=len(stages) > 1)
    return weights, results


def _set_targets(
    train: _PairStack,
    val: _PairStack | None,
    layers: list[int],
    target: AngleTarget,
    raw_probes,
    geometries: list[LayerGeometry],
) -> None:
    train.targets = _pair_targets(train, layers, target, raw_probes, geometries)
    if val is not None:
        val.targets = _pair_targets(val, layers, target, raw_probes, geometries)


def _layer_seed(seed: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(layer) * 7919 + 17) % (2**63 - 1)


def _new_nets(
    d: int, hidden_sizes: list[int], layers: list[int], settings: TrainingSettings, train: _PairStack
) -> StackedAngleNets:
    """Angle nets seeded per layer, their output bias at ``logit(mean target / π)`` (positives' target
    0 counts), so they do not start saturated near 0."""
    nets = StackedAngleNets.initialise(
        d, hidden_sizes, [_layer_seed(settings.seed, layer) for layer in layers], settings.device
    )
    targets = train.targets
    mean_angle = (targets.sum(1) / (2 * train.n_pairs)).clamp(1e-4, math.pi * (1 - 1e-4))
    with torch.no_grad():
        p = mean_angle / math.pi
        nets.biases[-1][:, 0] = torch.log(p) - torch.log1p(-p)
    return nets


def _folded_weights(
    layers: list[int],
    scale: torch.Tensor,
    probe: torch.Tensor,
    net_tensors: Sequence[torch.Tensor],
    nets: StackedAngleNets,
) -> dict[int, EditorWeights]:
    """Fold the feature scale into the (CPU) weights: the installed layer sees raw h."""
    scale = scale.cpu()
    probe = probe.cpu()
    n_linear = len(nets.weights)
    net_tensors = [t.cpu() for t in net_tensors]
    states = nets.state_dicts(net_tensors[:n_linear], net_tensors[n_linear:], scale)
    return {
        layer: EditorWeights((probe[i] / scale[i]).contiguous(), states[i]) for i, layer in enumerate(layers)
    }


def _layer_results(
    layers: list[int],
    history: list[list[dict[str, float | None]]],
    probe_outcome: _StageOutcome,
    angle_outcome: _StageOutcome,
    separate: bool,
) -> list[LayerFitResult]:
    results = []
    for i, layer in enumerate(layers):
        probe_record, angle_record = probe_outcome.best_record[i], angle_outcome.best_record[i]
        results.append(
            LayerFitResult(
                layer=layer,
                train_accuracy=float(probe_record["train_accuracy"]),
                train_angle_mse=float(angle_record["train_angle_mse"]),
                val_accuracy=probe_record["val_accuracy"],
                val_angle_mse=angle_record["val_angle_mse"],
                best_epoch=probe_outcome.best_epoch[i],
                angle_best_epoch=angle_outcome.best_epoch[i] if separate else None,
                history=history[i],
            )
        )
    return results


# --------------------------------------------------------------------------------------------------
# The loop every stage runs


class _Loop:
    """Runs stages over shared minibatch randomness (one generator seeded by ``settings.seed``), one
    progress bar and one per-layer, per-epoch history."""

    def __init__(self, settings: TrainingSettings, stages: list[_Stage], n_layers: int, n_pairs: int) -> None:
        self.settings = settings
        self.generator = torch.Generator().manual_seed(int(settings.seed))
        self.steps = math.ceil(n_pairs / settings.batch_size) * settings.epochs
        desc = f"fitting {n_layers} layer(s)" + (", probe then angle" if len(stages) > 1 else "")
        self.bar = progress_bar(self.steps * len(stages), desc, settings.progress, unit="step")
        self.history: list[list[dict[str, float | None]]] = [
            [{"epoch": e} for e in range(1, settings.epochs + 1)] for _ in range(n_layers)
        ]

    def close(self) -> None:
        self.bar.close()

    def run(
        self,
        stage: _Stage,
        params: list[torch.Tensor],
        probe: torch.Tensor,
        nets: StackedAngleNets | None,
        train: _PairStack,
        val: _PairStack | None,
    ) -> _StageOutcome:
        """Train ``params`` for ``settings.epochs`` epochs; keep each layer's best epoch."""
        s = self.settings
        optimizer = _adamw(params, s.lr, s.weight_decay)
        scheduler = _linear_schedule(optimizer, self.steps, s.warmup)
        n_layers = train.positives.shape[0]
        best_values = [
            torch.full((n_layers,), -math.inf * sign, dtype=torch.float64, device=s.device)
            for _, sign in stage.selection
        ]
        outcome = _StageOutcome([t.detach().clone() for t in params], [0] * n_layers, [{}] * n_layers)
        for epoch in range(1, s.epochs + 1):
            train_mse = self._epoch(stage, optimizer, scheduler, probe, nets, train)
            metrics = _epoch_metrics(stage, probe.detach(), nets, train, val, train_mse)
            key = metrics["val"] if val is not None else metrics["train"]
            improved = _improved(stage.selection, key, best_values)
            self._record(stage, epoch, metrics, improved, outcome)
            _keep_best(outcome.best, params, improved)
            for values, (name, _) in zip(best_values, stage.selection, strict=True):
                values.copy_(torch.where(improved, key[name], values))
            shown = key[stage.selection[0][0]]
            self.bar.set_postfix(
                stage=stage.name, epoch=epoch, **{stage.selection[0][0]: f"{float(shown.mean()):.3g}"}
            )
        return outcome

    def _epoch(self, stage, optimizer, scheduler, probe, nets, train: _PairStack) -> torch.Tensor:
        """One pass over shuffled minibatches; returns the mean minibatch angle MSE per layer."""
        s = self.settings
        n_layers, n_pairs = train.positives.shape[:2]
        labels = torch.cat([torch.ones(s.batch_size), torch.zeros(s.batch_size)]).to(s.device)
        perm = torch.randperm(n_pairs, generator=self.generator).to(s.device)
        mse_sum = torch.zeros(n_layers, dtype=torch.float64, device=s.device)
        for idx, b, x in _pair_batches(train.positives, train.negatives, perm, s.batch_size):
            losses = []
            if stage.trains_probe:
                y = labels if b == s.batch_size else labels.new_tensor([1.0] * b + [0.0] * b)
                logits = _probe_logits(x, probe)
                losses.append(
                    F.binary_cross_entropy_with_logits(logits, y.expand(n_layers, -1), reduction="none").mean(
                        1
                    )
                )
            if stage.trains_angle:
                t = torch.cat(
                    [train.targets.new_zeros(n_layers, b), train.targets.index_select(1, idx)], dim=1
                )
                mse = (nets.angles(x) - t).pow(2).mean(1)
                losses.append(mse)
                mse_sum += mse.detach().double() * b
            loss = (losses[0] + losses[1]).sum() if len(losses) == 2 else losses[0].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            self.bar.update(1)
        return mse_sum / n_pairs

    def _record(
        self, stage: _Stage, epoch: int, metrics, improved: torch.Tensor, outcome: _StageOutcome
    ) -> None:
        names = [n for n, on in (("accuracy", stage.trains_probe), ("angle_mse", stage.trains_angle)) if on]
        for i, record in enumerate(self.history):
            entry = record[epoch - 1]
            for split in ("train", "val"):
                for name in names:
                    values = metrics[split]
                    entry[f"{split}_{name}"] = None if values is None else float(values[name][i])
            if bool(improved[i]):
                outcome.best_epoch[i] = epoch
                outcome.best_record[i] = dict(entry)


def _improved(
    selection: tuple[tuple[str, int], ...], key: dict[str, torch.Tensor], best: list[torch.Tensor]
) -> torch.Tensor:
    """Per layer: is this epoch better than the best so far (lexicographic over ``selection``)? The
    first epoch always is (the best so far is still its ±inf start)."""
    (first, sign), *ties = selection
    better = (key[first] > best[0]) if sign > 0 else (key[first] < best[0])
    improved = better | ~torch.isfinite(best[0])
    equal = key[first] == best[0]
    for (name, tie_sign), best_tie in zip(ties, best[1:], strict=True):
        tie_better = (key[name] > best_tie) if tie_sign > 0 else (key[name] < best_tie)
        improved = improved | (equal & tie_better)
    return improved


def _epoch_metrics(
    stage: _Stage,
    probe: torch.Tensor,
    nets: StackedAngleNets | None,
    train: _PairStack,
    val: _PairStack | None,
    train_mse: torch.Tensor,
) -> dict[str, dict[str, torch.Tensor] | None]:
    """Training metrics (probe metrics over all rows, angle MSE as the mean of the minibatches) and
    validation metrics (everything over all rows) of the stage's selection and records."""
    wanted = {name for name, _ in stage.selection}
    if stage.trains_probe:
        wanted.add("accuracy")
    if stage.trains_angle:
        wanted.add("angle_mse")
    train_metrics = _stack_metrics(train, probe, None, wanted - {"angle_mse"})
    if "angle_mse" in wanted:
        train_metrics["angle_mse"] = train_mse
    val_metrics = None if val is None else _stack_metrics(val, probe, nets, wanted)
    return {"train": train_metrics, "val": val_metrics}


@torch.no_grad()
def _stack_metrics(
    stack: _PairStack, probe: torch.Tensor, nets: StackedAngleNets | None, wanted: set[str], chunk: int = 4096
) -> dict[str, torch.Tensor]:
    """Per-layer probe accuracy, mean BCE and angle MSE over positives and negatives (standardised x)."""
    if not wanted:
        return {}
    xp, xn = stack.positives, stack.negatives
    n = xp.shape[1]
    sums = {name: torch.zeros(xp.shape[0], dtype=torch.float64, device=xp.device) for name in wanted}
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        lp, ln = _probe_logits(xp[:, rows], probe), _probe_logits(xn[:, rows], probe)
        if "accuracy" in wanted:
            sums["accuracy"] += (lp > 0).sum(1).double() + (ln <= 0).sum(1).double()
        if "bce" in wanted:
            sums["bce"] += F.softplus(-lp).sum(1).double() + F.softplus(ln).sum(1).double()
        if "angle_mse" in wanted:
            ap = angle_from_logits(nets.logits(xp[:, rows]))
            an = angle_from_logits(nets.logits(xn[:, rows]))
            sums["angle_mse"] += (
                ap.pow(2).sum(1).double() + (an - stack.targets[:, rows]).pow(2).sum(1).double()
            )
    return {name: total / (2 * n) for name, total in sums.items()}


def _probe_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)


def _pair_batches(xp: torch.Tensor, xn: torch.Tensor, perm: torch.Tensor, batch_size: int):
    """``(idx, b, x)`` per minibatch of ``perm``: ``x`` stacks the positives then the negatives, ``(L, 2b, d)``."""
    for start in range(0, perm.numel(), batch_size):
        idx = perm[start : start + batch_size]
        yield idx, idx.numel(), torch.cat([xp.index_select(1, idx), xn.index_select(1, idx)], dim=1)


def _keep_best(best: list[torch.Tensor], params: list[torch.Tensor], improved: torch.Tensor) -> None:
    """Copy the layers whose epoch ``improved`` from ``params`` into ``best`` (layer-major tensors)."""
    with torch.no_grad():
        for kept, current in zip(best, params, strict=True):
            mask = improved.view(-1, *([1] * (current.dim() - 1)))
            kept.copy_(torch.where(mask, current.detach(), kept))


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one pass over the weights; ~5x faster than foreach on CPU) where supported."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # old torch or a device without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


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
