"""``hpr-peft fit``: fit an HPR adapter from contrastive pairs and save it with its report.

Writes into ``--output``: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
via ``save_pretrained``), ``report.json`` and ``probe_accuracy.png``. Works under
``accelerate launch --num_processes N`` (collection is split across processes; rank 0 writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


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


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"hpr-peft fit: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch
    from peft import get_peft_model

    from hpr_peft import HPRConfig
    from hpr_peft.fitting import fit_hpr
    from hpr_peft.runtime.bundled_models import load_causal_lm
    from hpr_peft.runtime.model_io import ensure_distributed

    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be a positive int, got {args.max_pairs}.")
    if args.top_k < 0 or (args.top_k == 0 and args.min_accuracy is None):
        raise ValueError(
            f"--top-k must be a positive int (or 0 together with --min-accuracy), got {args.top_k}."
        )
    pairs = _load_pairs(args)
    if args.max_pairs is not None:
        pairs = pairs[: args.max_pairs]
    if not pairs:
        raise ValueError(f"--data {args.data!r} gave no pairs.")

    rank, _ = ensure_distributed()
    extra = {"device_map": args.device_map} if args.device_map else {}
    model, tokenizer = load_causal_lm(
        args.model,
        gguf_file=args.gguf_file,
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
        **extra,
    )
    peft_model = get_peft_model(model, HPRConfig(target_layers=args.layers))
    report = fit_hpr(
        peft_model,
        tokenizer,
        pairs,
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
    if rank == 0:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out), save_embedding_layers=False)
        report.to_json(out / "report.json")
        report.plot_probe_accuracy(out / "probe_accuracy.png")
        print(report)
        print(f"saved adapter, report.json and probe_accuracy.png to {out}")
    return 0
