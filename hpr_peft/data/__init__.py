"""Data: prompt formats, contrastive pairs (JSONL), TruthfulQA loaders and group splits.

- :mod:`~hpr_peft.data.prompts`: the one definition of the prompt formats (``qa``, ``mc_chat``).
- :mod:`~hpr_peft.data.pairs`: :class:`ContrastivePair` and its JSONL file format.
- :mod:`~hpr_peft.data.truthfulqa`: :class:`MCQuestion`, question ids, TruthfulQA questions and
  pairs, :class:`GenerationQuestion` (reference answers for generation).
- :mod:`~hpr_peft.data.splits`: group splits and folds that keep an example on one side.
"""

from hpr_peft.data.pairs import ContrastivePair, load_pairs_jsonl, save_pairs_jsonl
from hpr_peft.data.prompts import (
    ANSWER_DELIMITER,
    QA_PRIMER,
    answer_continuation,
    answer_from_continuation,
    has_chat_template,
    mc_chat_prompt,
    qa_prompt,
    question_context,
    stable_order,
)
from hpr_peft.data.splits import (
    Fold,
    GroupSplit,
    filter_by_group,
    filter_pairs,
    filter_questions,
    kfold_groups,
    load_folds,
    load_split,
    save_split,
    split_groups,
)
from hpr_peft.data.truthfulqa import (
    ANSWER_SOURCES,
    FORMATS,
    HUB_DATASET_ID,
    TRUTHFULQA_DIR_ENV,
    GenerationQuestion,
    MCQuestion,
    default_truthfulqa_dir,
    load_truthfulqa,
    load_truthfulqa_generation,
    load_truthfulqa_mc,
    truthfulqa_question_id,
)
from hpr_peft.data.validation import require_text

__all__ = [
    "ANSWER_DELIMITER",
    "ANSWER_SOURCES",
    "FORMATS",
    "HUB_DATASET_ID",
    "QA_PRIMER",
    "TRUTHFULQA_DIR_ENV",
    "ContrastivePair",
    "Fold",
    "GenerationQuestion",
    "GroupSplit",
    "MCQuestion",
    "answer_continuation",
    "answer_from_continuation",
    "default_truthfulqa_dir",
    "filter_by_group",
    "filter_pairs",
    "filter_questions",
    "has_chat_template",
    "kfold_groups",
    "load_folds",
    "load_pairs_jsonl",
    "load_split",
    "load_truthfulqa",
    "load_truthfulqa_generation",
    "load_truthfulqa_mc",
    "mc_chat_prompt",
    "qa_prompt",
    "question_context",
    "require_text",
    "save_pairs_jsonl",
    "save_split",
    "split_groups",
    "stable_order",
    "truthfulqa_question_id",
]
