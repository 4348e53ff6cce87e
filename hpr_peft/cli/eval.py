"""``hpr-peft eval``: TruthfulQA MC1/MC2 of a model (optionally with an HPR adapter) with side effects.

The adapter loads through :func:`hpr_peft.load_adapter` (safetensors only, validated); ``--alpha``,
``--max-kl``, the question ids and ``--output`` are checked before the model is loaded. ``--max-kl``
evaluates the adapter at the strongest ``alpha`` whose KL on the neutral corpus stays within the
budget (:func:`hpr_peft.evaluation.calibration.calibrate_on_neutral`), recorded in ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="bundled short name (smollm2, gemma3), Hub id or folder"
    )
    parser.add_argument("--adapter", default=None, help="folder (or Hub id) of a saved HPR adapter")
    parser.add_argument("--alpha", type=float, default=None, help="override the adapter's alpha")
    parser.add_argument(
        "--max-kl",
        type=float,
        default=None,
        help="instead of --alpha: the strongest alpha whose mean KL per token on the neutral corpus "
        "stays within this budget (nats), calibrated before evaluating",
    )
    parser.add_argument(
        "--questions",
        default=None,
        help="file with question ids (one per line, or a JSON list) to score; default all 817",
    )
    parser.add_argument(
        "--truthfulqa-dir",
        default=None,
        help="folder with mc_task.json, or the Hub id (default $HPR_TRUTHFULQA_DIR)",
    )
    parser.add_argument("--output", required=True, help="folder for eval.json")
    parser.add_argument("--no-side-effects", action="store_true", help="skip perplexity / KL on neutral text")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")


def _read_ids(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--questions {path}: no such file; give a file of question ids (tqa-0000 ...)."
        )
    text = file.read_text(encoding="utf-8-sig").strip()
    if text.startswith("["):
        ids = json.loads(text)
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"--questions {path} lists no question id.")
    return [str(x) for x in ids]


def _check_before_loading(args: argparse.Namespace) -> tuple[float | None, list[str] | None]:
    """``(alpha, question ids)`` checked, and ``--output`` checked writable, before any slow work."""
    from hpr_peft.data import load_truthfulqa_mc
    from hpr_peft.runtime.atomic_files import check_output_path
    from hpr_peft.tuner.config import validate_alpha

    check_output_path(Path(args.output) / "eval.json", "file")
    if args.alpha is not None and not args.adapter:
        raise ValueError("--alpha sets the strength of an adapter: pass --adapter DIR as well.")
    if args.max_kl is not None:
        _check_max_kl(args)
    if args.adapter:
        from hpr_peft.hub.adapter_files import check_hpr_peft_type
        from hpr_peft.hub.load import fetch_adapter

        folder, config = fetch_adapter(args.adapter)
        check_hpr_peft_type(config, folder, args.adapter)
    alpha = None if args.alpha is None else validate_alpha(args.alpha)
    question_ids = _read_ids(args.questions) if args.questions else None
    if question_ids is not None:
        known = {q.question_id for q in load_truthfulqa_mc(args.truthfulqa_dir)}
        unknown = [q for q in question_ids if q not in known]
        if unknown:
            raise ValueError(
                f"--questions {args.questions}: {len(unknown)} id(s) are not TruthfulQA question ids, e.g. "
                f"{unknown[:3]}; ids look like {sorted(known)[0]!r}."
            )
    return alpha, question_ids


def _check_max_kl(args: argparse.Namespace) -> None:
    if args.alpha is not None:
        raise ValueError("--alpha and --max-kl both set the strength: pass one of them.")
    if not args.adapter:
        raise ValueError("--max-kl calibrates the strength of an adapter: pass --adapter DIR as well.")
    if not math.isfinite(args.max_kl) or args.max_kl <= 0:
        raise ValueError(
            f"--max-kl must be a KL budget > 0 in nats per token (e.g. 0.05), got {args.max_kl}."
        )


def _calibrate(model, tokenizer, max_kl: float) -> dict:
    """The calibration of the loaded adapter to ``max_kl`` (printed), as a dict for eval.json."""
    from hpr_peft.evaluation.calibration import calibrate_on_neutral

    calibration = calibrate_on_neutral(model, tokenizer, max_kl)
    print(f"alpha {calibration.alpha:.4g}: KL {calibration.kl:.4g} on the neutral corpus (budget {max_kl:g})")
    return calibration.to_dict()


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    import hpr_peft  # noqa: F401  (registers the PEFT type)
    from hpr_peft.evaluation import evaluate_truthfulqa
    from hpr_peft.runtime.atomic_files import write_text_atomic
    from hpr_peft.runtime.bundled_models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    alpha, question_ids = _check_before_loading(args)
    model, tokenizer = load_model(args.model, progress=not args.no_progress)
    context, calibration = None, None
    if args.adapter:
        from hpr_peft.hub import load_adapter
        from hpr_peft.runtime.progress import quiet_library_bars

        with quiet_library_bars(args.no_progress):
            model = load_adapter(model, args.adapter)
        model.eval()
        if args.max_kl is not None:
            calibration = _calibrate(model, tokenizer, args.max_kl)
            alpha = calibration["alpha"]
        if alpha is not None:
            from hpr_peft.tuner.control import edit_settings

            def context() -> contextlib.AbstractContextManager:
                return edit_settings(model, alpha=alpha)

    result = evaluate_truthfulqa(
        model,
        tokenizer,
        truthfulqa_dir=args.truthfulqa_dir,
        question_ids=question_ids,
        context=context,
        side_effects=not args.no_side_effects,
        progress=not args.no_progress,
    )
    result["model"] = args.model
    result["adapter"] = args.adapter
    if calibration is not None:
        result["kl_calibration"] = calibration
    write_text_atomic(Path(args.output) / "eval.json", json.dumps(result, indent=1))
    tq = result["truthfulqa"]
    line = f"MC1 {100 * tq['mc1']:.1f} ± {100 * tq['mc1_se']:.1f} %  MC2 {100 * tq['mc2']:.1f} ± {100 * tq['mc2_se']:.1f} %"
    if "side_effects" in result:
        se = result["side_effects"]
        line += f"  KL {se['kl']:.4f}  perplexity {se['perplexity']:.2f} (unedited {se['reference_perplexity']:.2f})"
    print(f"{tq['n']} questions: {line}  [{tq['seconds']:.0f} s]")
    return 0
