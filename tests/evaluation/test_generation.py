"""TruthfulQA generation: cached greedy decoding equals uncached decoding in every editing state, the
answers and metrics equal lm-eval's own truthfulqa_gen run (local task copy), metrics are lm-eval's."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hpr_peft.data import GenerationQuestion, load_truthfulqa_generation
from hpr_peft.evaluation.baselines import additive_steering
from hpr_peft.evaluation.generation import (
    GENERATION_METRICS,
    generate_answers,
    generate_truthfulqa,
    score_generations,
)
from support import REPO_ROOT
from support.hpr import random_hpr_model
from support.models import make_char_tokenizer

PRIMER = "Q: Is water wet?\nA: Yes.\n\nQ: Is fire cold?\nA: No.\n\n"
PROMPTS = [PRIMER + f"Q: {q}\nA:" for q in ("Can pigs fly?", "Is the sky green today?", "Why?")]
STOP = "\n\n"


@torch.no_grad()
def uncached_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Reference: one full forward over the whole text per new token, no cache."""
    ids = list(tokenizer(prompt)["input_ids"])
    eos = {tokenizer.eos_token_id}
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
        token = int(logits.argmax())
        if token in eos:
            break
        generated.append(token)
        if STOP in tokenizer.decode(generated, skip_special_tokens=True):
            break
    return tokenizer.decode(generated, skip_special_tokens=True).split(STOP)[0]


def editing_states(model):
    vectors = {1: torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3.0}
    return {
        "hpr": contextlib.nullcontext,
        "unedited": model.disable_adapter,
        "additive": lambda: _stacked(model.disable_adapter(), additive_steering(model, vectors, alpha=1.0)),
    }


@contextlib.contextmanager
def _stacked(*managers):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def test_cached_generation_equals_uncached_in_every_editing_state():
    model = random_hpr_model("llama", target_layers=[1, 2], alpha=2.0)
    model.generation_config.eos_token_id = None
    tokenizer = make_char_tokenizer()
    answers = {}
    for name, context in editing_states(model).items():
        answers[name] = generate_answers(
            model, tokenizer, PROMPTS, context, max_new_tokens=16, progress=False
        )
        with context():
            expected = [uncached_greedy(model, tokenizer, prompt, 16) for prompt in PROMPTS]
        assert answers[name] == expected, name
    assert answers["hpr"] != answers["unedited"] and answers["additive"] != answers["unedited"]


def test_generation_restores_the_train_mode_also_after_an_error():
    model = random_hpr_model("llama").train()
    tokenizer = make_char_tokenizer()
    generate_answers(model, tokenizer, PROMPTS[:1], max_new_tokens=2, progress=False)
    assert model.training

    @contextlib.contextmanager
    def failing():
        assert not model.training  # generation runs in eval mode
        raise RuntimeError("decoding failed")
        yield

    with pytest.raises(RuntimeError, match="decoding failed"):
        generate_answers(model, tokenizer, PROMPTS[:1], failing, max_new_tokens=2, progress=False)
    assert model.training


def test_bad_generation_input_is_named():
    model = random_hpr_model("llama")
    tokenizer = make_char_tokenizer()
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_answers(model, tokenizer, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="one each"):
        score_generations([], ["an answer"])


def test_metrics_are_lm_eval_truthfulqa_gen():
    from lm_eval.tasks.truthfulqa.utils import preprocess_function, process_results_gen

    question = GenerationQuestion("q", "Can pigs fly?", ("No, pigs cannot fly",), ("Yes, pigs can fly",))
    result = score_generations([question, question], [" No, pigs cannot fly.", " Yes, pigs can fly."])
    assert set(result.metrics) == set(GENERATION_METRICS)
    assert result.metrics["bleu_acc"] == [1.0, 0.0] and result.metrics["rougeL_acc"] == [1.0, 0.0]
    doc = preprocess_function(
        {
            "question": "Can pigs fly?",
            "correct_answers": ["No, pigs cannot fly"],
            "incorrect_answers": ["Yes, pigs can fly"],
        }
    )
    direct = process_results_gen(doc, [" Yes, pigs can fly."])
    assert {name: result.metrics[name][1] for name in GENERATION_METRICS} == pytest.approx(direct, abs=0)
    assert result.means()["bleu_acc"] == 0.5


@pytest.mark.slow
def test_answers_and_metrics_equal_lm_evals_truthfulqa_gen(smollm2, truthfulqa_dir):
    """lm-eval's own generate_until + process_results_gen on the local truthfulqa_gen copy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hpr_peft.integrations.lm_eval import hpr_lm

    model, tokenizer = smollm2
    n = 3
    questions = load_truthfulqa_generation(truthfulqa_dir)[:n]
    ours = generate_truthfulqa(model, tokenizer, questions, progress=False)
    results = lm_eval.simple_evaluate(
        model=hpr_lm(model, tokenizer, batch_size=1),
        tasks=["truthfulqa_local_gen"],
        task_manager=TaskManager(include_path=str(REPO_ROOT / "examples" / "lm_eval_tasks")),
        limit=n,
        log_samples=True,
    )
    samples = sorted(results["samples"]["truthfulqa_local_gen"], key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [q.question for q in questions]
    assert [s["filtered_resps"][0] for s in samples] == ours.completions
    assert all(answer.strip() for answer in ours.completions)
    for name in GENERATION_METRICS:
        assert [float(s[name]) for s in samples] == pytest.approx(ours.metrics[name], abs=1e-9), name
