"""``hpr-peft fit``: fit an HPR adapter from contrastive pairs and save it with its report.

Writes into ``--output``, atomically: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
with HPR's model card (``README.md``, :func:`hpr_peft.hub.save_shareable_adapter`; ``--only-selected-layers``
keeps only the editors of the layers that edit), ``report.json`` and ``probe_accuracy.png``; ``--output``
is checked before the model is loaded. ``--objective preference`` fine-tunes the fitted editors of the
selected layers on the same training pairs with :func:`hpr_peft.fitting.fit_preference` (answer
likelihood through the frozen model, docs/fitting.md) and adds ``preference.json``; the validation
groups then come from one seeded split shared by both stages. ``--max-kl`` saves the adapter at the
strongest ``alpha`` whose KL on the neutral corpus stays within the budget (recorded in the report as
``settings.kl_calibration``), after any preference stage. Works under
``accelerate launch --num_processes N`` (collection is split across processes; rank 0 writes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from hpr_peft.cli.errors import one_line

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _layers(value: str) -> list[int] | str:
    if value.strip().lower() == "all":
        return "all"
    try:
        layers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers must be comma-separated block indices like 8,10,12 or 'all', got {value!r}"
        ) from None
    if not layers or any(x < 0 for x in layers):
        raise argparse.ArgumentTypeError(f"--layers must list non-negative block indices, got {value!r}")
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="Hub id, local folder, or bundled short name (smollm2, gemma3)."
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a folder or repo).")
    parser.add_argument(
        "--data",
        required=True,
        help="'truthfulqa' or a JSONL file of pairs {prompt, positive, negative, group?}.",
    )
    parser.add_argument(
        "--truthfulqa-dir",
        default=None,
        help="Folder with TruthfulQA mc_task.json, or the Hub id (default: $HPR_TRUTHFULQA_DIR).",
    )
    parser.add_argument(
        "--layers", type=_layers, default="all", help="Block indices to fit, e.g. 8,10,12, or 'all'."
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="Number of layers kept editing (by validation probe accuracy); 0 = all passing --min-accuracy.",
    )
    parser.add_argument(
        "--min-accuracy", type=float, default=None, help="Keep only layers with probe accuracy >= this."
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16, help="Pairs per training step.")
    parser.add_argument(
        "--angle-target",
        choices=["paper", "probe"],
        default="paper",
        help="Angle-net target: 'paper' = angle(x-, x+) (the paper's); 'probe' = the probe-consistent angle "
        "theta* (moves a negative to its positive's probe coordinate; two-stage training).",
    )
    _add_objective_arguments(parser)
    parser.add_argument(
        "--collect-batch-size", type=int, default=8, help="Sequences per forward pass while collecting."
    )
    parser.add_argument("--token-selection", choices=["last", "response"], default="last")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="Fraction of groups held out for validation."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pairs", type=int, default=None, help="Use only the first N pairs.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="Model dtype.")
    parser.add_argument("--device-map", default=None, help="Passed to from_pretrained (e.g. 'auto').")
    parser.add_argument(
        "--output", required=True, help="Output folder (adapter, report.json, probe_accuracy.png)."
    )
    parser.add_argument(
        "--only-selected-layers",
        action="store_true",
        help="Save only the editors of the selected (editing) layers: a smaller adapter, same logits.",
    )
    parser.add_argument(
        "--max-kl",
        type=float,
        default=None,
        help="After fitting, save the strongest alpha whose mean KL per token on the neutral corpus stays "
        "within this budget (nats, e.g. 0.05) instead of alpha 1.",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """The training objective (paper / preference) and the rotation options."""
    parser.add_argument(
        "--objective",
        choices=["paper", "preference"],
        default="paper",
        help="'paper' = the paper's per-layer probe + angle loss on activations; 'preference' = that, then "
        "the selected layers' editors fine-tuned end to end on answer likelihood (DPO-style, KL-penalised).",
    )
    parser.add_argument("--pref-epochs", type=int, default=1, help="Epochs of the preference stage.")
    parser.add_argument("--pref-lr", type=float, default=5e-3, help="Learning rate of the preference stage.")
    parser.add_argument("--pref-batch-size", type=int, default=8, help="Pairs per preference step.")
    parser.add_argument("--pref-beta", type=float, default=1.0, help="Scale of the preference margin.")
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=1.0,
        help="Weight of KL(edited || unedited) in the preference loss.",
    )
    parser.add_argument(
        "--kl-on",
        choices=["prompts", "neutral"],
        default="prompts",
        help="Where the KL is measured: the pairs' prompt tokens, or the bundled neutral paragraphs.",
    )
    parser.add_argument(
        "--kl-budget",
        type=float,
        default=0.0,
        help="Mean KL per token (nats) the preference loss lets pass for free; only the KL above it costs.",
    )
    parser.add_argument(
        "--pref-editor-lr",
        type=float,
        default=None,
        help="Learning rate of the probes and angle nets in the preference stage (default: --pref-lr). "
        "They read raw hidden states, so one step moves their outputs by up to lr * |h|_1.",
    )
    parser.add_argument(
        "--pref-freeze-probe",
        action="store_true",
        help="Train only the angle nets and gains in the preference stage; the probes keep their weights.",
    )
    parser.add_argument(
        "--rotation-direction",
        choices=["probe", "mean_difference"],
        default="probe",
        help="Turn flagged tokens toward the probe's direction (the paper's) or the mean difference "
        "mean(x+) - mean(x-) of the fitting activations; the probe still decides which tokens.",
    )
    parser.add_argument(
        "--exclude-massive-dims",
        type=int,
        default=0,
        help="Leave the K dimensions with the largest mean h_i^2 out of the rotation (0 = none; "
        "for models with massive activations such as Gemma-3).",
    )


def _load_pairs(args: argparse.Namespace):
    from hpr_peft import data

    if args.data == "truthfulqa":
        return data.load_truthfulqa(args.truthfulqa_dir)
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(
            f"--data {args.data!r}: no such file; pass 'truthfulqa' or a JSONL file of contrastive pairs."
        )
    return data.load_pairs_jsonl(path)


def _write_report(report, folder: Path, preference=None) -> None:
    """The report files, written into the new adapter folder so that they change together with it."""
    report.to_json(folder / "report.json")
    report.plot_probe_accuracy(folder / "probe_accuracy.png")
    if preference is not None:
        (folder / "preference.json").write_text(json.dumps(preference.to_dict(), indent=2) + "\n")


def _check_output_and_selection(args: argparse.Namespace) -> None:
    """Fail at once, not after the fit, on an unusable ``--output`` or selection option."""
    from hpr_peft.fitting.selection import check_selection
    from hpr_peft.runtime.atomic_files import check_output_path

    check_output_path(args.output, "directory")
    check_selection(args.top_k or None, args.min_accuracy)
    if args.max_kl is not None and not (math.isfinite(args.max_kl) and args.max_kl > 0):
        raise ValueError(
            f"--max-kl must be a KL budget > 0 in nats per token (e.g. 0.05), got {args.max_kl}."
        )


def _calibrate(peft_model, tokenizer, report, max_kl: float) -> None:
    """Set the adapter's alpha to the ``max_kl`` budget and record the calibration in the report
    (``report.json`` and the config's ``fit_results``)."""
    from hpr_peft.evaluation.calibration import calibrate_on_neutral
    from hpr_peft.tuner.control import hpr_tuner

    calibration = calibrate_on_neutral(peft_model, tokenizer, max_kl)
    tuner = hpr_tuner(peft_model)
    tuner.set_alpha(calibration.alpha)
    report.settings["kl_calibration"] = calibration.to_dict()
    tuner.peft_config[tuner.resolve_adapter(None)].fit_results = report.to_dict()
    print(f"alpha {calibration.alpha:.4g}: KL {calibration.kl:.4g} on the neutral corpus (budget {max_kl:g})")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"hpr-peft fit: error: {one_line(error)}", file=sys.stderr)
        return 2


def _checked_pairs(args: argparse.Namespace) -> list:
    """Check every option that needs no model, then load the pairs (fail before the slow part)."""
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be a positive int, got {args.max_pairs}.")
    if args.top_k < 0 or (args.top_k == 0 and args.min_accuracy is None):
        raise ValueError(
            f"--top-k must be a positive int (or 0 together with --min-accuracy), got {args.top_k}."
        )
    _check_output_and_selection(args)
    _preference_settings(args)
    pairs = _load_pairs(args)
    if args.max_pairs is not None:
        pairs = pairs[: args.max_pairs]
    if not pairs:
        raise ValueError(f"--data {args.data!r} gave no pairs.")
    return pairs


def _run(args: argparse.Namespace) -> int:
    import torch
    from peft import get_peft_model

    from hpr_peft import HPRConfig
    from hpr_peft.fitting import fit_hpr
    from hpr_peft.hub import save_shareable_adapter
    from hpr_peft.runtime.bundled_models import load_causal_lm
    from hpr_peft.runtime.model_io import ensure_distributed

    pairs = _checked_pairs(args)
    rank, _ = ensure_distributed()
    extra = {"device_map": args.device_map} if args.device_map else {}
    model, tokenizer = load_causal_lm(
        args.model,
        gguf_file=args.gguf_file,
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
        **extra,
    )
    config = HPRConfig(
        target_layers=args.layers,
        rotation_direction=args.rotation_direction,
        exclude_massive_dims=args.exclude_massive_dims,
    )
    peft_model = get_peft_model(model, config)
    pairs, validation_pairs = _split_for_preference(args, pairs)
    report = fit_hpr(
        peft_model,
        tokenizer,
        pairs,
        validation_pairs=validation_pairs,
        validation_fraction=args.val_fraction,
        top_k=args.top_k or None,
        min_accuracy=args.min_accuracy,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        angle_target=args.angle_target,
        token_selection=args.token_selection,
        collection_batch_size=args.collect_batch_size,
        progress=not args.no_progress,
    )
    preference = None
    if args.objective == "preference":
        preference = _fit_preference(args, peft_model, tokenizer, pairs, validation_pairs)
    if rank == 0:
        if args.max_kl is not None:
            _calibrate(peft_model, tokenizer, report, args.max_kl)
        out = Path(args.output)
        save_shareable_adapter(
            peft_model,
            out,
            only_selected_layers=args.only_selected_layers,
            add_files=lambda folder: _write_report(report, folder, preference),
        )
        print(report)
        if preference is not None:
            print(_preference_summary(preference))
        print(f"saved adapter, report.json and probe_accuracy.png to {out}")
    return 0


def _split_for_preference(args: argparse.Namespace, pairs: list) -> tuple[list, list | None]:
    """With ``--objective preference``: one seeded group split, so that neither stage trains on the
    validation groups; otherwise the pairs as given (fit_hpr splits them itself)."""
    from hpr_peft import data

    if args.objective != "preference" or args.val_fraction == 0:
        return pairs, None
    if not (0.0 < args.val_fraction < 1.0):
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}.")
    split = data.split_groups(
        [p.group_id for p in pairs], fractions=(1 - args.val_fraction, args.val_fraction, 0.0), seed=args.seed
    )
    return data.filter_pairs(pairs, split.train), data.filter_pairs(pairs, split.validation)


def _preference_settings(args: argparse.Namespace):
    """The preference stage's settings, checked before any model is loaded (None for ``paper``)."""
    from hpr_peft.fitting import PreferenceSettings

    if args.objective != "preference":
        return None
    settings = PreferenceSettings(
        epochs=args.pref_epochs,
        lr=args.pref_lr,
        batch_size=args.pref_batch_size,
        beta=args.pref_beta,
        kl_weight=args.kl_weight,
        kl_on=args.kl_on,
        kl_budget=args.kl_budget,
        freeze_probe=args.pref_freeze_probe,
        editor_lr=args.pref_editor_lr,
        seed=args.seed,
    )
    settings.validate()
    return settings


def _fit_preference(args: argparse.Namespace, model, tokenizer, pairs: list, validation_pairs: list | None):
    from hpr_peft.evaluation.side_effects import load_neutral_paragraphs
    from hpr_peft.fitting import fit_preference

    neutral = load_neutral_paragraphs() if args.kl_on == "neutral" else None
    return fit_preference(
        model,
        tokenizer,
        pairs,
        settings=_preference_settings(args),
        neutral_paragraphs=neutral,
        validation_pairs=validation_pairs,
        progress=not args.no_progress,
    )


def _preference_summary(preference) -> str:
    last = preference.epochs[-1]
    line = f"preference fit of layers {preference.layers}: loss {last.loss:.4f}, margin {last.margin:.3f}"
    if preference.val_after is not None:
        before, after = preference.val_before, preference.val_after
        line += (
            f"; validation accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, margin "
            f"{before['margin']:.3f} -> {after['margin']:.3f} (best epoch {preference.best_epoch})"
        )
    return line
