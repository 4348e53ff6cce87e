"""The tuner on an accelerator (skipped without CUDA): placement of adapter weights, the no-sync
``torch.where`` edit path, and the inference equivalences there."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hpr_peft import HPRConfig, monitor
from support.hpr import edited_fraction, random_hpr_model, token_ids
from support.models import make_tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def test_adapter_weights_are_placed_on_the_device_of_the_blocks():
    base = make_tiny_causal_lm("llama").to(CUDA)
    ids = token_ids().to(CUDA)
    reference = _logits(base, ids)
    model = get_peft_model(base, HPRConfig(target_layers=[1, 2]))
    for name, param in model.named_parameters():
        assert param.device.type == "cuda", name
    assert torch.equal(_logits(model, ids), reference)  # identity init is exact on the accelerator too


def test_accelerator_path_matches_cpu_path():
    cpu_model = random_hpr_model("llama", target_layers=[1, 2, 3])
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    ids = token_ids(batch=3, seq=12, seed=2)
    cpu_logits = _logits(cpu_model, ids)
    gpu_logits = _logits(gpu_model, ids.to(CUDA)).cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-4, rtol=1e-4)
    assert edited_fraction(gpu_model, ids.to(CUDA), layer=1) > 0.2
    with gpu_model.disable_adapter():
        base = _logits(gpu_model, ids.to(CUDA))
    with torch.no_grad():
        plain = copy.deepcopy(gpu_model).unload()(ids.to(CUDA)).logits
    assert torch.equal(base, plain)


def test_generate_and_left_padding_on_accelerator():
    model = random_hpr_model("llama", target_layers=[1, 2, 3], threshold=0.7).to(CUDA)
    ids = token_ids(batch=2, seq=6, seed=11).to(CUDA)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        sequence = ids
        for step_logits in out.logits:
            logits = model(sequence, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, logits, atol=1e-4, rtol=1e-4)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(out.sequences, sequence)

    rows = [torch.randint(3, 128, (n,), device=CUDA) for n in (9, 4, 6)]
    length = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), length, dtype=torch.long, device=CUDA)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, length - len(row) :], mask[i, length - len(row) :] = row, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = _logits(model, batch, attention_mask=mask, position_ids=position_ids)
    for i, row in enumerate(rows):
        torch.testing.assert_close(
            batched[i, -len(row) :], _logits(model, row[None])[0], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_accelerator(dtype):
    base = make_tiny_causal_lm("qwen2").to(CUDA, dtype)
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[1, 2], init_weights=False)).eval()
    ids = token_ids(batch=2, seq=16, seed=5).to(CUDA)
    with torch.no_grad():
        edited = model(ids, output_hidden_states=True)
        with model.disable_adapter():
            plain = model(ids, output_hidden_states=True).hidden_states[2]
    assert torch.isfinite(edited.logits).all()
    changed = (edited.hidden_states[2] != plain).any(-1)
    assert changed.float().mean() > 0.2
    ratio = edited.hidden_states[2][changed].float().norm(dim=-1) / plain[changed].float().norm(dim=-1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-2, atol=0)


def test_loading_onto_accelerator_and_device_map(tmp_path):
    base_dir = tmp_path / "base"
    make_tiny_causal_lm("llama").save_pretrained(base_dir)
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    for kwargs in ({"low_cpu_mem_usage": False}, {"low_cpu_mem_usage": True}):
        loaded = PeftModel.from_pretrained(
            make_tiny_causal_lm("llama").to(CUDA), tmp_path / "adapter", **kwargs
        )
        assert all(p.device.type == "cuda" for p in loaded.parameters())
        torch.testing.assert_close(_logits(loaded, ids.to(CUDA)).cpu(), expected, atol=1e-4, rtol=1e-4)

    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map="auto")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for index, layer in loaded.base_model.hpr_layers().items():
        block_device = next(layer.base_layer.parameters()).device
        assert layer.hpr_probe["default"].weight.device == block_device, index
    torch.testing.assert_close(_logits(loaded, ids.to(CUDA)).cpu(), expected, atol=1e-4, rtol=1e-4)


def test_training_and_monitor_on_accelerator():
    model = random_hpr_model("llama", target_layers=[1, 2], seed=3).to(CUDA)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()
    ids = token_ids(batch=2, seq=16, seed=7).to(CUDA)
    model(ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 10
    for name, param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, (
            name
        )
    model.eval()
    with monitor(model) as records, torch.no_grad():
        model(ids)
    assert records[1].n_tokens == 2 * 15 and 0 < records[1].n_flagged < records[1].n_tokens
