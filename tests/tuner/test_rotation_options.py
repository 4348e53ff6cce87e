"""The rotation options of an adapter: a stored direction (``rotation_direction="mean_difference"``) and
protected massive dimensions (``exclude_massive_dims``); the probe still decides which tokens turn."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hpr_peft import HPRConfig
from hpr_peft.tuner.layer import build_angle_net
from support.hpr import random_hpr_model, token_ids
from support.models import make_tiny_causal_lm


@torch.no_grad()
def _block_output(model, ids: torch.Tensor, layer: int, adapter: bool = True) -> torch.Tensor:
    if adapter:
        return model(ids, output_hidden_states=True).hidden_states[layer + 1]
    with model.disable_adapter():
        return model(ids, output_hidden_states=True).hidden_states[layer + 1]


def test_rotation_options_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="rotation_direction must be one of"):
        HPRConfig(rotation_direction="mean")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="exclude_massive_dims must be a non-negative int"):
            HPRConfig(exclude_massive_dims=bad)
    with pytest.raises(ValueError, match="below the model's hidden size 32"):
        get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1], exclude_massive_dims=32))
    config = HPRConfig(rotation_direction="mean_difference", exclude_massive_dims=3)
    assert config.to_dict()["rotation_direction"] == "mean_difference"
    assert config.to_dict()["exclude_massive_dims"] == 3


def test_default_adapters_have_no_direction_or_protected_dims():
    model = random_hpr_model()
    keys = list(model.state_dict())
    assert not any("hpr_direction" in k or "hpr_protected" in k for k in keys)


def test_a_direction_equal_to_the_probe_is_the_probe_edit_bit_for_bit():
    ids = token_ids(seed=1)
    with torch.no_grad():
        probe_logits = random_hpr_model(seed=3)(ids).logits
        model = random_hpr_model(seed=3, rotation_direction="mean_difference")
        layer = model.base_model.hpr_layers()[1]
        assert torch.equal(layer.hpr_direction["default"].weight, layer.hpr_probe["default"].weight[0])
        assert torch.equal(model(ids).logits, probe_logits)


def test_another_direction_turns_the_same_tokens_elsewhere():
    ids = token_ids(seed=2)
    probe_model = random_hpr_model(seed=3, target_layers=[1])
    model = random_hpr_model(seed=3, target_layers=[1], rotation_direction="mean_difference")
    layer = model.base_model.hpr_layers()[1]
    with torch.no_grad():
        layer.hpr_direction["default"].weight.normal_()
    plain = _block_output(model, ids, 1, adapter=False)
    by_probe, by_direction = _block_output(probe_model, ids, 1), _block_output(model, ids, 1)
    changed = (by_direction != plain).any(-1)
    assert changed.any() and torch.equal(changed, (by_probe != plain).any(-1))  # the probe's gate
    assert not torch.allclose(by_direction[changed], by_probe[changed])
    assert torch.allclose(by_direction.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5)


def test_protected_dims_are_left_untouched_and_norms_kept():
    ids = token_ids(seed=4)
    model = random_hpr_model(seed=5, target_layers=[1], exclude_massive_dims=3)
    protected = model.base_model.hpr_layers()[1].hpr_protected["default"].index
    assert protected.dtype == torch.long and protected.unique().numel() == 3
    plain, edited = _block_output(model, ids, 1, adapter=False), _block_output(model, ids, 1)
    assert (edited != plain).any(-1).float().mean() > 0.3
    assert torch.equal(edited[..., protected], plain[..., protected])
    assert torch.allclose(edited.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5)
    # the starting protected dims are the calibration sample's massive ones: the largest mean h_i^2
    mean_square = plain.pow(2).mean((0, 1))
    assert mean_square[protected].min() >= mean_square.median()


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    ids = token_ids(seed=6)
    options = {"rotation_direction": "mean_difference", "exclude_massive_dims": 2}
    model = random_hpr_model(seed=7, **options)
    with torch.no_grad():
        for layer in model.base_model.hpr_layers().values():
            layer.hpr_direction["default"].weight.normal_()
            layer.hpr_protected["default"].index.copy_(torch.tensor([5, 17]))
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("1.hpr_direction.weight") for k in tensors)
    index_keys = [k for k in tensors if "hpr_protected" in k]
    assert index_keys and all(tensors[k].tolist() == [5, 17] for k in index_keys)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            make_tiny_causal_lm("llama"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert loaded.peft_config["default"].rotation_direction == "mean_difference"
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def test_damaged_or_mismatched_protected_dims_are_refused_on_load(tmp_path):
    model = random_hpr_model(seed=8, exclude_massive_dims=2)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "hpr_protected" in k)
    save_file({**tensors, key: torch.tensor([3, 32])}, path)
    with pytest.raises(ValueError, match=r"distinct integer dimension indices in \[0, 32\)"):
        PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)
    save_file({**tensors, key: torch.tensor([3, 4, 5])}, path)
    with pytest.raises(ValueError, match="exclude_massive_dims=2"):
        PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)


def test_the_identity_start_trains_every_weight_with_the_options():
    twin = make_tiny_causal_lm("llama")
    config = HPRConfig(rotation_direction="mean_difference", exclude_massive_dims=2)
    model = get_peft_model(make_tiny_causal_lm("llama"), config)
    ids = token_ids(batch=2, seq=16, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum("hpr_direction" in n for n in trainable) == 4  # one direction per block
    for name, parameter in trainable.items():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert all(float(p.grad) != 0 for n, p in trainable.items() if "hpr_gain" in n)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


def test_set_editor_installs_and_checks_the_options():
    model = random_hpr_model(target_layers=[1], rotation_direction="mean_difference", exclude_massive_dims=2)
    layer = model.base_model.hpr_layers()[1]
    state = build_angle_net(32, None).state_dict()
    w, u = torch.randn(32), torch.randn(32)
    layer.set_editor("default", w, state, direction=u, protected_dims=torch.tensor([1, 9]))
    assert torch.equal(layer.rotation_direction("default"), u)
    assert layer.protected_dims("default").tolist() == [1, 9]
    with pytest.raises(ValueError, match="pass direction=u"):
        layer.set_editor("default", w, state, protected_dims=torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="pass protected_dims"):
        layer.set_editor("default", w, state, direction=u)
    with pytest.raises(ValueError, match="distinct dimension indices"):
        layer.set_editor("default", w, state, direction=u, protected_dims=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        layer.set_editor("default", w, state, direction=torch.randn(31), protected_dims=torch.tensor([1, 2]))
    plain = random_hpr_model(target_layers=[1]).base_model.hpr_layers()[1]
    with pytest.raises(ValueError, match="direction must be None"):
        plain.set_editor("default", w, state, direction=u)
