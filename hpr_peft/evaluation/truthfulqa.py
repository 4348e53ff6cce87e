"""TruthfulQA MC1/MC2 exactly as lm-eval-harness ``truthfulqa_mc1``/``truthfulqa_mc2`` scores them, fast.

Scoring: context ``QA_PRIMER + "\\n\\nQ: {question}\\nA:"``, continuation ``" " + answer`` (the prompt
format of :mod:`hpr_peft.data`), score = summed log-probability of the continuation tokens.
Tokenisation follows lm-eval: the context and ``context + continuation`` are tokenised separately
(tokenizer defaults, so Gemma gets its BOS) and the continuation tokens are the tokens of the full
string after the context's tokens; the model reads ``context_tokens + continuation_tokens``. MC1 and
MC2 of a question come from :func:`hpr_peft.evaluation.mc_metrics.mc_metrics`.

Speed: a naive pass reads the ~300-token primer once per answer (~2M tokens for 817 questions). Here the
primer's KV cache is computed once per pass (exact also with an HPR adapter, whose edit is the same
with and without a cache), each question's tokens are read once on top of it, and all unique answers
of the question (MC1 ⊂ MC2 mostly: deduplicated) are tree-packed behind it (:mod:`hpr_peft.evaluation.
packing`), several questions per forward. The LM head runs only at the positions whose next-token
log-probability is needed. A pass therefore reads ≈ 15k question + 61k answer tokens.
:func:`score_answers_naive` is the plain full-sequence reference used by the tests.

Whatever model is passed is evaluated as it stands: a plain causal LM, a PEFT model with an HPR adapter
(enabled or inside ``disable_adapter()``), or a model inside an additive-steering context.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hpr_peft.data import QA_PRIMER, MCQuestion, answer_continuation, question_context
from hpr_peft.data.encoding import encode_pair
from hpr_peft.evaluation.mc_metrics import MCResult, mc_metrics
from hpr_peft.evaluation.packing import TreeRow, pack_rows, plan_batches
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.model_io import (
    ContextFactory,
    HeadGather,
    cache_inputs,
    eval_mode,
    input_device,
    output_cache,
    pad_token_id,
)
from hpr_peft.runtime.progress import progress_bar

__all__ = [
    "PACKING_TOLERANCE",
    "AnswerSpan",
    "AnswerWatcher",
    "TruthfulQAScorer",
    "answer_continuation",
    "encode_pair",
    "question_context",
    "score_answers_naive",
    "score_truthfulqa",
]

# Packed and one-question-at-a-time scores differ only by float32 summation order (≤ 5e-4 nats on
# scores of 10-50 nats for SmolLM2); a model whose attention ignores the custom 4-D mask is off by
# whole nats. A relative tolerance of 1 % separates the two.
PACKING_TOLERANCE = 1e-2

AnswerSpan = tuple[Any, int, int, int]
"""``(key, batch row, first column, n tokens)`` of one answer inside a packed forward."""


class AnswerWatcher(Protocol):
    """Something that watches the scorer's packed forwards at the answer tokens (for example
    :class:`hpr_peft.fitting.answer_collector.AnswerCollector`, recording fitting activations)."""

    def watch(self, model: nn.Module, spans: Sequence[AnswerSpan], width: int) -> AbstractContextManager:
        """A context manager active during the one forward that holds ``spans``."""
        ...

    def finish(self) -> None:
        """Called once after the pass."""
        ...


@torch.no_grad()
def score_answers_naive(
    model: nn.Module, tokenizer: Any, question: str, answers: Sequence[str], primer: str = QA_PRIMER
) -> list[float]:
    """Summed continuation log-probabilities by one full, uncached forward per answer (lm-eval style).

    Slow; the reference the fast scorer is tested against.
    """
    device = input_device(model)
    context = question_context(question, primer)
    out = []
    for answer in answers:
        ctx, cont = encode_pair(tokenizer, context, answer_continuation(answer))
        ids = torch.tensor([ctx + cont], device=device)
        logits = model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1])).logits[0]
        logp = torch.log_softmax(logits[-len(cont) :].float(), dim=-1)
        out.append(float(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum()))
    return out


@dataclass
class _TokenizedQuestion:
    question: MCQuestion
    question_ids: list[int]  # context tokens after the shared prefix
    answers: list[str]  # unique answers (MC1 ∪ MC2)
    answer_ids: list[list[int]]


@dataclass
class _Pass:
    """State of one scoring pass: the model, its device, the primer's cache and the head gather."""

    model: nn.Module
    device: torch.device
    prefix_cache: Any
    prefix_len: int
    head: HeadGather
    gathered: bool


class TruthfulQAScorer:
    """Tokenises a set of questions once; :meth:`score` runs a fast pass over any model state.

    The shared prefix is the longest common token prefix of all contexts (the primer, plus BOS when the
    tokenizer adds one); its KV cache is computed once per pass.

    ``packed`` (default ``None`` = auto): score several questions per forward, each question's answers
    tree-packed behind it (:mod:`hpr_peft.evaluation.packing`), ≈4× faster on CPU. Auto mode checks once
    per model that the packed scores equal the one-question-at-a-time path within
    :data:`PACKING_TOLERANCE` (a model whose attention ignores custom 4-D masks fails that check) and
    falls back with a warning. ``max_tokens`` bounds the tokens of one packed forward;
    ``batch_answers`` caps the rows of one unpacked answer forward.
    """

    def __init__(
        self,
        tokenizer: Any,
        questions: Sequence[MCQuestion],
        primer: str = QA_PRIMER,
        batch_answers: int = 64,
        packed: bool | None = None,
        max_tokens: int = 768,
    ) -> None:
        if not questions:
            raise ValueError("questions is empty: pass at least one MCQuestion (see load_truthfulqa_mc).")
        for q in questions:
            if not isinstance(q, MCQuestion):
                raise TypeError(f"questions must be MCQuestion objects, got {type(q).__name__}.")
        if batch_answers < 1:
            raise ValueError(f"batch_answers must be >= 1, got {batch_answers}.")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        self.packed = packed
        self.max_tokens = max_tokens
        self._packing_checked: dict[int, bool] = {}
        self.tokenizer = tokenizer
        self.questions = list(questions)
        self.batch_answers = batch_answers
        self.pad_id = pad_token_id(tokenizer)
        self.prefix_ids, self.items = _tokenize_questions(tokenizer, self.questions, primer)

    @property
    def n_tokens(self) -> int:
        """Tokens read per pass (prefix once + every question + every unique answer)."""
        return len(self.prefix_ids) + sum(
            len(it.question_ids) + sum(len(a) for a in it.answer_ids) for it in self.items
        )

    @torch.no_grad()
    def score(
        self,
        model: nn.Module,
        context: ContextFactory | None = None,
        progress: bool = True,
        desc: str = "TruthfulQA",
        keep_answer_scores: bool = False,
        watcher: AnswerWatcher | None = None,
    ) -> MCResult:
        """Score every question with ``model`` (inside ``context()`` when given).

        With a ``watcher`` (e.g. :class:`hpr_peft.fitting.answer_collector.AnswerCollector`) every packed
        forward is also handed to it, so one pass gives scores and, say, fitting activations.
        """
        start = time.perf_counter()
        with (
            eval_mode(model),
            context() if context is not None else contextlib.nullcontext(),
            HookSet() as hooks,
        ):
            run = self._start_pass(model, hooks)
            if self._use_packing(run, watcher):
                all_scores = self._score_all_packed(run, watcher, progress, desc)
            else:
                if watcher is not None:
                    raise ValueError(
                        "watching the answers while scoring needs the packed path (packed=None or True)."
                    )
                all_scores = self._score_all_plain(run, progress, desc)
        if watcher is not None:
            watcher.finish()
        return self._result(all_scores, keep_answer_scores, time.perf_counter() - start)

    def _start_pass(self, model: nn.Module, hooks: HookSet) -> _Pass:
        head = HeadGather()
        gathered = head.attach(model, hooks)
        device = input_device(model)
        prefix_cache = None
        if self.prefix_ids:
            ids = torch.tensor([self.prefix_ids], device=device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            prefix_cache = output_cache(out)
        return _Pass(model, device, prefix_cache, len(self.prefix_ids), head, gathered)

    def _score_all_packed(self, run: _Pass, watcher: AnswerWatcher | None, progress: bool, desc: str):
        all_scores: list[list[float] | None] = [None] * len(self.items)
        batches = plan_batches(
            [self._row(i, watcher).length for i in range(len(self.items))], self.max_tokens
        )
        bar = progress_bar(len(self.items), desc, progress, leave=False, mininterval=2.0)
        for batch in batches:
            for i, scores in zip(batch, self._score_packed(run, batch, watcher), strict=True):
                all_scores[i] = scores
            bar.update(len(batch))
        bar.close()
        return all_scores

    def _score_all_plain(self, run: _Pass, progress: bool, desc: str):
        bar = progress_bar(len(self.items), desc, progress, leave=False, mininterval=2.0)
        all_scores = []
        for item in self.items:
            all_scores.append(self._score_item(run, item))
            bar.update(1)
        bar.close()
        return all_scores

    def _result(self, all_scores, keep_answer_scores: bool, seconds: float) -> MCResult:
        mc1, mc2, answer_scores = [], [], {}
        for item, scores in zip(self.items, all_scores, strict=True):
            named = dict(zip(item.answers, scores, strict=True))
            a, b = mc_metrics(item.question, named)
            mc1.append(a)
            mc2.append(b)
            if keep_answer_scores:
                answer_scores[item.question.question_id] = named
        return MCResult(
            question_ids=[it.question.question_id for it in self.items],
            mc1=mc1,
            mc2=mc2,
            seconds=seconds,
            tokens=self.n_tokens,
            answer_scores=answer_scores,
        )

    # ------------------------------------------------------------------------------------ packed path
    def _row(self, index: int, watcher: AnswerWatcher | None) -> TreeRow:
        item = self.items[index]
        # Scoring needs the logits *before* each answer token; a watcher also reads the last one.
        keep_last = watcher is not None
        return TreeRow(item.question_ids, [a if keep_last else a[:-1] for a in item.answer_ids])

    def _use_packing(self, run: _Pass, watcher: AnswerWatcher | None) -> bool:
        """Packed scoring unless it was switched off or does not match the plain path on this model."""
        if self.packed is not None:
            return self.packed
        key = id(run.model)
        if key not in self._packing_checked:
            ok, reason = self._packing_matches(run)
            if not ok:
                warnings.warn(
                    f"TruthfulQAScorer: packed scoring is not exact for {type(run.model).__name__} ({reason}); "
                    "scoring one question at a time (slower). Pass packed=False to skip this check.",
                    stacklevel=4,
                )
            self._packing_checked[key] = ok
        return self._packing_checked[key]

    def _packing_matches(self, run: _Pass) -> tuple[bool, str]:
        try:
            packed = self._score_packed(run, [0], None)[0]
        except Exception as exc:  # any failure means "cannot pack this model"
            return False, f"{type(exc).__name__}: {exc}"
        plain = self._score_item(run, self.items[0])
        diff = max(abs(a - b) for a, b in zip(packed, plain, strict=True))
        ok = diff <= PACKING_TOLERANCE * max(1.0, max(abs(b) for b in plain))
        return ok, f"packed and plain scores differ by {diff:.3g}"

    def _score_packed(self, run: _Pass, batch: list[int], watcher: AnswerWatcher | None) -> list[list[float]]:
        rows = [self._row(i, watcher) for i in batch]
        dtype = next(run.model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        packed = pack_rows(rows, run.prefix_len, self.pad_id, dtype=dtype, device=run.device)
        terms = _LogProbTerms.of(packed, [self.items[i].answer_ids for i in batch], run.device)
        cache = None
        if run.prefix_cache is not None:
            cache = copy.deepcopy(run.prefix_cache)
            if len(batch) > 1:
                cache.batch_repeat_interleave(len(batch))
        watching = contextlib.nullcontext()
        if watcher is not None:
            watching = watcher.watch(
                run.model, self._answer_spans(batch, terms.owners, packed), packed.input_ids.shape[1]
            )
        with watching:
            run.head.select = terms.select
            try:
                out = run.model(
                    input_ids=packed.input_ids,
                    attention_mask=packed.attention_mask,
                    position_ids=packed.position_ids,
                    **cache_inputs(run.model, cache),
                )
            finally:
                run.head.select = None
        logits = out.logits[0] if run.gathered else out.logits[terms.select]
        return terms.totals(logits, len(batch))

    def _answer_spans(self, batch: list[int], owners: list[tuple[int, int]], packed) -> list[AnswerSpan]:
        spans = []
        for r, b in owners:
            item = self.items[batch[r]]
            spans.append(
                (
                    (item.question.question_id, item.answers[b]),
                    r,
                    packed.branch_start[r][b],
                    len(item.answer_ids[b]),
                )
            )
        return spans

    # ------------------------------------------------------------------------------------ plain path
    def _score_item(self, run: _Pass, item: _TokenizedQuestion) -> list[float]:
        model, device = run.model, run.device
        n_question = len(item.question_ids)
        q_ids = torch.tensor([item.question_ids], device=device)
        cache = copy.deepcopy(run.prefix_cache) if run.prefix_cache is not None else None
        run.head.select = torch.zeros(1, n_question, dtype=torch.bool, device=device)
        run.head.select[0, -1] = True
        out = model(
            input_ids=q_ids,
            attention_mask=torch.ones(1, run.prefix_len + n_question, dtype=torch.long, device=device),
            **cache_inputs(model, cache),
        )
        first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        q_cache = output_cache(out)
        scores: list[float] = []
        n = len(item.answer_ids)
        for lo in range(0, n, self.batch_answers):
            chunk = item.answer_ids[lo : lo + self.batch_answers]
            last_chunk = lo + self.batch_answers >= n
            past = run.prefix_len + n_question
            scores.extend(self._score_answers(run, chunk, q_cache, past, first_logp, last_chunk))
        run.head.select = None
        return scores

    def _score_answers(
        self,
        run: _Pass,
        answers: list[list[int]],
        q_cache: Any,
        past: int,
        first_logp: torch.Tensor,
        may_consume_cache: bool,
    ) -> list[float]:
        model, device = run.model, run.device
        n = len(answers)
        totals = first_logp[torch.tensor([a[0] for a in answers], device=device)].double()
        longest = max(len(a) for a in answers)
        if longest == 1:
            return totals.tolist()
        # Inputs: every answer token except its last (right-padded); targets: tokens 1.. of each answer.
        width = longest - 1
        inputs = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        targets = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.bool, device=device)
        for row, a in enumerate(answers):
            k = len(a) - 1
            if k:
                inputs[row, :k] = torch.tensor(a[:-1], device=device)
                targets[row, :k] = torch.tensor(a[1:], device=device)
                mask[row, :k] = True
        cache = q_cache if may_consume_cache else copy.deepcopy(q_cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        attention = torch.cat([torch.ones(n, past, dtype=torch.long, device=device), mask.long()], dim=1)
        run.head.select = mask
        logits = model(input_ids=inputs, attention_mask=attention, **cache_inputs(model, cache)).logits
        run.head.select = None
        flat = logits[0] if run.gathered else logits[mask]
        logp = torch.log_softmax(flat.float(), dim=-1).gather(-1, targets[mask][:, None])[:, 0]
        rows = torch.arange(n, device=device)[:, None].expand(n, width)[mask]
        return totals.index_add(0, rows, logp.double()).tolist()


@dataclass
class _LogProbTerms:
    """Where the log-probability terms of every answer of a packed batch sit: term ``k`` reads the
    logits at ``(row[k], col[k])`` for token ``target[k]`` and adds to answer ``owner[k]``."""

    select: torch.Tensor  # (B, T) bool: positions whose logits are needed
    flat_index: torch.Tensor  # index of each term among the selected positions (row-major)
    targets: torch.Tensor
    term_owner: torch.Tensor
    owners: list[tuple[int, int]]  # (batch row, answer index) of each answer

    @classmethod
    def of(cls, packed, answers_per_row: list[list[list[int]]], device: torch.device) -> _LogProbTerms:
        term_row, term_col, term_target, term_owner = [], [], [], []
        owners: list[tuple[int, int]] = []
        for r, answers in enumerate(answers_per_row):
            for b, answer in enumerate(answers):
                cols = [packed.context_end[r]] + [
                    packed.branch_start[r][b] + j for j in range(len(answer) - 1)
                ]
                term_row += [r] * len(cols)
                term_col += cols
                term_target += list(answer)
                term_owner += [len(owners)] * len(cols)
                owners.append((r, b))
        batch, width = packed.input_ids.shape
        select = torch.zeros(batch, width, dtype=torch.bool, device=device)
        rows_t = torch.tensor(term_row, device=device)
        cols_t = torch.tensor(term_col, device=device)
        select[rows_t, cols_t] = True
        rank = (torch.cumsum(select.flatten(), 0) - 1).view(batch, width)
        return cls(
            select,
            rank[rows_t, cols_t],
            torch.tensor(term_target, device=device),
            torch.tensor(term_owner, device=device),
            owners,
        )

    def totals(self, logits: torch.Tensor, n_rows: int) -> list[list[float]]:
        """Summed log-probabilities per answer, grouped by batch row, from the selected logits."""
        totals = torch.zeros(len(self.owners), dtype=torch.float64, device=logits.device)
        lse = torch.logsumexp(logits.float(), dim=-1)
        picked = logits[self.flat_index, self.targets].float() - lse[self.flat_index]
        totals.index_add_(0, self.term_owner, picked.double())
        out: list[list[float]] = [[] for _ in range(n_rows)]
        for (r, _b), value in zip(self.owners, totals.tolist(), strict=True):
            out[r].append(value)
        return out


def _tokenize_questions(
    tokenizer: Any, questions: list[MCQuestion], primer: str
) -> tuple[list[int], list[_TokenizedQuestion]]:
    """The shared prefix tokens and every question's tokens after it (with its unique answers')."""
    contexts = []
    items = []
    for q in questions:
        context = question_context(q.question, primer)
        answers = list(dict.fromkeys([*q.mc1_choices, *q.mc2_choices]))
        pairs = [encode_pair(tokenizer, context, answer_continuation(a)) for a in answers]
        contexts.append(pairs[0][0])
        items.append((q, pairs[0][0], answers, [p[1] for p in pairs]))
    # Shared prefix: longest common prefix of every context, keeping >= 1 question token each.
    prefix_len = min(len(c) for c in contexts) - 1
    first = contexts[0]
    for c in contexts[1:]:
        n = 0
        while n < prefix_len and c[n] == first[n]:
            n += 1
        prefix_len = n
    return first[:prefix_len], [
        _TokenizedQuestion(q, ctx[prefix_len:], answers, ans_ids) for q, ctx, answers, ans_ids in items
    ]


def score_truthfulqa(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    context: ContextFactory | None = None,
    progress: bool = True,
    desc: str = "TruthfulQA",
) -> MCResult:
    """MC1/MC2 of ``model`` (inside ``context()`` if given) on ``questions``; see :class:`TruthfulQAScorer`."""
    return TruthfulQAScorer(tokenizer, questions).score(model, context=context, progress=progress, desc=desc)
