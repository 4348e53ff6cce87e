"""The default config is an exact identity that trains: gradients for every weight, edits after a few steps."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hpr_peft import ContrastivePair, HPRConfig, fit_hpr
from hpr_peft.rotation import pseudo_rotate
from hpr_peft.tuner.trainable_edit import flag_probability, rotate_exactly, straight_through_edit
from support.hpr import token_ids
from support.models import make_char_tokenizer, make_tiny_causal_lm


def _lm_loss(model, ids):
    return model(ids, labels=ids).loss


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_default_config_is_bit_identical_and_every_weight_gets_a_finite_gradient(arch):
    twin = make_tiny_causal_lm(arch)
    model = get_peft_model(make_tiny_causal_lm(arch), HPRConfig())  # target_layers="all", init_weights=True
    ids = token_ids(batch=2, seq=16, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    logits = model(ids).logits  # eval mode (no dropout), recording gradients: the straight-through path
    assert logits.requires_grad and torch.equal(logits.detach(), twin(ids).logits.detach())
    model.train()
    _lm_loss(model, ids).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 6  # per block: probe, 2 Linear (weight, bias), gain
    for name, parameter in trainable.items():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    gains = {n: float(p.grad) for n, p in trainable.items() if "hpr_gain" in n}
    assert all(g != 0 for g in gains.values()), gains  # the zero gain learns at once, like LoRA's B


def test_a_few_optimizer_steps_make_the_default_adapter_edit():
    twin = make_tiny_causal_lm("llama")
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig()).train()
    ids, held_out = token_ids(batch=4, seq=16, seed=3), token_ids(batch=2, seq=16, seed=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = _lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if name in start:  # every weight moved once the gain left zero: probe, angle net and gain
            assert not torch.equal(parameter, start[name]), name
    model.eval()
    with torch.no_grad():
        edited, plain = model(held_out).logits, twin(held_out).logits
    assert (edited - plain).abs().amax() > 1e-2


def test_straight_through_edit_has_inference_values_and_gate_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    probe = torch.randn(8, generator=generator, requires_grad=True)
    theta = torch.rand(2, 5, generator=generator) + 0.1
    eligible = torch.ones(2, 5, dtype=torch.bool)
    eligible[:, 0] = False
    scores = hidden @ probe
    flagged = eligible & (scores <= 0)
    probability = flag_probability(scores, 0.5)
    out = straight_through_edit(hidden, probe, theta, flagged, eligible, probability)
    rotated = pseudo_rotate(hidden, probe, theta)
    assert torch.equal(out, torch.where(flagged.unsqueeze(-1), rotated, hidden))  # the inference values
    # the gate's gradient: d out / d probability = rotate(h) - h for every eligible token, 0 elsewhere
    upstream = torch.randn(2, 5, 8, generator=generator)
    (grad_probability,) = torch.autograd.grad((out * upstream).sum(), probability, retain_graph=True)
    expected = ((rotated - hidden) * upstream).sum(-1) * eligible
    torch.testing.assert_close(grad_probability, expected.detach())
    # so the probe learns from tokens it does not flag (a hard gate gives them nothing)
    unflagged = eligible & ~flagged
    assert unflagged.any()
    (grad_probe,) = torch.autograd.grad((out * upstream * unflagged.unsqueeze(-1)).sum(), probe)
    assert grad_probe.abs().sum() > 0


def test_a_zero_angle_returns_the_token_bit_for_bit_with_the_rotation_gradient():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 16, generator=generator) * 50
    probe = torch.randn(16, generator=generator)
    gain = torch.zeros((), requires_grad=True)
    out = rotate_exactly(hidden, probe, gain * torch.ones(6))
    assert torch.equal(out, hidden)
    (grad,) = torch.autograd.grad(out.sum(), gain)
    epsilon = 1e-3  # the true derivative of the rotation at 0, by central differences in float64
    plus = pseudo_rotate(hidden.double(), probe.double(), torch.full((6,), epsilon, dtype=torch.float64))
    minus = pseudo_rotate(hidden.double(), probe.double(), torch.full((6,), -epsilon, dtype=torch.float64))
    torch.testing.assert_close(grad.double(), ((plus - minus).sum() / (2 * epsilon)), rtol=1e-3, atol=1e-3)


def test_fitted_editors_have_full_gain_and_edit_as_before_the_gain_existed():
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2]))
    pairs = [
        ContrastivePair(f"Q: n{i}?\nA:", f" yes {i % 3}", f" no {i % 4}", f"g{i // 2}") for i in range(30)
    ]
    fit_hpr(model, make_char_tokenizer(), pairs, top_k=2, epochs=2, seed=7, progress=False)
    layers = model.base_model.hpr_layers()
    assert all(float(layer.hpr_gain["default"].weight) == 1.0 for layer in layers.values())
    assert not any(layer.is_identity("default") for layer in layers.values())


def test_set_editor_rejects_a_gain_that_is_not_a_finite_number():
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1]))
    layer = model.base_model.hpr_layers()[1]
    state = layer.hpr_angle["default"].state_dict()
    with pytest.raises(ValueError, match="gain must be a finite number"):
        layer.set_editor("default", torch.ones(32), state, gain=float("nan"))
    layer.set_editor("default", torch.ones(32), state, gain=0.5)
    assert float(layer.hpr_gain["default"].weight) == 0.5
