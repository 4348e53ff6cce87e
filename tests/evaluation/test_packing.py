"""Tree packing: packed forwards equal one-sequence-at-a-time forwards, on every tiny architecture.

Also covers what rides on packing: the 4-D-mask branch of the position masks (padding, sequence start),
the scorer's packed path and its auto fallback, and collecting fitting activations during scoring.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.data import ContrastivePair
from hpr_peft.evaluation import TruthfulQAScorer, question_context, score_answers_naive
from hpr_peft.evaluation.baselines import additive_steering
from hpr_peft.evaluation.packing import TreeRow, pack_rows, plan_batches
from hpr_peft.fitting import AnswerCollector, collect_activations
from hpr_peft.runtime.model_io import output_cache as _output_cache
from hpr_peft.runtime.positions import context_from_inputs
from support.evaluation import CharTokenizer, tiny_questions
from support.models import TINY_ARCHS, make_tiny_causal_lm

PRIMER = "Q: What is one?\nA: One is a number.\n\nQ: Sky?\nA: Blue."


def test_plan_batches_covers_all_and_respects_budget():
    lengths = [5, 40, 7, 7, 100, 3, 22, 22, 9]
    batches = plan_batches(lengths, max_tokens=50)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 50
    assert [4] in batches  # longer than the budget: alone
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches(lengths, 0)


def test_pack_rows_mask_layout():
    rows = [TreeRow([5, 6], [[7, 8], [9]]), TreeRow([5], [[], [4, 4, 4]])]
    packed = pack_rows(rows, prefix_len=3, pad_id=0)
    allowed = packed.attention_mask[:, 0] == 0
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 4, 4, 0]]
    assert packed.position_ids.tolist() == [[3, 4, 5, 6, 5], [3, 4, 5, 6, 6]]
    assert packed.branch_start == [[2, 4], [1, 1]] and packed.context_end == [1, 0]
    assert packed.valid.tolist() == [[True] * 5, [True] * 4 + [False]]
    # Row 0, branch 2 (column 4) sees the prefix, the context and itself, not branch 1 (columns 2-3).
    assert allowed[0, 4].tolist() == [True, True, True, True, True, False, False, True]
    # Branch 1's second token sees its first token.
    assert allowed[0, 3].tolist() == [True, True, True, True, True, True, True, False]
    # Padding attends to the prefix only, never to itself.
    assert allowed[1, 4].tolist() == [True] * 3 + [False] * 5
    ctx = context_from_inputs(2, 5, packed.attention_mask, 3, torch.device("cpu"), packed.position_ids)
    assert ctx.valid.tolist() == packed.valid.tolist()
    assert not ctx.sequence_start.any()
    with pytest.raises(ValueError, match="empty context"):
        pack_rows([TreeRow([], [[1]])], 0, 0)


def test_positions_from_4d_mask_without_prefix_marks_sequence_start():
    packed = pack_rows([TreeRow([1, 2], [[3], [4, 5]]), TreeRow([1], [[6]])], prefix_len=0, pad_id=0)
    ctx = context_from_inputs(2, 5, packed.attention_mask, 0, torch.device("cpu"), packed.position_ids)
    assert ctx.sequence_start.tolist() == [[True, False, False, False, False], [True] + [False] * 4]
    assert ctx.valid.tolist() == [[True] * 5, [True, True, False, False, False]]


def _alone(model, prefix, context, branch):
    ids = torch.tensor([prefix + context + branch])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prefix) :]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("edit", ["none", "hpr", "additive"])
def test_packed_forward_equals_each_sequence_alone(arch, edit):
    """Logits of a packed batch (prefix in the KV cache) == each prefix + context + branch run alone."""
    base = make_tiny_causal_lm(arch)
    torch.manual_seed(3)
    if edit == "hpr":
        model = get_peft_model(base, HPRConfig(target_layers="all", init_weights=False))
    else:
        model = base
    model.eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 120, (6,), generator=g).tolist()
    rows = [
        TreeRow(torch.randint(3, 120, (3,), generator=g).tolist(), [[11, 12, 13], [14], [15, 16]]),
        TreeRow([20], [[21, 22]]),
    ]
    steer = {1: torch.randn(32, generator=g)}
    ctx = additive_steering(model, steer, alpha=2.0) if edit == "additive" else torch.no_grad()
    with ctx, torch.no_grad():
        pre = model(input_ids=torch.tensor([prefix]), use_cache=True)
        cache = _output_cache(pre)
        cache.batch_repeat_interleave(len(rows))
        packed = pack_rows(rows, len(prefix), pad_id=0)
        logits = model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            cache=cache,
            use_cache=True,
        ).logits
        for r, row in enumerate(rows):
            n = len(row.context)
            for b, branch in enumerate(row.branches):
                want = _alone(model, prefix, list(row.context), list(branch))
                s = packed.branch_start[r][b]
                torch.testing.assert_close(logits[r, :n], want[:n], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(logits[r, s : s + len(branch)], want[n:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_scorer_equals_naive_with_random_editors(arch):
    base = make_tiny_causal_lm(arch)
    torch.manual_seed(1)
    model = get_peft_model(base, HPRConfig(target_layers="all", init_weights=False))
    model.eval()
    tok = CharTokenizer(bos=2)
    questions = tiny_questions(3)
    scorer = TruthfulQAScorer(tok, questions, primer=PRIMER, packed=True, max_tokens=64)
    result = scorer.score(model, progress=False, keep_answer_scores=True)
    for q in questions:
        fast = result.answer_scores[q.question_id]
        naive = score_answers_naive(model, tok, q.question, list(fast), primer=PRIMER)
        assert max(abs(a - b) for a, b in zip(naive, fast.values(), strict=True)) < 1e-4


def test_auto_mode_uses_packing_silently_and_falls_back_with_a_warning(monkeypatch):
    model = make_tiny_causal_lm("llama")
    tok = CharTokenizer()
    questions = tiny_questions(3)
    plain = TruthfulQAScorer(tok, questions, primer=PRIMER, packed=False).score(model, progress=False)
    auto = TruthfulQAScorer(tok, questions, primer=PRIMER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = auto.score(model, progress=False)
    assert auto._packing_checked == {id(model): True}
    assert result.mc2 == pytest.approx(plain.mc2, abs=1e-6)

    def broken(self, *args, **kwargs):
        return [[0.0] * len(self.items[0].answers)]

    monkeypatch.setattr(TruthfulQAScorer, "_score_packed", broken)
    fallback = TruthfulQAScorer(tok, questions, primer=PRIMER)
    with pytest.warns(UserWarning, match="packed scoring is not exact"):
        result = fallback.score(model, progress=False)
    assert result.mc2 == plain.mc2
    with pytest.raises(ValueError, match="needs the packed path"):
        TruthfulQAScorer(tok, questions, primer=PRIMER, packed=False).score(
            model, progress=False, watcher=AnswerCollector([0])
        )


@pytest.mark.parametrize("selection", ["last", "response"])
def test_collector_equals_collect_activations(char_tokenizer, selection):
    """Activations recorded while scoring == a dedicated collect_activations pass over the same texts."""
    base = make_tiny_causal_lm("llama")
    model = get_peft_model(base, HPRConfig(target_layers="all"))
    model.eval()
    questions = tiny_questions(2)
    pairs = [
        ContrastivePair(question_context(q.question, PRIMER), " " + t, " " + f, q.question_id)
        for q in questions
        for t, lab_t in zip(q.mc2_choices, q.mc2_labels, strict=True)
        if lab_t
        for f, lab_f in zip(q.mc2_choices, q.mc2_labels, strict=True)
        if not lab_f
    ]
    collector = AnswerCollector([0, 2], token_selection=selection)
    scorer = TruthfulQAScorer(char_tokenizer, questions, primer=PRIMER)
    scorer.score(model, context=model.disable_adapter, progress=False, watcher=collector)
    got = collector.pair_activations(pairs)
    want = collect_activations(
        model, char_tokenizer, pairs, layers=[0, 2], token_selection=selection, progress=False
    )
    assert got.n_rows == want.n_rows and got.group_ids == want.group_ids
    for layer in (0, 2):
        for a, b in zip(got.pair_tensors(layer), want.pair_tensors(layer), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    stray = ContrastivePair("p", " never scored", " No.", "q0")
    with pytest.raises(ValueError, match="was not recorded"):
        collector.pair_activations([stray])
    with pytest.raises(ValueError, match="nothing was recorded"):
        AnswerCollector([0]).pair_activations(pairs)
    with pytest.raises(ValueError, match="token_selection"):
        AnswerCollector([0], token_selection="first")
