"""``hpr-peft lm-eval ARGS``: lm-eval's own command line, with the ``HPR`` PEFT type registered.

Every argument goes to lm-eval unchanged (``hpr-peft lm-eval --help`` shows lm-eval's help), e.g.
``hpr-peft lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks truthfulqa_mc2``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "Run lm-evaluation-harness (its own CLI and options) with HPR adapters loadable."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")


def run(args: argparse.Namespace) -> int:
    return run_passthrough(args.lm_eval_args)


def run_passthrough(argv: Sequence[str]) -> int:
    """Hand ``argv`` to lm-eval's command line after registering ``HPR``."""
    from hpr_peft.integrations.lm_eval import run_lm_eval_cli

    return run_lm_eval_cli(list(argv))
