"""Evaluation: TruthfulQA MC1/MC2 (the fast lm-eval-exact scorer), side effects on neutral text, and
the additive steering baseline every HPR result is compared with.

- :mod:`~hpr_peft.evaluation.mc_metrics`: MC1 / MC2 of a question, :class:`MCResult`.
- :mod:`~hpr_peft.evaluation.truthfulqa`: :class:`TruthfulQAScorer` (packing in
  :mod:`~hpr_peft.evaluation.packing`).
- :mod:`~hpr_peft.evaluation.side_effects`: perplexity and KL on neutral text.
- :mod:`~hpr_peft.evaluation.baselines`: additive mean-difference steering.
- :mod:`~hpr_peft.evaluation.calibration`: the ``alpha`` of an edit at a KL budget on neutral text.
- :mod:`~hpr_peft.evaluation.statistics`: paired bootstrap of per-question differences.
- :mod:`~hpr_peft.evaluation.evaluate`: :func:`evaluate_truthfulqa`, scores with side effects.
"""

from hpr_peft.evaluation.calibration import KLCalibration, calibrate_alpha, kl_calibration
from hpr_peft.evaluation.evaluate import evaluate_truthfulqa
from hpr_peft.evaluation.mc_metrics import MCResult, mc_metrics
from hpr_peft.evaluation.statistics import PairedDifference, paired_bootstrap
from hpr_peft.evaluation.truthfulqa import (
    AnswerWatcher,
    TruthfulQAScorer,
    answer_continuation,
    encode_pair,
    question_context,
    score_answers_naive,
    score_truthfulqa,
)
from hpr_peft.runtime.model_io import stack_contexts

__all__ = [
    "AnswerWatcher",
    "KLCalibration",
    "MCResult",
    "PairedDifference",
    "TruthfulQAScorer",
    "answer_continuation",
    "calibrate_alpha",
    "encode_pair",
    "evaluate_truthfulqa",
    "kl_calibration",
    "mc_metrics",
    "paired_bootstrap",
    "question_context",
    "score_answers_naive",
    "score_truthfulqa",
    "stack_contexts",
]
