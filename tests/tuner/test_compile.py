"""``torch.compile(peft_model)`` traces the edit without a graph break coming from hpr_peft.

Eager on CPU the edit gathers the flagged tokens (``nonzero``, a data-dependent shape) and skips an
editor that cannot edit (``is_identity``, a host read); under ``torch.compile`` it takes the dense path
instead (every token computed, merged with ``torch.where``), as on accelerators. The speed of compiled
against eager forwards is measured by ``benchmarks/bench_forward.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import hpr_peft
from hpr_peft import HPRConfig
from support.hpr import token_ids
from support.models import make_tiny_causal_lm

PACKAGE_DIR = str(Path(hpr_peft.__file__).resolve().parent)


def _breaks_in_hpr_peft(explanation) -> list[str]:
    """The graph breaks whose user stack passes through hpr_peft's code."""
    found = []
    for reason in explanation.break_reasons:
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in reason.user_stack if PACKAGE_DIR in f.filename]
        if frames:
            found.append(f"{reason.reason.splitlines()[0]} at {frames}")
    return found


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "config, recording",
    [
        pytest.param({"target_layers": [1, 2], "init_weights": False}, False, id="random-editors-inference"),
        pytest.param({}, True, id="identity-start-training"),
    ],
)
def test_dynamo_traces_the_edit_without_a_break_from_hpr_peft(config, recording):
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(**config))
    ids = token_ids()
    with torch.set_grad_enabled(recording):
        explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_count >= 1
    assert _breaks_in_hpr_peft(explanation) == []


def test_a_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2], init_weights=False))
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2], init_weights=False))
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + autograd graphs, no C++ toolchain needed
    ids = token_ids(batch=2, seq=16, seed=3)
    losses = []
    for run in (eager, compiled):
        loss = run(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    compiled_grads = dict(model.named_parameters())
    for name, parameter in eager.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(compiled_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
