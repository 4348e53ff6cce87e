"""lm-evaluation-harness on HPR adapters, from Python and from lm-eval's own command line.

lm-eval loads a PEFT adapter with ``PeftModel.from_pretrained``, which only knows ``HPR`` once
``hpr_peft`` is imported in the same process (otherwise: ``KeyError: 'HPR'``). Two ways to get that:

- Python: import ``hpr_peft`` and hand lm-eval the PEFT model itself, ``HFLM(pretrained=peft_model,
  tokenizer=tokenizer, device="cpu")`` (:func:`hpr_lm` does exactly that), then
  ``lm_eval.simple_evaluate(model=lm, tasks=[...])``. Any ``edit_settings`` / ``disable_adapter``
  context around the call applies to everything lm-eval runs.
- Command line: ``hpr-peft lm-eval ARGS`` (or ``python -m hpr_peft.integrations.lm_eval ARGS``)
  registers ``HPR`` and runs lm-eval's CLI with ``ARGS`` unchanged, so every lm-eval option and task
  works, e.g. ``--model hf --model_args pretrained=BASE,peft=ADAPTER --tasks truthfulqa_mc2`` with a
  local adapter folder or a Hub id.

lm-eval is an optional extra: ``pip install 'hpr_peft[lm-eval]'``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from torch import nn

from hpr_peft.runtime.model_io import input_device
from hpr_peft.tuner.registration import register_hpr

__all__ = ["LM_EVAL_EXTRA", "hpr_lm", "require_lm_eval", "run_lm_eval_cli"]

LM_EVAL_EXTRA = "pip install 'hpr_peft[lm-eval]'"
"""How to install lm-eval at the version hpr_peft is tested with."""


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` package, or an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            f"This needs lm-evaluation-harness, which is not installed ({exc}): {LM_EVAL_EXTRA}"
        ) from None
    return lm_eval


def hpr_lm(model: nn.Module, tokenizer: Any, **options: Any) -> Any:
    """lm-eval's ``HFLM`` around an already loaded model (a PEFT model with an HPR adapter, or any
    causal LM), on the model's own device; ``options`` go to ``HFLM`` (``batch_size``, ...)."""
    require_lm_eval()
    register_hpr()
    from lm_eval.models.huggingface import HFLM

    options.setdefault("device", str(input_device(model)))
    return HFLM(pretrained=model, tokenizer=tokenizer, **options)


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """Register ``HPR``, then run lm-eval's command line with ``argv``; returns its exit status."""
    require_lm_eval()
    register_hpr()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_lm_eval_cli(sys.argv[1:]))
