"""TruthfulQA generation: greedy answers after the QA primer, scored by lm-eval's own BLEU and ROUGE.

Protocol (the TruthfulQA paper's, and lm-eval's ``truthfulqa_gen``): the prompt is
:func:`~hpr_peft.data.question_context` (``QA_PRIMER + "\\n\\nQ: {question}\\nA:"``); decoding is
greedy; the answer is the decoded continuation up to the first blank line (``"\\n\\n"``, lm-eval's stop
for this task) or the end-of-sequence token, at most ``max_new_tokens`` tokens. lm-eval's own
``truthfulqa_gen`` leaves ``"\\nA:"`` out of the prompt (its answers then start with ``"\\nA:"``);
here the prompt is the one the MC scorer and the fitting data use, so the edit sees the texts it was
fitted on.

Scoring is lm-eval's code, not a copy: ``lm_eval.tasks.truthfulqa.utils.preprocess_function``
formats the references (a period after each; ``"I have no comment."`` joins the true ones) and
``process_results_gen`` gives, for BLEU and ROUGE-1/2/L, ``max`` (similarity to the closest true
answer), ``acc`` (1 when closer to a true than to a false answer) and ``diff`` (true minus false).
Needs lm-eval: ``pip install 'hpr_peft[lm-eval]'``.

KV cache and editing policy: the primer's KV cache is computed once per pass, each question is read
on top of a copy of it, then every step feeds one new token and extends the cache. The model is
generated from as it stands (inside ``context()`` when given): an HPR adapter edits every token the
model reads at its selected layers, the prompt's and each generated one, exactly as a forward over the
whole text would (never the sequence's first token nor padding); additive steering adds its vectors
at every position the same way. Because each token's edit depends only on its own hidden state,
cached decoding gives the tokens that uncached decoding gives.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpr_peft.data import GenerationQuestion, question_context
from hpr_peft.runtime.model_io import ContextFactory, cache_inputs, eval_mode, input_device, output_cache
from hpr_peft.runtime.progress import progress_bar

__all__ = [
    "GENERATION_METRICS",
    "GENERATION_STOP",
    "GenerationResult",
    "generate_answers",
    "generate_truthfulqa",
    "lm_eval_truthfulqa_metrics",
    "score_generations",
]

GENERATION_STOP = "\n\n"
"""Where an answer ends: lm-eval's stop sequence for ``truthfulqa_gen`` (the few-shot delimiter)."""

GENERATION_METRICS = tuple(
    f"{name}_{kind}" for name in ("bleu", "rouge1", "rouge2", "rougeL") for kind in ("max", "acc", "diff")
)
"""The metrics of lm-eval's ``truthfulqa_gen`` (BLEURT is commented out there too)."""


@dataclass
class GenerationResult:
    """Answers and their per-question lm-eval metrics (``metrics[name][i]`` for question ``i``)."""

    question_ids: list[str]
    completions: list[str]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def means(self) -> dict[str, float]:
        """Each metric averaged over the questions."""
        return {name: sum(values) / len(values) for name, values in self.metrics.items() if values}

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": len(self.question_ids),
            "means": self.means(),
            "question_ids": self.question_ids,
            "completions": self.completions,
            "metrics": self.metrics,
            "seconds": self.seconds,
        }


def lm_eval_truthfulqa_metrics() -> Any:
    """lm-eval's ``truthfulqa`` task module (its metric functions), or an ImportError naming the fix."""
    try:
        from lm_eval.tasks.truthfulqa import utils
    except ImportError as exc:
        raise ImportError(
            f"Scoring generations uses lm-eval's TruthfulQA metrics, and lm-eval is missing ({exc}): "
            "pip install 'hpr_peft[lm-eval]'"
        ) from None
    return utils


def score_generations(
    questions: Sequence[GenerationQuestion], completions: Sequence[str]
) -> GenerationResult:
    """lm-eval's ``truthfulqa_gen`` metrics of ``completions[i]`` as the answer to ``questions[i]``."""
    if len(questions) != len(completions):
        raise ValueError(f"{len(questions)} questions but {len(completions)} completions: give one each.")
    utils = lm_eval_truthfulqa_metrics()
    metrics: dict[str, list[float]] = {name: [] for name in GENERATION_METRICS}
    for question, completion in zip(questions, completions, strict=True):
        doc = utils.preprocess_function(
            {
                "question": question.question,
                "correct_answers": list(question.correct_answers),
                "incorrect_answers": list(question.incorrect_answers),
            }
        )
        scores = utils.process_results_gen(doc, [completion])
        for name in GENERATION_METRICS:
            metrics[name].append(float(scores[name]))
    return GenerationResult([q.question_id for q in questions], list(completions), metrics)


@dataclass
class _Decoder:
    """One pass: the model, its device, the prompts' shared prefix cache and when to stop."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    prefix_cache: Any
    prefix_len: int
    stop_ids: frozenset[int]
    stop: str
    max_new_tokens: int

    def answer(self, tokens: list[int]) -> str:
        """Greedy continuation of ``prefix + tokens``, cut at the stop text (lm-eval's way)."""
        cache = copy.deepcopy(self.prefix_cache) if self.prefix_cache is not None else None
        ids = torch.tensor([tokens], device=self.device)
        seen, generated = self.prefix_len, []
        for _ in range(self.max_new_tokens):
            mask = torch.ones(1, seen + ids.shape[1], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, attention_mask=mask, **cache_inputs(self.model, cache))
            cache, seen = output_cache(out), seen + ids.shape[1]
            token = int(out.logits[0, -1].argmax())
            if token in self.stop_ids:
                break
            generated.append(token)
            if self.stop in self.tokenizer.decode(generated, skip_special_tokens=True):
                break
            ids = torch.tensor([[token]], device=self.device)
        return self.tokenizer.decode(generated, skip_special_tokens=True).split(self.stop)[0]


def _end_of_sequence_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's and the model's generation config's end-of-sequence ids."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _shared_prefix(token_lists: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every prompt after it."""
    length = min(len(tokens) for tokens in token_lists) - 1
    first = token_lists[0]
    for tokens in token_lists[1:]:
        n = 0
        while n < length and tokens[n] == first[n]:
            n += 1
        length = n
    return max(length, 0)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    context: ContextFactory | None = None,
    max_new_tokens: int = 64,
    stop: str = GENERATION_STOP,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to ``prompts`` (inside ``context()`` when given), each cut at ``stop``.

    Tokenised with the tokenizer's defaults; the prompts' common token prefix is read once into a
    KV cache that every prompt continues (see the module docstring for the editing policy).
    """
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    token_lists = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    prefix_len = _shared_prefix(token_lists)
    answers = []
    with eval_mode(model), context() if context is not None else contextlib.nullcontext():
        device = input_device(model)
        prefix_cache = None
        if prefix_len:
            ids = torch.tensor([token_lists[0][:prefix_len]], device=device)
            prefix_cache = output_cache(
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            )
        decoder = _Decoder(
            model, tokenizer, device, prefix_cache, prefix_len,
            _end_of_sequence_ids(model, tokenizer), stop, max_new_tokens,
        )  # fmt: skip
        bar = progress_bar(len(prompts), desc, progress, leave=False, mininterval=2.0)
        for tokens in token_lists:
            answers.append(decoder.answer(tokens[prefix_len:]))
            bar.update(1)
        bar.close()
    return answers


def generate_truthfulqa(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[GenerationQuestion],
    context: ContextFactory | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
    desc: str = "TruthfulQA generation",
) -> GenerationResult:
    """Greedy answers to TruthfulQA ``questions`` after the QA primer, scored by lm-eval's metrics."""
    start = time.perf_counter()
    prompts = [question_context(q.question) for q in questions]
    completions = generate_answers(
        model, tokenizer, prompts, context, max_new_tokens=max_new_tokens, progress=progress, desc=desc
    )
    result = score_generations(questions, completions)
    result.seconds = time.perf_counter() - start
    return result
