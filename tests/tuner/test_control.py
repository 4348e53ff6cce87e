"""Run-time control: edit_settings, persistent setters, and monitor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel

from hpr_peft import edit_settings, monitor
from hpr_peft.tuner.layer import predict_angle
from support.hpr import edited_fraction, random_hpr_model, token_ids
from support.models import make_tiny_causal_lm


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


@torch.no_grad()
def _base_logits(model, ids, **kwargs):
    with model.disable_adapter():
        return model(ids, **kwargs).logits


def test_edit_settings_alpha_changes_strength_and_restores():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    edited, base = _logits(model, ids), _base_logits(model, ids)
    with edit_settings(model, alpha=0.0):
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), edited)
    with edit_settings(model, alpha=0.3):
        weaker = _logits(model, ids)
    assert not torch.allclose(weaker, edited, atol=1e-4) and not torch.allclose(weaker, base, atol=1e-4)
    assert model.peft_config["default"].alpha == 1.0  # temporary: the config is not touched


def test_edit_settings_layers_switch_blocks_off_and_restore_on_exception():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    edited, base = _logits(model, ids), _base_logits(model, ids)
    with edit_settings(model, layers=[2]):
        assert edited_fraction(model, ids, layer=1) == 0.0
        assert edited_fraction(model, ids, layer=2) > 0.2
    with edit_settings(model.base_model, layers=[]):
        assert torch.equal(_logits(model, ids), base)
    with pytest.raises(RuntimeError, match="boom"), edit_settings(model, alpha=0.0, layers=[1]):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids), edited)
    with (
        pytest.raises(ValueError, match=r"layers \[0\] carry no HPR editor.*\[1, 2\]"),
        edit_settings(model, layers=[0, 1]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="alpha must be a finite number"),
        edit_settings(model, alpha=math.nan),
    ):
        pass
    with (
        pytest.raises(TypeError, match="PeftModel with an HPR adapter"),
        edit_settings(make_tiny_causal_lm("llama"), alpha=1.0),
    ):
        pass
    assert torch.equal(_logits(model, ids), edited)


def test_persistent_setters_update_the_saved_config(tmp_path):
    model = random_hpr_model("gpt2", target_layers=[1, 2, 3])
    tuner = model.base_model
    ids = token_ids()
    tuner.set_alpha(0.5)
    tuner.set_selected_layers([2, 3])
    assert tuner.selected_layers() == [2, 3]
    assert edited_fraction(model, ids, layer=1) == 0.0
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        saved["alpha"] == 0.5 and saved["selected_layers"] == [2, 3] and saved["target_layers"] == [1, 2, 3]
    )

    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("gpt2"), tmp_path)
    assert loaded.base_model.selected_layers() == [2, 3]
    assert torch.equal(_logits(loaded, ids), expected)
    loaded.base_model.set_selected_layers(None)  # all targets again
    assert loaded.base_model.selected_layers() == [1, 2, 3]
    assert edited_fraction(loaded, ids, layer=1) > 0.2
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        tuner.set_alpha(math.inf)


def test_configured_sets_the_saved_settings_for_a_block_and_restores_them_on_exception(tmp_path):
    model = random_hpr_model("gpt2", target_layers=[1, 2, 3])
    tuner = model.base_model
    ids = token_ids()
    before = _logits(model, ids)
    with tuner.configured(alpha=0.5, layers=[2]):
        assert tuner.selected_layers() == [2] and edited_fraction(model, ids, layer=1) == 0.0
        model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["alpha"] == 0.5 and saved["selected_layers"] == [2]
    config = tuner.peft_config["default"]
    assert config.alpha == 1.0 and config.selected_layers is None  # None (all targets), not a list
    assert tuner.selected_layers() == [1, 2, 3] and torch.equal(_logits(model, ids), before)
    with pytest.raises(RuntimeError, match="inside"), tuner.configured(alpha=2.0):
        assert config.alpha == 2.0
        raise RuntimeError("inside")
    assert config.alpha == 1.0
    with pytest.raises(ValueError), tuner.configured(alpha=3.0, layers=[7]):  # not a target: refused
        pass
    assert config.alpha == 1.0 and torch.equal(_logits(model, ids), before)


def test_monitor_records_probe_results_without_editing():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids(batch=3, seq=10, seed=6)
    base = _base_logits(model, ids)
    n_edited_layer1 = round(edited_fraction(model, ids, layer=1) * ids.numel())
    with torch.no_grad(), model.disable_adapter():
        plain_hidden = model(ids, output_hidden_states=True).hidden_states
    with monitor(model) as records:
        assert torch.equal(_logits(model, ids), base)  # probes run, nothing is edited
    assert sorted(records) == [1, 2]
    eligible = 3 * (10 - 1)  # sequence starts are never eligible
    for index, record in records.items():
        layer = model.base_model.hpr_layers()[index]
        assert record.n_tokens == eligible and record.scores.shape == (eligible,)
        h = plain_hidden[index + 1][:, 1:]
        scores = h @ layer.hpr_probe["default"].weight[0].detach()
        torch.testing.assert_close(record.scores, scores.reshape(-1), rtol=1e-5, atol=1e-6)
        flagged = scores <= 0
        assert record.n_flagged == int(flagged.sum()) and 0 < record.n_flagged < eligible
        assert record.fraction_flagged == pytest.approx(record.n_flagged / eligible)
        with torch.no_grad():
            angles = predict_angle(layer.hpr_angle["default"], h[flagged])
        torch.testing.assert_close(record.angles, angles)
        assert ((record.probabilities > 0) & (record.probabilities < 1)).all()
        # the mean edit angle counts the tokens the gate leaves alone as 0
        assert record.mean_edit_angle == pytest.approx(float(angles.sum()) / eligible, rel=1e-5)
        assert 0 < record.mean_edit_angle < float(angles.mean())
    assert records[1].n_flagged == n_edited_layer1  # the same tokens the editor rotates
    json.dumps(records.summary())
    assert not torch.equal(_logits(model, ids), base)  # editing resumes after the block


def test_monitor_never_counts_padding_and_accumulates_calls():
    model = random_hpr_model("qwen2", target_layers=[2])
    ids = token_ids(batch=2, seq=8, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: row 0 has 3 real tokens
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with monitor(model) as records, torch.no_grad():
        model(ids, attention_mask=mask, position_ids=position_ids)
        model(ids[1:])
    record = records[2]
    assert record.n_tokens == (3 - 1) + (8 - 1) + (8 - 1)
    assert len(record.scores) == record.n_tokens and len(record.angles) == record.n_flagged
    assert record.summary()["n_tokens"] == record.n_tokens


@torch.no_grad()
def test_negative_alpha_turns_flagged_tokens_the_other_way():
    """alpha < 0 is the opposite edit: flagged tokens move away from the probe's positive side (w·h
    drops instead of rising), with their norms kept; alpha > 0 moves them towards it."""
    model = random_hpr_model("llama", target_layers=[1])
    ids = token_ids(batch=2, seq=10, seed=8)
    w = model.base_model.hpr_layers()[1].hpr_probe["default"].weight[0]
    with model.disable_adapter():
        plain = model(ids, output_hidden_states=True).hidden_states[2]
    moved = {}
    for alpha in (1.0, -1.0):
        with edit_settings(model, alpha=alpha):
            edited = model(ids, output_hidden_states=True).hidden_states[2]
        changed = (edited != plain).any(-1)
        assert changed.sum() > 3
        torch.testing.assert_close(edited.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5, atol=1e-6)
        moved[alpha] = (edited[changed] @ w) - (plain[changed] @ w)
    assert (moved[1.0] > 0).all() and (moved[-1.0] < 0).all()


def test_numpy_scalars_are_accepted_alike_everywhere():
    ids = token_ids()
    model = random_hpr_model("llama", target_layers=[np.int64(1), 2], alpha=np.float32(0.5))
    assert (
        model.peft_config["default"].target_layers == [1, 2]
        and type(model.peft_config["default"].alpha) is float
    )
    json.dumps(model.peft_config["default"].to_dict(), default=str)  # plain ints and floats
    with torch.no_grad():
        half = _logits(model, ids)
        model.base_model.set_alpha(np.float64(1.0))
        with edit_settings(model, alpha=np.float32(0.5), layers=np.array([1, 2])):
            assert torch.equal(_logits(model, ids), half)
        model.base_model.set_selected_layers(np.array([2]))
        assert model.base_model.selected_layers() == [2]
    for bad in (np.bool_(True), np.array([0.5])):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            model.base_model.set_alpha(bad)
