"""One call for a full TruthfulQA evaluation: MC1/MC2 with side effects, as a JSON-able dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from hpr_peft.data import MCQuestion, load_truthfulqa_mc
from hpr_peft.evaluation.side_effects import NeutralText
from hpr_peft.evaluation.truthfulqa import score_truthfulqa
from hpr_peft.runtime.model_io import ContextFactory, unedited_context

__all__ = ["evaluate_truthfulqa"]


def evaluate_truthfulqa(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion] | None = None,
    truthfulqa_dir: Any = None,
    question_ids: Sequence[str] | None = None,
    context: ContextFactory | None = None,
    reference: ContextFactory | None = None,
    side_effects: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """MC1/MC2 with side effects (neutral-text perplexity, KL to ``reference``) as one JSON-able dict.

    ``questions`` default to all of TruthfulQA from ``truthfulqa_dir`` (see
    :func:`hpr_peft.data.load_truthfulqa_mc`), optionally restricted to ``question_ids``. ``reference``
    is the context giving the unedited model; by default ``model.disable_adapter()`` for PEFT models
    and the model itself otherwise (KL 0).
    """
    if questions is None:
        questions = load_truthfulqa_mc(truthfulqa_dir)
    if question_ids is not None:
        wanted = set(question_ids)
        unknown = wanted - {q.question_id for q in questions}
        if unknown:
            raise ValueError(f"question_ids: {len(unknown)} unknown id(s), e.g. {sorted(unknown)[:3]}.")
        questions = [q for q in questions if q.question_id in wanted]
    result = score_truthfulqa(model, tokenizer, questions, context=context, progress=progress)
    out: dict[str, Any] = {"truthfulqa": result.to_dict()}
    if side_effects:
        neutral = NeutralText(tokenizer)
        ref = reference if reference is not None else unedited_context(model)
        neutral.compute_reference(model, ref)
        out["side_effects"] = neutral.measure(model, context).to_dict()
    return out
