"""``fit_hpr``: from contrastive pairs to a trained, layer-selected HPR adapter, in one call.

The steps: collect the unedited model's activations of every pair (or take precomputed ones), split
off validation groups, train one editor per layer (:func:`hpr_peft.fitting.training.train_editors`),
install the editors, choose the layers that edit (:func:`hpr_peft.fitting.selection.select_layers`),
and write the report into the adapter's config so it is saved with it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpr_peft.data.splits import split_groups
from hpr_peft.fitting.activations import PairActivations
from hpr_peft.fitting.angle_targets import angle_target_named
from hpr_peft.fitting.collection import collect_activations
from hpr_peft.fitting.report import FitReport, LayerFitResult
from hpr_peft.fitting.selection import check_selection, select_layers
from hpr_peft.fitting.training import EditorWeights, train_editors
from hpr_peft.runtime.model_io import broadcast_from_rank0, distributed_rank_world
from hpr_peft.tuner.model import HPRModel, hpr_tuner

__all__ = ["LayerScorer", "check_validation_is_held_out", "fit_hpr"]

LayerScorer = Callable[[Any, int], float]


@dataclass
class _Fit:
    """Everything one ``fit_hpr`` call was asked to do (the keyword arguments, checked)."""

    tuner: HPRModel
    adapter: str
    layers: list[int]
    options: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


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
    ``hpr_peft.edit_settings(model, layers=[layer])`` inside it to score one layer alone).
    Every fitted layer gets its editor; only the selected ones edit. ``selected_layers`` and the
    report (``fit_results``) are written into the adapter's config, so they are saved with it.
    Under ``torch.distributed`` collection is split over ranks, training runs on rank 0 and the
    weights are broadcast, so every rank ends with the same adapter. ``training_device`` is where the
    editors train (default CPU; e.g. ``"cuda"``). ``angle_target`` names a strategy of
    :mod:`hpr_peft.fitting.angle_targets` (``"paper"``, default, or ``"probe"``); it is recorded in
    ``report.settings``. The adapter config's ``rotation_direction`` / ``exclude_massive_dims`` are
    honoured: each fitted layer also gets its mean-difference direction / massive dimensions, and the
    angle targets are measured accordingly (:mod:`hpr_peft.fitting.edit_geometry`).
    """
    options = {name: value for name, value in locals().items() if name not in ("model", "layers")}
    angle_target_named(angle_target)
    started = time.perf_counter()
    fit = _start(model, adapter_name, layers, options)
    train_acts, val_acts = _fit_activations(model, fit)
    weights, results = _train_on_rank0(train_acts, val_acts, fit)
    hpr_layers = fit.tuner.hpr_layers(fit.adapter)
    for layer, editor in weights.items():
        hpr_layers[layer].set_editor(
            fit.adapter,
            editor.probe_weight,
            editor.angle_state_dict,
            direction=editor.direction,
            protected_dims=editor.protected_dims,
        )
    selected, description = _select(model, results, fit)
    fit.tuner.set_selected_layers(selected, fit.adapter)
    fit.timings["total"] = time.perf_counter() - started
    report = _report(fit, results, selected, description, train_acts, val_acts)
    fit.tuner.peft_config[fit.adapter].fit_results = report.to_dict()
    return report


def _start(model: Any, adapter_name: str | None, layers: Sequence[int] | None, options: dict) -> _Fit:
    """The tuner, the adapter and the layers to fit, each checked."""
    try:
        tuner = hpr_tuner(model)
    except TypeError:
        raise TypeError(
            f"fit_hpr needs a PEFT model with an HPR adapter, got {type(model).__name__}: wrap the base model "
            "with peft.get_peft_model(model, hpr_peft.HPRConfig(target_layers=[...])) first."
        ) from None
    adapter = tuner.resolve_adapter(adapter_name)
    targets = sorted(tuner.hpr_layers(adapter))
    chosen = targets if layers is None else sorted({int(x) for x in layers})
    outside = [x for x in chosen if x not in targets]
    if outside:
        raise ValueError(
            f"layers {outside} are not target layers of adapter {adapter!r} (targets: {targets}): add them to "
            "HPRConfig.target_layers."
        )
    if not chosen:
        raise ValueError("layers is empty: name at least one target layer to fit.")
    fraction = options["validation_fraction"]
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction!r}.")
    options["top_k"], options["min_accuracy"] = check_selection(options["top_k"], options["min_accuracy"])
    return _Fit(tuner, adapter, chosen, options)


def _fit_activations(model: Any, fit: _Fit) -> tuple[PairActivations, PairActivations | None]:
    """Training and validation activations: collected from the pairs, or the precomputed ones."""
    o = fit.options
    if o["activations"] is None:
        train_acts, val_acts = _collect(model, fit)
    else:
        if not isinstance(o["activations"], PairActivations):
            raise TypeError(f"activations must be a PairActivations, got {type(o['activations']).__name__}.")
        train_acts, val_acts = o["activations"], o["validation_activations"]
        o["token_selection"] = train_acts.token_selection
    if train_acts.n_pairs == 0 or train_acts.n_rows == 0:
        raise ValueError("no training pairs: fit_hpr needs at least one contrastive pair.")
    if val_acts is None and o["validation_fraction"] > 0:
        train_acts, val_acts = _split_validation(train_acts, o["validation_fraction"], o["seed"])
    return train_acts, val_acts


def _collect(model: Any, fit: _Fit) -> tuple[PairActivations, PairActivations | None]:
    o = fit.options
    pairs, validation_pairs = o["pairs"], o["validation_pairs"]
    if pairs is None or len(pairs) == 0:
        raise ValueError("pairs is empty: fit_hpr needs contrastive pairs (or precomputed activations).")
    if o["tokenizer"] is None:
        raise ValueError("tokenizer is required to collect activations from pairs.")
    check_validation_is_held_out(pairs, validation_pairs or [])
    all_pairs = list(pairs) + list(validation_pairs or [])
    started = time.perf_counter()
    collected = collect_activations(
        model,
        o["tokenizer"],
        all_pairs,
        layers=fit.layers,
        token_selection=o["token_selection"],
        batch_size=o["collection_batch_size"],
        storage_dtype=o["storage_dtype"],
        progress=o["progress"],
    )
    fit.timings["collection"] = time.perf_counter() - started
    n_train = len(pairs)
    train_acts = collected.select_pairs(range(n_train))
    val_acts = collected.select_pairs(range(n_train, len(all_pairs))) if validation_pairs else None
    return train_acts, val_acts


def _pair_text(pair: Any) -> tuple[Any, Any, Any]:
    return getattr(pair, "prompt", None), getattr(pair, "positive", None), getattr(pair, "negative", None)


def check_validation_is_held_out(pairs: Sequence[Any], validation_pairs: Sequence[Any]) -> None:
    """Refuse validation pairs that are also training pairs (their probe accuracy would be training
    accuracy, leaked into the layer choice); warn when a group has pairs on both sides."""
    training = {_pair_text(pair) for pair in pairs}
    shared = [pair for pair in validation_pairs if _pair_text(pair) in training]
    if shared:
        raise ValueError(
            f"{len(shared)} of {len(validation_pairs)} validation pairs are also training pairs (e.g. prompt "
            f"{_pair_text(shared[0])[0]!r:.80}): the validation accuracy would be training accuracy. Remove "
            "them from validation_pairs, or drop validation_pairs and hold out groups with validation_fraction."
        )
    groups = {getattr(pair, "group_id", None) for pair in pairs} - {None}
    both = sorted({getattr(pair, "group_id", None) for pair in validation_pairs} & groups)
    if both:
        warnings.warn(
            f"{len(both)} group(s) have pairs in both the training and the validation pairs (e.g. {both[0]!r}): "
            "pairs of one source example on both sides inflate the validation accuracy. Split by group "
            "(hpr_peft.data.split_groups) or use validation_fraction.",
            stacklevel=4,
        )


def _split_validation(
    acts: PairActivations, fraction: float, seed: int
) -> tuple[PairActivations, PairActivations]:
    """Hold out a seeded ``fraction`` of the groups (never a group on both sides)."""
    groups = sorted({acts.pair_group_ids[i] for i in acts.row_pair.unique().tolist()})
    if len(groups) < 2:
        raise ValueError(
            f"validation_fraction={fraction} needs at least 2 groups of pairs, found {len(groups)}: "
            "pass validation_pairs, more data, or validation_fraction=0."
        )
    split = split_groups(groups, fractions=(1.0 - fraction, fraction, 0.0), seed=seed)
    return acts.select_groups(split.train), acts.select_groups(split.validation)


def _train_on_rank0(
    train_acts: PairActivations, val_acts: PairActivations | None, fit: _Fit
) -> tuple[dict[int, EditorWeights], list[LayerFitResult]]:
    """Train on rank 0 only and broadcast the result (every rank ends with the same editors)."""
    o = fit.options
    started = time.perf_counter()
    trained = None
    if distributed_rank_world()[0] == 0:
        trained = train_editors(
            train_acts,
            val_acts,
            layers=fit.layers,
            angle_hidden_sizes=fit.tuner.peft_config[fit.adapter].angle_hidden_sizes,
            epochs=o["epochs"],
            lr=o["lr"],
            batch_size=o["batch_size"],
            warmup=o["warmup"],
            weight_decay=o["weight_decay"],
            seed=o["seed"],
            progress=o["progress"],
            device=o["training_device"],
            angle_target=o["angle_target"],
            **_rotation_options(fit),
        )
    weights, results = broadcast_from_rank0(trained)
    fit.timings["training"] = time.perf_counter() - started
    return weights, results


def _rotation_options(fit: _Fit) -> dict[str, Any]:
    """The adapter config's ``rotation_direction`` and ``exclude_massive_dims`` (the trainer measures
    the direction and the massive dimensions they ask for)."""
    config = fit.tuner.peft_config[fit.adapter]
    return {
        "rotation_direction": config.rotation_direction,
        "exclude_massive_dims": config.exclude_massive_dims,
    }


def _select(model: Any, results: list[LayerFitResult], fit: _Fit) -> tuple[list[int], str]:
    """The editing layers: by the user's layer scorer when given, else by probe accuracy."""
    o = fit.options
    scores = None
    if o["layer_scorer"] is not None:
        scores = {}
        for result in results:
            scores[result.layer] = float(o["layer_scorer"](model, result.layer))
            result.score = scores[result.layer]
    selected, description = select_layers(
        results, top_k=o["top_k"], min_accuracy=o["min_accuracy"], scores=scores
    )
    if not selected:
        accuracies = {r.layer: round(r.selection_accuracy, 3) for r in results}
        raise ValueError(
            f"no layer passed the selection ({description}); probe accuracies: {accuracies}. "
            "Lower min_accuracy or use top_k."
        )
    return selected, description


def _report(
    fit: _Fit,
    results: list[LayerFitResult],
    selected: list[int],
    description: str,
    train_acts: PairActivations,
    val_acts: PairActivations | None,
) -> FitReport:
    o = fit.options
    collected = o["validation_pairs"] is None and o["activations"] is None
    return FitReport(
        layers=results,
        selected_layers=selected,
        selection=description,
        token_selection=o["token_selection"],
        n_train_pairs=len(set(train_acts.row_pair.tolist())),
        n_val_pairs=0 if val_acts is None else len(set(val_acts.row_pair.tolist())),
        n_train_rows=train_acts.n_rows,
        n_val_rows=0 if val_acts is None else val_acts.n_rows,
        timings=fit.timings,
        settings={
            "epochs": o["epochs"],
            "lr": o["lr"],
            "batch_size": o["batch_size"],
            "warmup": o["warmup"],
            "lr_schedule": "linear warmup, then linear decay to 0",
            "weight_decay": o["weight_decay"],
            "seed": o["seed"],
            "angle_target": o["angle_target"],
            **_rotation_options(fit),
            "feature_scaling": "per-feature RMS (no centring), folded into the weights",
            "validation_fraction": o["validation_fraction"] if collected else None,
        },
    )
