"""Activation collection: exact positions, shared-prefix KV reuse, early exit, dedupe, storage, errors."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from hpr_peft.data import ContrastivePair
from hpr_peft.fitting import PairActivations, collect_activations
from support.models import make_char_tokenizer, make_tiny_causal_lm

PRIMER = "Shared primer: the same few-shot text for every question. " * 2


def make_pairs(n: int = 6, primer: str = PRIMER) -> list[ContrastivePair]:
    # answers reused across pairs of a group (as in TruthfulQA), completions of different lengths
    return [
        ContrastivePair(primer + f"Q: q{i // 2}?\nA:", f" yes{i // 2}", f" n{'o' * (i + 1)}", f"g{i // 2}")
        for i in range(n)
    ]


def plain_states(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    """Hidden states after block ``layer`` of one unpadded, uncached forward (reference)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_response_rows_match_plain_forward_with_shared_prefix(arch):
    model = make_tiny_causal_lm(arch)
    tok = make_char_tokenizer()
    pairs = make_pairs()
    acts = collect_activations(
        model, tok, pairs, layers=[1, 2], token_selection="response", batch_size=4, progress=False
    )
    assert acts.metadata["shared_prefix_tokens"] > 50  # the primer KV was reused
    assert acts.metadata["n_sequences"] == 9  # 3 shared positives + 6 negatives: deduplicated
    for i, pair in enumerate(pairs):
        m = min(len(pair.positive), len(pair.negative))  # char tokenizer: one token per char
        rows = (acts.row_pair == i).nonzero().flatten()
        assert rows.numel() == m
        for layer in (1, 2):
            pos, neg = acts.pair_tensors(layer)
            ref_pos = plain_states(model, tok, pair.prompt + pair.positive, layer)
            ref_neg = plain_states(model, tok, pair.prompt + pair.negative, layer)
            start_p = ref_pos.shape[0] - len(pair.positive)
            start_n = ref_neg.shape[0] - len(pair.negative)
            torch.testing.assert_close(pos[rows], ref_pos[start_p : start_p + m], atol=1e-5, rtol=0)
            torch.testing.assert_close(neg[rows], ref_neg[start_n : start_n + m], atol=1e-5, rtol=0)


def test_last_token_and_options_agree():
    model = make_tiny_causal_lm("llama")
    tok = make_char_tokenizer()
    pairs = make_pairs()
    fast = collect_activations(model, tok, pairs, layers=[0, 2], batch_size=3, progress=False)
    slow = collect_activations(
        model, tok, pairs, layers=[0, 2], batch_size=1, progress=False, shared_prefix=False, early_exit=False
    )
    assert fast.n_rows == slow.n_rows == len(pairs)
    for layer in (0, 2):
        for a, b in zip(fast.pair_tensors(layer), slow.pair_tensors(layer), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        ref = plain_states(model, tok, pairs[3].prompt + pairs[3].negative, layer)[-1]
        torch.testing.assert_close(fast.pair_tensors(layer)[1][3], ref, atol=1e-5, rtol=0)
    # pairs 2 and 3 share their positive completion: identical rows
    assert torch.equal(fast.pair_tensors(2)[0][2], fast.pair_tensors(2)[0][3])
    assert fast.group_ids == [p.group_id for p in pairs]


def test_hooks_only_targeted_blocks_and_early_exit():
    model = make_tiny_causal_lm("llama")
    tok = make_char_tokenizer()
    calls = {i: 0 for i in range(4)}
    handles = [
        model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i in range(4)
    ]
    head_calls = []
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: head_calls.append(1)))
    collect_activations(model, tok, make_pairs(), layers=[1], batch_size=4, progress=False)
    for h in handles:
        h.remove()
    assert calls[0] > 0 and calls[1] > 0
    assert calls[2] == 0 and calls[3] == 0 and not head_calls
    # no hooks left behind
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_peft_adapter_is_disabled_while_collecting():
    from peft import get_peft_model

    from hpr_peft import HPRConfig

    tok = make_char_tokenizer()
    pairs = make_pairs(4)
    base = collect_activations(make_tiny_causal_lm("llama"), tok, pairs, layers=[1, 3], progress=False)
    peft_model = get_peft_model(
        make_tiny_causal_lm("llama"), HPRConfig(target_layers=[0, 1, 3], init_weights=False)
    )
    got = collect_activations(peft_model, tok, pairs, layers=[1, 3], progress=False)
    with torch.no_grad():  # sanity: the random adapter really edits when enabled
        ids = tok(pairs[0].prompt + pairs[0].negative, return_tensors="pt")["input_ids"]
        edited = peft_model(ids, output_hidden_states=True).hidden_states[4][0, -1]
    assert not torch.allclose(edited, base.pair_tensors(3)[1][0])
    for layer in (1, 3):
        for a, b in zip(got.pair_tensors(layer), base.pair_tensors(layer), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_dtype(dtype):
    model = make_tiny_causal_lm("llama")
    tok = make_char_tokenizer()
    acts = collect_activations(model, tok, make_pairs(4), layers=[1], storage_dtype=dtype, progress=False)
    ref = collect_activations(model, tok, make_pairs(4), layers=[1], progress=False)
    assert acts.pair_tensors(1)[0].dtype == dtype
    torch.testing.assert_close(acts.pair_tensors(1)[0].float(), ref.pair_tensors(1)[0], atol=0.05, rtol=0.02)


def test_stream_to_disk_and_save_load(tmp_path):
    model = make_tiny_causal_lm("llama")
    tok = make_char_tokenizer()
    pairs = make_pairs(8)
    mem = collect_activations(
        model, tok, pairs, layers=[0, 2], token_selection="response", batch_size=2, progress=False
    )
    disk = collect_activations(
        model,
        tok,
        pairs,
        layers=[0, 2],
        token_selection="response",
        batch_size=2,
        progress=False,
        output_dir=tmp_path / "stream",
        shard_rows=10,
    )
    assert disk.features is None and len(disk.shards) > 1
    assert len(list((tmp_path / "stream").glob("shard-*.safetensors"))) == len(disk.shards)
    loaded = PairActivations.load(tmp_path / "stream")
    mem.save(tmp_path / "saved")
    reloaded = PairActivations.load(tmp_path / "saved", in_memory=True)
    for layer in (0, 2):
        for acts in (disk, loaded, reloaded):
            for a, b in zip(acts.pair_tensors(layer), mem.pair_tensors(layer), strict=True):
                assert torch.equal(a, b)
    assert reloaded.group_ids == mem.group_ids and reloaded.token_selection == "response"
    sub = loaded.select_groups(["g1", "g3"])
    assert set(sub.group_ids) == {"g1", "g3"} and sub.n_pairs == 8
    assert torch.equal(sub.pair_tensors(2)[0], mem.pair_tensors(2)[0][mem.row_pair // 2 % 2 == 1])
    with pytest.raises(FileNotFoundError, match=r"activations\.json"):
        PairActivations.load(tmp_path / "nothing")


def test_device_map_models(tmp_path):
    """device_map="auto" and an accelerate-dispatched model (blocks 2-3 offloaded to disk) both work."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert hasattr(offloaded.model.layers[2], "_hf_hook")  # accelerate's dispatch hooks are active
    tok = make_char_tokenizer()
    ref = collect_activations(model, tok, make_pairs(4), layers=[1, 2], progress=False)
    for other in (auto, offloaded):
        got = collect_activations(other, tok, make_pairs(4), layers=[1, 2], progress=False)
        for layer in (1, 2):
            torch.testing.assert_close(
                got.pair_tensors(layer)[0], ref.pair_tensors(layer)[0], atol=1e-6, rtol=0
            )


FakePair = namedtuple("FakePair", "prompt positive negative group_id")


def test_bad_inputs():
    model = make_tiny_causal_lm("llama")  # context 256 tokens
    tok = make_char_tokenizer()
    with pytest.raises(ValueError, match="pairs is empty"):
        collect_activations(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="identical positive and negative"):
        collect_activations(model, tok, [FakePair("Q", " a", " a", "g")], progress=False)
    with pytest.raises(ValueError, match=r"pairs\[1\] is \d+ tokens long .* context is 256"):
        collect_activations(
            model, tok, [FakePair("Q", " a", " b", "g"), FakePair("x" * 300, " a", " b", "h")]
        )
    with pytest.raises(ValueError, match="out of range"):
        collect_activations(model, tok, make_pairs(2), layers=[7], progress=False)
    with pytest.raises(ValueError, match="token_selection"):
        collect_activations(model, tok, make_pairs(2), token_selection="first", progress=False)
    with pytest.raises(TypeError, match="storage_dtype"):
        collect_activations(model, tok, make_pairs(2), storage_dtype=torch.int8, progress=False)
    with pytest.raises(TypeError, match="ContrastivePair"):
        collect_activations(model, tok, [("p", "a", "b")], progress=False)
