"""Block-input replay: skipping blocks < L gives bit-identical results for edits at blocks ≥ L.

Exactness is checked with ``torch.equal`` (bit for bit): blocks ≥ L receive the very tensors the
unedited pass fed them, with the same masks, positions and KV cache of their own.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig, edit_settings
from hpr_peft.evaluation import TruthfulQAScorer
from hpr_peft.evaluation.baselines import additive_steering
from hpr_peft.evaluation.side_effects import NeutralText
from hpr_peft.runtime.blocks import find_decoder_stack
from hpr_peft.runtime.model_io import cache_inputs, forward_until, output_cache, unedited_context
from hpr_peft.runtime.replay import BlockInputs, ReplayMismatch, record_block_inputs, replay_from_block
from support.evaluation import CharTokenizer, tiny_questions
from support.hpr import token_ids
from support.models import TINY_ARCHS, make_tiny_causal_lm

PRIMER = "Q: What is one?\nA: One is a number.\n\nQ: Sky?\nA: Blue."
FIRST_EDITED = 2  # tiny models have 4 blocks: blocks 0-1 are replayed, edits at 2-3


def _hpr_model(arch: str):
    torch.manual_seed(1)
    model = get_peft_model(make_tiny_causal_lm(arch), HPRConfig(target_layers="all", init_weights=False))
    return model.eval()


def _edit(model, kind: str):
    """An edit at blocks ≥ FIRST_EDITED: HPR layers 2-3 of an all-layer adapter, or additive steering."""
    if kind == "hpr":
        return edit_settings(model, alpha=1.5, layers=[2, 3])
    g = torch.Generator().manual_seed(5)
    return additive_steering(model, {2: torch.randn(32, generator=g), 3: torch.randn(32, generator=g)}, 3.0)


@torch.no_grad()
def _cached_calls(model) -> list[torch.Tensor]:
    """Two forward calls: a primer that starts a KV cache, then a left-padded batch on top of it."""
    primer = token_ids(1, 7, seed=1)
    cache = output_cache(model(input_ids=primer, attention_mask=torch.ones_like(primer), use_cache=True))
    cache.batch_repeat_interleave(2)
    ids = token_ids(2, 5, seed=2)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7] = 0
    out = model(input_ids=ids, attention_mask=mask, **cache_inputs(model, cache))
    return [output_cache(out).get_seq_length() * torch.ones(1), out.logits]


def _model_for(arch: str, kind: str):
    return _hpr_model(arch) if kind == "hpr" else make_tiny_causal_lm(arch)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", ["hpr", "additive"])
def test_replayed_forwards_with_cache_equal_full_forwards(arch, kind):
    model = _model_for(arch, kind)
    with unedited_context(model)(), record_block_inputs(model, FIRST_EDITED) as record:
        plain = _cached_calls(model)
    assert len(record) == 2 and record.block == FIRST_EDITED
    with _edit(model, kind):
        want = _cached_calls(model)
        with replay_from_block(model, record):
            got = _cached_calls(model)
    assert not torch.equal(want[1], plain[1])  # the edit really edits
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_replayed_scorer_gives_the_same_mc_results(arch):
    model = _hpr_model(arch)
    scorer = TruthfulQAScorer(
        CharTokenizer(bos=2), tiny_questions(3), primer=PRIMER, packed=True, max_tokens=64
    )
    with record_block_inputs(model, FIRST_EDITED) as record:
        scorer.score(model, context=unedited_context(model), progress=False)
    for alpha in (0.5, 2.0):  # one record serves a sweep
        with edit_settings(model, alpha=alpha, layers=[2, 3]):
            want = scorer.score(model, progress=False, keep_answer_scores=True)
            with replay_from_block(model, record):
                got = scorer.score(model, progress=False, keep_answer_scores=True)
        assert got.mc1 == want.mc1 and got.mc2 == want.mc2
        assert got.answer_scores == want.answer_scores


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("kind", ["hpr", "additive"])
def test_replayed_neutral_text_gives_the_same_kl(arch, kind):
    model = _model_for(arch, kind)
    paragraphs = ["The cat sat on the mat.", "Rivers run to the sea, slowly and surely.", "Bread."]
    neutral = NeutralText(CharTokenizer(bos=2), paragraphs, batch_size=2)
    with record_block_inputs(model, FIRST_EDITED) as record:
        neutral.compute_reference(model, unedited_context(model))
    with _edit(model, kind):
        want = neutral.measure(model)
        with replay_from_block(model, record):
            got = neutral.measure(model)
    assert want.kl > 1e-4
    assert got.to_dict() == want.to_dict()


def _recorded(model, *inputs: torch.Tensor) -> BlockInputs:
    with torch.no_grad(), record_block_inputs(model, FIRST_EDITED) as record:
        for ids in inputs:
            model(input_ids=ids)
    return record


def _blocks(model) -> list[torch.nn.Module]:
    return list(find_decoder_stack(model).layers)


def test_mismatched_calls_raise_and_restore_the_blocks():
    model = make_tiny_causal_lm("llama")
    blocks = _blocks(model)
    record = _recorded(model, token_ids(1, 6, seed=1))
    cases = [
        (lambda: model(input_ids=token_ids(1, 7, seed=1)), "recorded call a"),  # other shape
        (lambda: model(input_ids=token_ids(1, 6, seed=9)), "other tokens"),
        (lambda: [model(input_ids=token_ids(1, 6, seed=1)) for _ in range(2)], "1 were recorded"),
        (lambda: None, "ran 0 forward calls"),  # record not used up
    ]
    for call, message in cases:
        with pytest.raises(ReplayMismatch, match=message), torch.no_grad(), replay_from_block(model, record):
            call()
        assert _blocks(model) == blocks
    with pytest.raises(ReplayMismatch, match="same order"), torch.no_grad(), replay_from_block(model, record):
        model(input_ids=token_ids(1, 7, seed=1))


def test_block_index_out_of_range():
    model = make_tiny_causal_lm("llama")
    for block in (0, 4, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"1\.\.3"), record_block_inputs(model, block):
            pass
        with pytest.raises(ValueError, match=r"1\.\.3"), replay_from_block(model, BlockInputs(block)):
            pass
    with pytest.raises(ValueError, match="empty"), replay_from_block(model, BlockInputs(2)):
        pass
    with pytest.raises(TypeError, match="BlockInputs"), replay_from_block(model, [torch.zeros(1)]):
        pass


@pytest.mark.parametrize("kind", ["hpr", "additive"])
def test_an_edit_below_the_recorded_block_is_refused(kind):
    model = _model_for("llama", kind)
    ids = token_ids(2, 8, seed=1)
    with unedited_context(model)():
        record = _recorded(model, ids)
    if kind == "hpr":
        below = edit_settings(model, layers=[1, 2])
    else:
        below = additive_steering(model, {1: torch.ones(32)}, 1.0)
    with below, pytest.raises(ReplayMismatch, match="block 1 edits"), replay_from_block(model, record):
        model(input_ids=ids)


def test_edit_contexts_go_outside_the_replay():
    """Inside the replay the stack is not found (stubs differ from blocks): edit contexts come first."""
    model = make_tiny_causal_lm("llama")
    record = _recorded(model, token_ids(1, 6, seed=1))
    steering = additive_steering(model, {3: torch.ones(32)}, 1.0)
    with pytest.raises(ValueError, match="decoder blocks"), replay_from_block(model, record), steering:
        pass


def test_an_early_stopped_recording_is_refused():
    model = make_tiny_causal_lm("llama")
    with pytest.raises(ReplayMismatch, match="stopped before block 2"), record_block_inputs(model, 2):
        forward_until(model, find_decoder_stack(model).layers[0], input_ids=token_ids(1, 4))


def test_other_threads_run_the_real_blocks_during_a_replay():
    """The replay is the entering thread's: a forward from another thread meanwhile is a full forward,
    and the replaying thread's own calls still follow the record."""
    model = make_tiny_causal_lm("llama")
    replayed_ids, other_ids = token_ids(1, 6, seed=1), token_ids(2, 9, seed=3)
    record = _recorded(model, replayed_ids)
    with torch.no_grad():
        want_other, want_replayed = model(input_ids=other_ids).logits, model(input_ids=replayed_ids).logits
    got: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        with torch.no_grad():
            got["other"] = model(input_ids=other_ids).logits

    with torch.no_grad(), replay_from_block(model, record):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        got["replayed"] = model(input_ids=replayed_ids).logits
    assert torch.equal(got["other"], want_other) and torch.equal(got["replayed"], want_replayed)
