"""The ``hpr-peft`` command line: ``fit``, ``eval``, ``push``, ``main`` (the full TruthfulQA job) and
``lm-eval`` (lm-eval's own command line with HPR adapters loadable; its arguments pass through as they are).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen subcommand's module is imported, so ``hpr-peft push`` never pays for the evaluation
stack and a broken optional dependency of one subcommand cannot break the others. A user error ends
every subcommand with one line and exit status 2, a bug with its traceback (:mod:`hpr_peft.cli.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from hpr_peft.cli.errors import run_reporting_errors

_SUBCOMMANDS = {
    "fit": ("hpr_peft.cli.fit", "Fit an HPR adapter from contrastive pairs."),
    "eval": ("hpr_peft.cli.eval", "Evaluate a model / HPR adapter on TruthfulQA MC1/MC2 with side effects."),
    "push": ("hpr_peft.cli.push", "Upload a saved HPR adapter to the Hugging Face Hub with a model card."),
    "main": ("hpr_peft.cli.main_job", "Run the full job: cross-validated fit + evaluation + report."),
    "lm-eval": (
        "hpr_peft.cli.lm_eval",
        "Run lm-evaluation-harness (its own CLI) with HPR adapters loadable.",
    ),
}
_PASSTHROUGH = "lm-eval"

# peft's get_peft_model reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
# FutureWarning on every call; the command line hides exactly that one (the library leaves it alone).
_PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given, that subcommand's options are filled in."""
    parser = argparse.ArgumentParser(
        prog="hpr-peft", description="Householder Pseudo-Rotation (HPR) activation editing for PEFT."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
        if argv[:1] == [_PASSTHROUGH]:
            from hpr_peft.cli.lm_eval import run_passthrough

            return run_passthrough(argv[1:])
        command = next((arg for arg in argv if not arg.startswith("-")), None)
        args = build_parser(command if command in _SUBCOMMANDS else None).parse_args(argv)
        return run_reporting_errors(args.command, args._run, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
