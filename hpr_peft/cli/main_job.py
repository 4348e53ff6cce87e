"""``hpr-peft main``: the full TruthfulQA job (cross-validated HPR fit, additive baseline, report, plots)."""

from __future__ import annotations

import argparse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="output folder (default outputs/<model>)")
    parser.add_argument(
        "--model", default="smollm2", help="bundled short name (smollm2, gemma3), Hub id or local folder"
    )
    parser.add_argument(
        "--truthfulqa-dir",
        default=None,
        help="folder with mc_task.json (default $HPR_TRUTHFULQA_DIR; run.sh sets it to "
        "../shared/data/truthfulqa), or the Hub id truthfulqa/truthful_qa",
    )
    # Defaults of the job's settings live in hpr_peft.experiment.settings.JobSettings; None here means "its default".
    parser.add_argument(
        "--folds", type=int, default=None, help="cross-validation folds by question (default 2)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few questions only (CI smoke test)")
    parser.add_argument("--quick-questions", type=int, default=None)
    parser.add_argument(
        "--max-questions",
        type=int,
        default=None,
        help="score a seeded random subset of this many questions (default: all 817)",
    )
    parser.add_argument(
        "--token-selection",
        choices=["last", "response"],
        default=None,
        help="which completion tokens train the editors (default last)",
    )
    parser.add_argument(
        "--angle-target",
        choices=["paper", "probe"],
        default=None,
        help="what the angle nets learn: the paper's angle(x-, x+) or the probe-consistent angle (default paper)",
    )
    _add_comparison_arguments(parser)
    _add_objective_arguments(parser)
    parser.add_argument("--validation-fraction", type=float, default=None)
    parser.add_argument("--max-validation-questions", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--neutral-paragraphs",
        type=int,
        default=None,
        help="use only the first N paragraphs of the neutral corpus (faster side effects)",
    )
    parser.add_argument(
        "--generation-questions",
        type=int,
        default=None,
        help="held-out questions answered by greedy generation per method, scored with lm-eval's "
        "truthfulqa_gen metrics (default 40; 0 = no generation)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation length cap (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")


def _add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """How methods are matched (KL targets) and how layers are searched."""
    parser.add_argument(
        "--kl-targets",
        type=_floats,
        default=None,
        help="side-effect budgets: each method's strength is calibrated to each KL(edited || unedited) "
        "on neutral text, and methods are compared at each (default 0.05,0.1)",
    )
    parser.add_argument(
        "--layer-search",
        choices=["effect", "probe"],
        default=None,
        help="choose edited layers by validation MC2 at matched KL (effect, default) or by probe accuracy",
    )
    parser.add_argument(
        "--screen-layers", type=int, default=None, help="single layers screened by effect (default 6)"
    )
    parser.add_argument(
        "--screen-questions",
        type=int,
        default=None,
        help="validation questions used to screen single layers (default 80)",
    )
    parser.add_argument(
        "--top-k", type=_ints, default=None, help="sizes of the layer sets to try, e.g. 1,3 (default 1,3)"
    )
    parser.add_argument(
        "--calibration-tolerance",
        type=float,
        default=None,
        help="calibrated KL lies in [target*(1-tolerance), target] (default 0.1)",
    )
    parser.add_argument(
        "--rotation-direction",
        choices=["probe", "mean_difference"],
        default=None,
        help="turn flagged tokens toward the probe normal (paper, default) or the mean difference",
    )
    parser.add_argument(
        "--exclude-massive-dims",
        type=int,
        default=None,
        help="leave the K dimensions with the largest mean h_i^2 out of the rotation (default 0)",
    )
    parser.add_argument(
        "--paper-config",
        action="store_true",
        help="the paper's configuration: chat-format multiple-choice prompts, response tokens, a 4-layer "
        "angle net, top-5 layers by probe accuracy",
    )
    parser.add_argument(
        "--no-replay",
        action="store_true",
        help="run every block in every validation pass (default: blocks below the first edited one are "
        "recorded once and replayed)",
    )


def _add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """How the editors are trained: the paper's objective or the preference objective, and its settings."""
    parser.add_argument(
        "--objective",
        choices=["paper", "preference"],
        default=None,
        help="HPR training: the paper's objective, or that fit fine-tuned end to end on answer likelihood "
        "with a KL penalty for the chosen layers (default paper)",
    )
    parser.add_argument(
        "--preference-pairs-per-question",
        type=int,
        default=None,
        help="training pairs per fit question for --objective preference (default 1)",
    )
    parser.add_argument(
        "--preference-epochs", type=int, default=None, help="epochs of the preference stage (default 1)"
    )
    parser.add_argument(
        "--preference-lr",
        type=float,
        default=None,
        help="learning rate of the preference stage (default 5e-3)",
    )
    parser.add_argument(
        "--preference-kl-weight",
        type=float,
        default=None,
        help="weight of KL(edited || unedited) in the preference loss (default 1)",
    )
    parser.add_argument(
        "--preference-kl-on",
        choices=["prompts", "neutral"],
        default=None,
        help="where the preference loss measures its KL: the pairs' prompt tokens, or the calibration "
        "neutral text, the side effect the methods are matched on (default prompts)",
    )
    parser.add_argument(
        "--preference-kl-budget",
        type=float,
        default=None,
        help="mean KL per token (nats) the preference loss lets pass for free; only the KL above it is "
        "penalised, so the edit can spend the budget it is later calibrated to (default 0: all KL costs)",
    )
    parser.add_argument(
        "--preference-at-budget",
        action="store_true",
        help="train each method at the alpha that meets the largest KL target (calibrated first) "
        "instead of alpha 1, so the preference stage sees the edit at the strength it is used at",
    )
    parser.add_argument(
        "--preference-editor-lr",
        type=float,
        default=None,
        help="learning rate of HPR's probes and angle nets in the preference stage (default: "
        "--preference-lr); they read raw hidden states, so one step moves their outputs by up to lr * |h|_1",
    )
    parser.add_argument(
        "--preference-freeze-probe",
        action="store_true",
        help="train only HPR's angle nets and gains in the preference stage; the probes (gate and, with "
        "--rotation-direction probe, direction) keep the paper fit's weights",
    )


def settings_from_args(args: argparse.Namespace):
    """The job's :class:`~hpr_peft.experiment.settings.JobSettings`: command line, then the model's recommended
    defaults (``MODEL_DEFAULTS``), then the dataclass defaults."""
    from hpr_peft.experiment import MODEL_DEFAULTS, JobSettings

    overrides = {
        "folds": args.folds,
        "seed": args.seed,
        "quick_questions": args.quick_questions,
        "max_questions": args.max_questions,
        "token_selection": args.token_selection,
        "angle_target": args.angle_target,
        "kl_targets": args.kl_targets,
        "layer_search": args.layer_search,
        "screen_layers": args.screen_layers,
        "screen_questions": args.screen_questions,
        "top_ks": args.top_k,
        "calibration_tolerance": args.calibration_tolerance,
        "replay": False if args.no_replay else None,
        "objective": args.objective,
        "rotation_direction": args.rotation_direction,
        "exclude_massive_dims": args.exclude_massive_dims,
        "paper_config": True if args.paper_config else None,
        "preference_pairs_per_question": args.preference_pairs_per_question,
        "preference_epochs": args.preference_epochs,
        "preference_lr": args.preference_lr,
        "preference_kl_weight": args.preference_kl_weight,
        "preference_kl_on": args.preference_kl_on,
        "preference_kl_budget": args.preference_kl_budget,
        "preference_at_budget": True if args.preference_at_budget else None,
        "preference_freeze_probe": True if args.preference_freeze_probe else None,
        "preference_editor_lr": args.preference_editor_lr,
        "validation_fraction": args.validation_fraction,
        "max_validation_questions": args.max_validation_questions,
        "epochs": args.epochs,
        "neutral_paragraphs": args.neutral_paragraphs,
        "threads": args.threads,
        "generation_questions": args.generation_questions,
        "max_new_tokens": args.max_new_tokens,
    }
    for name, value in MODEL_DEFAULTS.get(args.model, {}).items():
        if overrides.get(name) is None:
            overrides[name] = value
    settings = JobSettings(
        model=args.model,
        output_dir=args.output or f"outputs/{args.model.rstrip('/').split('/')[-1]}",
        truthfulqa_dir=args.truthfulqa_dir,
        quick=args.quick,
        progress=not args.no_progress,
        **{name: value for name, value in overrides.items() if value is not None},
    )
    return settings


def run(args: argparse.Namespace) -> int:
    from hpr_peft.experiment import run_main_job

    run_main_job(settings_from_args(args))
    return 0
