"""The ``hpr-peft`` command line: ``fit``, ``eval``, ``push`` and ``main`` (the full TruthfulQA job).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "fit": ("hpr_peft.cli.fit", "Fit an HPR adapter from contrastive pairs."),
    "eval": ("hpr_peft.cli.eval", "Evaluate a model / HPR adapter on TruthfulQA MC1/MC2 with side effects."),
    "push": ("hpr_peft.cli.push", "Upload a saved HPR adapter to the Hugging Face Hub with a model card."),
    "main": ("hpr_peft.cli.main_job", "Run the full job: cross-validated fit + evaluation + report."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpr-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
