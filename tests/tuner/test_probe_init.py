"""Starting probes flag a set share of the tokens whatever the hidden states' common offset."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import hpr_peft
import hpr_peft.tuner.model as tuner_model
from hpr_peft import HPRConfig
from hpr_peft.runtime.blocks import find_decoder_stack
from hpr_peft.tuner.probe_init import (
    IDENTITY_START_SHARE,
    RANDOM_EDITOR_SHARE,
    balanced_probe,
    calibration_states,
)
from support.models import make_tiny_causal_lm

PEFT_TEST_INPUT = {  # the input of PEFT's generic decoder tests: 3 editable tokens in all
    "input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]),
    "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]]),
}


def _cloud(n: int, offset: float, seed: int) -> torch.Tensor:
    """``n`` points in 64 dimensions: unit Gaussian variation around ``offset`` times a fixed direction."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.zeros(64)
    direction[3] = 1.0
    return offset * direction + torch.randn(n, 64, generator=generator)


@pytest.mark.parametrize("offset", [0.0, 2.0, 10.0, 1e4])
@pytest.mark.parametrize("share", [IDENTITY_START_SHARE, RANDOM_EDITOR_SHARE])
def test_balanced_probe_flags_the_share_on_fresh_tokens_whatever_the_offset(offset, share):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    probe = balanced_probe(direction, _cloud(240, offset, seed=2), share)
    fresh = _cloud(4000, offset, seed=3)
    # with no offset at all a hyperplane through the origin halves a centred cloud, whatever its tilt
    expected = share if offset > 0 else 0.5
    assert abs(float((fresh @ probe <= 0).float().mean()) - expected) < 0.07
    scores = fresh @ probe
    spread = float(scores.quantile(0.75) - scores.quantile(0.25)) / 1.349
    assert 0.7 < spread < 1.4  # log-odds of order 1: the straight-through gate sees real gradients
    if offset > 100:  # a plain random direction puts every token on the same side
        assert float((fresh @ direction <= 0).float().mean()) in (0.0, 1.0)


def test_balanced_probe_keeps_the_direction_when_the_sample_says_nothing():
    direction = torch.randn(8)
    assert torch.equal(balanced_probe(direction, torch.ones(1, 8)), direction)  # one token
    assert torch.equal(balanced_probe(direction, torch.ones(5, 8)), direction)  # no spread
    assert torch.equal(balanced_probe(direction, torch.full((5, 8), float("nan"))), direction)


def _offset_llama(scale: float):
    """The tiny Llama with every token embedding shifted by ``scale`` times the mean embedding norm
    along one direction: a common offset that dominates every hidden state."""
    model = make_tiny_causal_lm("llama")
    embeddings = model.model.embed_tokens.weight
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embeddings += scale * embeddings.norm(dim=1).mean() * direction / direction.norm()
    return model


def _flagged_shares(model, ids) -> list[float]:
    with hpr_peft.monitor(model) as records, torch.no_grad():
        model(ids)
    return [records[i].fraction_flagged for i in sorted(records)]


@pytest.mark.parametrize("make_base", [lambda: make_tiny_causal_lm("opt"), lambda: _offset_llama(100.0)])
def test_random_editors_flag_most_tokens_of_every_layer_whatever_the_offset(make_base):
    torch.manual_seed(0)
    model = get_peft_model(make_base(), HPRConfig(target_layers="all", init_weights=False)).eval()
    ids = torch.randint(3, 128, (8, 33), generator=torch.Generator().manual_seed(1))
    shares = _flagged_shares(model, ids)
    assert all(0.55 <= share <= 0.95 for share in shares), shares


@pytest.mark.parametrize("arch", ["opt", "gpt2", "offset-llama"])
def test_random_editors_edit_short_inputs_where_an_offset_dominates(arch):
    """OPT and GPT-2 shift every hidden state by a position embedding, the offset Llama by a constant:
    there a probe through the origin used to flag all tokens of a short input or none."""
    base = _offset_llama(100.0) if arch == "offset-llama" else make_tiny_causal_lm(arch)
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers="all", init_weights=False)).eval()
    generator = torch.Generator().manual_seed(1)
    unedited = 0
    for length in (2, 3, 4):  # 1 to 3 editable tokens
        ids = torch.randint(0, 128, (50, length), generator=generator)
        with torch.no_grad():
            edited = model(ids).logits
            with model.disable_adapter():
                plain = model(ids).logits
        unedited += int(((edited - plain).abs().amax(dim=(1, 2)) == 0).sum())
    assert unedited <= 1  # of 150 inputs


@pytest.mark.parametrize("seed", range(10))
def test_random_editors_edit_peft_test_input_on_opt(seed):
    torch.manual_seed(seed)
    model = get_peft_model(make_tiny_causal_lm("opt"), HPRConfig(init_weights=False)).eval()
    with torch.no_grad():
        edited = model(**PEFT_TEST_INPUT).logits
        with model.disable_adapter():
            plain = model(**PEFT_TEST_INPUT).logits
    assert not torch.allclose(edited, plain, atol=1e-10, rtol=1e-10)


def test_calibration_leaves_random_state_and_modes_as_they_were():
    model = make_tiny_causal_lm("gpt2").train()
    model.transformer.h[1].eval()
    modes = [m.training for m in model.modules()]
    state = torch.random.get_rng_state()
    stack = find_decoder_stack(model)
    states = calibration_states(model, {0: stack.layers[0], 2: stack.layers[2]})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes
    assert set(states) == {0, 2} and states[2].shape == (4 * (4 + 8 + 16 + 32), 32)


def test_calibration_is_skipped_when_weights_are_loaded(tmp_path, monkeypatch):
    calls = []
    original = tuner_model.calibration_states
    monkeypatch.setattr(
        tuner_model, "calibration_states", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1]))
    assert calls == [1]
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)
    assert calls == [1]


def test_a_model_that_cannot_run_keeps_random_probes_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("needs pixel_values")

    monkeypatch.setattr(tuner_model, "calibration_states", broken)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="could not run its calibration forward pass.*needs pixel_values"):
        model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1]))
    assert torch.count_nonzero(model.base_model.hpr_layers()[1].hpr_probe["default"].weight) > 0
