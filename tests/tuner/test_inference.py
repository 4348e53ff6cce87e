"""Inference equivalences with random editors that really edit: KV cache, left padding, low precision."""

from __future__ import annotations

import pytest
import torch

from support.hpr import edited_fraction, random_hpr_model, token_ids


def _greedy_uncached(model, ids, steps):
    sequence, step_logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(sequence, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    return sequence, step_logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "opt"])
def test_generate_with_kv_cache_equals_uncached_greedy_decoding(arch):
    model = random_hpr_model(arch, target_layers=[1, 2, 3], threshold=0.7)
    ids = token_ids(batch=2, seq=6, seed=11)
    assert edited_fraction(model, ids, layer=1) > 0.3
    steps = 8
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    sequence, step_logits = _greedy_uncached(model, ids, steps)
    assert torch.equal(out.sequences, sequence)
    for cached, uncached in zip(out.logits, step_logits, strict=True):
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    # the generated tokens are edited too (so the cache really carries edited states)
    assert edited_fraction(model, sequence, layer=1) > 0.3
    with torch.no_grad(), model.disable_adapter():
        base_steps = _greedy_uncached(model, ids, steps)[1]
    assert not torch.allclose(step_logits[0], base_steps[0], atol=1e-3)


def _left_pad(rows, pad_id=0):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_low_precision_models_edit_without_nan_and_keep_norms(dtype, autocast_adapter_dtype):
    from peft import get_peft_model

    from hpr_peft import HPRConfig
    from support.models import make_tiny_causal_lm

    base = make_tiny_causal_lm("llama").to(dtype)
    torch.manual_seed(0)
    model = get_peft_model(
        base,
        HPRConfig(target_layers=[1, 2], init_weights=False),
        autocast_adapter_dtype=autocast_adapter_dtype,
    ).eval()
    ids = token_ids(batch=2, seq=16, seed=5)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        with model.disable_adapter():
            plain = model(ids, output_hidden_states=True)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    edited, unedited = out.hidden_states[2], plain.hidden_states[2]
    assert edited.dtype == dtype
    changed = (edited != unedited).any(-1)
    assert changed.float().mean() > 0.2
    ratio = edited[changed].float().norm(dim=-1) / unedited[changed].float().norm(dim=-1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-2, atol=0)


def test_edit_positions_last_edits_only_the_last_position_of_each_call():
    """The paper's generation mode; documented as not cache-equivalent (a cached step edits its one new
    token, a full forward over the same tokens only the final one)."""
    model = random_hpr_model("llama", target_layers=[1], threshold=0.99, edit_positions="last")
    ids = token_ids(batch=3, seq=10, seed=8)
    with torch.no_grad():
        edited = model(ids, output_hidden_states=True).hidden_states[2]
        with model.disable_adapter():
            plain = model(ids, output_hidden_states=True).hidden_states[2]
    changed = (edited != plain).any(-1)
    assert changed[:, -1].all()
    assert not changed[:, :-1].any()
