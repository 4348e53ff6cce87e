"""Additive mean-difference steering: vectors, hooks, skipped positions, cache equivalence."""

from __future__ import annotations

import pytest
import torch

from hpr_peft.evaluation import TruthfulQAScorer, score_answers_naive
from hpr_peft.evaluation.baselines import additive_steering, mean_difference_vectors
from support.evaluation import CharTokenizer, tiny_questions
from support.models import make_tiny_causal_lm


def test_mean_difference_and_normalisation():
    pos = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    v = mean_difference_vectors({3: (pos, neg)})[3]
    assert torch.allclose(v, torch.tensor([3.0, -2.0]))
    vn = mean_difference_vectors({3: (pos, neg)}, normalize=True)[3]
    unit = v / v.norm()
    assert torch.allclose(vn / vn.norm(), unit, atol=1e-6)
    assert float(vn.norm()) == pytest.approx(float((torch.cat([pos, neg]) @ unit).std()), rel=1e-5)
    with pytest.raises(ValueError, match="available"):
        mean_difference_vectors({3: (pos, neg)}, layers=[4])
    with pytest.raises(TypeError, match="PairActivations"):
        mean_difference_vectors([pos, neg])


def test_steering_adds_vector_except_padding_and_start():
    model = make_tiny_causal_lm("llama")
    d = model.config.hidden_size
    v = torch.randn(d)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = []
    block2 = model.model.layers[2]
    handle = block2.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )

    def input_of_block2(**steer):
        with torch.no_grad():
            if steer:
                with additive_steering(model, **steer):
                    model(input_ids=ids, attention_mask=mask)
            else:
                model(input_ids=ids, attention_mask=mask)
        return seen[-1]

    plain = input_of_block2()
    steered = input_of_block2(vectors={1: v}, alpha=0.5)
    after = input_of_block2()
    handle.remove()
    diff = steered - plain
    edited = mask.bool().clone()
    edited[0, 2] = False  # first real token of the left-padded row
    edited[1, 0] = False
    assert torch.allclose(diff[edited], (0.5 * v).expand(int(edited.sum()), d), atol=1e-5)
    assert torch.equal(diff[~edited], torch.zeros_like(diff[~edited]))
    assert torch.equal(after, plain)  # hooks removed on exit


def test_steering_through_cached_scorer_equals_naive_and_changes_scores():
    model = make_tiny_causal_lm("llama")
    tok = CharTokenizer(bos=2)
    q = tiny_questions(1)[0]
    primer = "Q: One?\nA: Yes."
    v = torch.randn(model.config.hidden_size)
    scorer = TruthfulQAScorer(tok, [q], primer=primer)
    plain = scorer.score(model, progress=False, keep_answer_scores=True).answer_scores["q0"]
    with additive_steering(model, {0: v, 2: v}, alpha=1.0):
        fast = scorer.score(model, progress=False, keep_answer_scores=True).answer_scores["q0"]
        naive = score_answers_naive(model, tok, q.question, list(fast), primer=primer)
    assert max(abs(a - b) for a, b in zip(naive, fast.values(), strict=True)) < 1e-4
    assert max(abs(fast[a] - plain[a]) for a in plain) > 1e-3


def test_bad_arguments():
    model = make_tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="non-empty"), additive_steering(model, {}):
        pass
    with pytest.raises(ValueError, match="decoder blocks"), additive_steering(model, {9: torch.zeros(32)}):
        pass
