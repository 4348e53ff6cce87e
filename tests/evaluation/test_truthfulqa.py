"""TruthfulQA MC1/MC2 scoring: fast path == naive lm-eval reference, metrics, adapters really change scores."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.data import QA_PRIMER, MCQuestion
from hpr_peft.evaluation.truthfulqa import (
    TruthfulQAScorer,
    encode_pair,
    mc_metrics,
    score_answers_naive,
    score_truthfulqa,
)
from support.evaluation import CharTokenizer, tiny_questions
from support.models import make_tiny_causal_lm

PRIMER = "Q: What is one?\nA: One is a number.\n\nQ: Sky?\nA: Blue."


def _scores(model, tok, questions, **kw):
    return TruthfulQAScorer(tok, questions, primer=PRIMER, **kw).score(
        model, progress=False, keep_answer_scores=True
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("bos", [None, 2])
def test_fast_scores_equal_naive(arch, bos):
    model = make_tiny_causal_lm(arch)
    tok = CharTokenizer(bos=bos)
    questions = tiny_questions(3)
    result = _scores(model, tok, questions, batch_answers=4)  # forces several answer chunks
    for q in questions:
        answers = list(result.answer_scores[q.question_id])
        assert set(answers) == set(q.mc1_choices) | set(q.mc2_choices)  # deduplicated union
        naive = score_answers_naive(model, tok, q.question, answers, primer=PRIMER)
        fast = [result.answer_scores[q.question_id][a] for a in answers]
        assert max(abs(a - b) for a, b in zip(naive, fast, strict=True)) < 1e-4


def test_score_restores_the_train_mode_also_after_an_error():
    model = make_tiny_causal_lm("llama").train()
    scorer = TruthfulQAScorer(CharTokenizer(), tiny_questions(1), primer=PRIMER)
    seen = []
    scorer.score(model, context=lambda: _recording(seen, model), progress=False)
    assert seen == [False] and model.training  # scored in eval mode, train mode given back

    def failing():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        scorer.score(model, context=failing, progress=False)
    assert model.training


@contextlib.contextmanager
def _recording(seen: list, model):
    seen.append(model.training)
    yield


def test_mc_metrics_strict_tie_and_mc2():
    q = tiny_questions(1)[0]
    scores = {c: -5.0 for c in q.mc2_choices}
    mc1, mc2 = mc_metrics(q, scores)
    assert mc1 == 0.0  # a tie is wrong: never break ties by position
    assert mc2 == pytest.approx(2 / 6)
    scores[q.mc1_choices[0]] = -4.999
    assert mc_metrics(q, scores)[0] == 1.0
    scores = {c: -1000.0 for c in q.mc2_choices}  # underflow-safe
    scores["No."] = -2000.0
    assert mc_metrics(q, scores)[1] == pytest.approx(2 / 5)


def test_encode_pair_moves_trailing_space():
    tok = CharTokenizer()
    ctx, cont = encode_pair(tok, "A: ", "x")
    assert len(ctx) == 2 and len(cont) == 2


def test_adapter_disabled_is_exact_and_enabled_differs():
    base = make_tiny_causal_lm("llama")
    tok = CharTokenizer(bos=2)
    questions = tiny_questions(2)
    plain = _scores(base, tok, questions)
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[1, 2], init_weights=False))
    model.eval()
    scorer = TruthfulQAScorer(tok, questions, primer=PRIMER)
    off = scorer.score(model, context=model.disable_adapter, progress=False, keep_answer_scores=True)
    on = scorer.score(model, progress=False, keep_answer_scores=True)
    assert off.answer_scores == plain.answer_scores
    assert off.mc2 == plain.mc2
    diffs = [
        abs(on.answer_scores[q][a] - plain.answer_scores[q][a])
        for q in plain.answer_scores
        for a in plain.answer_scores[q]
    ]
    assert max(diffs) > 1e-3  # the adapter really edits through the cached fast path


def test_hpr_fast_path_equals_naive_with_adapter():
    base = make_tiny_causal_lm("llama")
    torch.manual_seed(1)
    model = get_peft_model(base, HPRConfig(target_layers=[0, 2], init_weights=False))
    model.eval()
    tok = CharTokenizer()
    q = tiny_questions(1)[0]
    fast = _scores(model, tok, [q]).answer_scores[q.question_id]
    naive = score_answers_naive(model, tok, q.question, list(fast), primer=PRIMER)
    assert max(abs(a - b) for a, b in zip(naive, fast.values(), strict=True)) < 1e-4


def test_result_summary_and_subset():
    model = make_tiny_causal_lm("llama")
    result = score_truthfulqa(model, CharTokenizer(), tiny_questions(3), progress=False)
    assert result.question_ids == ["q0", "q1", "q2"]
    assert all(v in (0.0, 1.0) for v in result.mc1)
    assert all(0.0 < v < 1.0 for v in result.mc2)
    sub = result.subset(["q2", "q0"])
    assert sub.mc2 == [result.mc2[2], result.mc2[0]]
    assert math.isfinite(result.mc2_se)
    with pytest.raises(ValueError, match="not scored"):
        result.subset(["nope"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        TruthfulQAScorer(CharTokenizer(), [])
    with pytest.raises(TypeError, match="MCQuestion"):
        TruthfulQAScorer(CharTokenizer(), ["What?"])


@pytest.mark.slow
def test_smollm2_fast_equals_naive(smollm2, truthfulqa_dir):
    from hpr_peft.data import load_truthfulqa_mc

    model, tok = smollm2
    questions = load_truthfulqa_mc(truthfulqa_dir)[:2]
    result = TruthfulQAScorer(tok, questions).score(model, progress=False, keep_answer_scores=True)
    for q in questions:
        fast = result.answer_scores[q.question_id]
        naive = score_answers_naive(model, tok, q.question, list(fast), primer=QA_PRIMER)
        # float32 summation order differs between batch shapes; scores are O(10-50) nats.
        assert max(abs(a - b) for a, b in zip(naive, fast.values(), strict=True)) < 1e-3
    assert isinstance(questions[0], MCQuestion)
