"""HPR through PEFT's public API: save/load, adapter names, Auto classes, multiple adapters, training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hpr_peft import HPRConfig, HPRLayer
from support.hpr import edited_fraction, random_hpr_model, token_ids
from support.models import make_tiny_causal_lm


def _expected_keys(layers, prefix="base_model.model.model.layers"):
    names = [
        "hpr_probe.weight",
        "hpr_angle.0.weight",
        "hpr_angle.0.bias",
        "hpr_angle.2.weight",
        "hpr_angle.2.bias",
        "hpr_gain.weight",
    ]
    return {f"{prefix}.{i}.{name}" for i in layers for name in names}


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def test_save_writes_only_hpr_tensors_and_reloads_identically(tmp_path):
    model = random_hpr_model("llama", target_layers=[1, 3])
    ids = token_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == _expected_keys([1, 3])
    assert tensors["base_model.model.model.layers.1.hpr_angle.0.weight"].shape == (16, 32)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HPR" and config["target_layers"] == [1, 3]

    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)
    assert isinstance(loaded.base_model.model.model.layers[1], HPRLayer)
    assert torch.equal(_logits(loaded, ids), expected)
    assert edited_fraction(loaded, ids, layer=1) > 0.2


def test_loading_under_another_adapter_name_loads_the_real_weights(tmp_path):
    model = random_hpr_model("gpt2", target_layers=[0, 2])
    ids = token_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("gpt2"), tmp_path, adapter_name="truthful")
    assert loaded.active_adapters == ["truthful"]
    assert torch.equal(_logits(loaded, ids), expected)

    # a second copy loaded next to it under yet another name has the same weights
    loaded.load_adapter(tmp_path, adapter_name="copy")
    for index, layer in loaded.base_model.hpr_layers("copy").items():
        original = model.base_model.hpr_layers()[index]
        for name in ("hpr_probe", "hpr_angle"):
            got = getattr(layer, name)["copy"].state_dict()
            want = getattr(original, name)["default"].state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_auto_peft_model_loads_base_from_local_path(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_tiny_causal_lm("qwen2").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[2], init_weights=False))
    ids = token_ids()
    expected = _logits(model.eval(), ids)
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )

    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert torch.equal(_logits(auto.eval(), ids), expected)


def test_add_set_delete_adapters():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    first = _logits(model, ids)
    torch.manual_seed(5)
    model.add_adapter("second", HPRConfig(target_layers=[2, 3], init_weights=False))
    tuner = model.base_model
    assert sorted(tuner.hpr_layers("second")) == [2, 3]
    assert torch.equal(_logits(model, ids), first)  # adding does not activate

    model.set_adapter("second")
    second = _logits(model, ids)
    assert not torch.allclose(second, first, atol=1e-3)
    assert edited_fraction(model, ids, layer=1) == 0.0  # block 1 belongs to "default" only
    assert edited_fraction(model, ids, layer=2) > 0.2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)

    with pytest.raises(ValueError, match=r"target_layers \[9\] out of range"):
        model.add_adapter("broken", HPRConfig(target_layers=[1, 9]))
    assert "broken" not in model.peft_config
    assert not any("broken" in n for n, _ in model.named_parameters())

    model.delete_adapter("second")
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), first)
    with pytest.raises(ValueError, match="Unknown adapter 'second'"):
        tuner.hpr_layers("second")
    assert not any("second" in n for n, _ in model.named_parameters())


def test_print_trainable_parameters(capsys):
    model = random_hpr_model("llama", target_layers=[0, 1, 3])
    d, hidden = 32, 16
    per_layer = d + (d * hidden + hidden) + (hidden + 1) + 1  # probe, angle net, gain
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 3 * per_layer
    model.print_trainable_parameters()
    assert f"trainable params: {3 * per_layer:,}" in capsys.readouterr().out
    assert all(("hpr_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_low_cpu_mem_usage_loading(tmp_path):
    model = random_hpr_model("mistral", target_layers=[1, 2])
    ids = token_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("mistral"), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert torch.equal(_logits(loaded, ids), expected)


def test_cpu_device_map(tmp_path):
    base_dir = tmp_path / "base"
    make_tiny_causal_lm("llama").save_pretrained(base_dir)
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(_logits(loaded, ids), expected)


def _grads_after_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_training_step_gives_grads_to_every_trainable_parameter(checkpointing):
    ids = token_ids(batch=2, seq=16, seed=7)
    reference = _grads_after_step(random_hpr_model("llama", target_layers=[1, 2], seed=3), ids)
    model = random_hpr_model("llama", target_layers=[1, 2], seed=3)
    if checkpointing is not None:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()
    grads = _grads_after_step(model, ids)
    assert set(grads) == set(reference)
    assert len(grads) == 2 * 6  # probe + 2 Linear (weight, bias) + gain per layer
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6)
    base_params = [p for n, p in model.named_parameters() if "hpr_" not in n]
    assert base_params and all(p.grad is None for p in base_params)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.base_model.hpr_layers()[1].hpr_probe["default"].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.base_model.hpr_layers()[1].hpr_probe["default"].weight, before)
