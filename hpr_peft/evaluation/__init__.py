"""Evaluation: the TruthfulQA scorer, side effects on neutral text and the additive baseline."""

from hpr_peft.evaluation.truthfulqa import (
    MCResult,
    TruthfulQAScorer,
    answer_continuation,
    evaluate_truthfulqa,
    mc_metrics,
    question_context,
    score_answers_naive,
    score_truthfulqa,
    stack_contexts,
)

__all__ = [
    "MCResult",
    "TruthfulQAScorer",
    "answer_continuation",
    "evaluate_truthfulqa",
    "mc_metrics",
    "question_context",
    "score_answers_naive",
    "score_truthfulqa",
    "stack_contexts",
]
