"""Neutral-text perplexity and KL(edited ‖ unedited): zero for the unedited model, > 0 for a real edit."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.evaluation.side_effects import NeutralText, load_neutral_paragraphs, unedited_context
from support.evaluation import CharTokenizer
from support.models import make_tiny_causal_lm


def test_bundled_corpus_size_and_paragraphs():
    paragraphs = load_neutral_paragraphs()
    assert len(paragraphs) >= 15
    words = sum(len(p.split()) for p in paragraphs)
    assert 1500 <= words <= 2500  # ~2-3k tokens with a BPE tokenizer
    with pytest.raises(ValueError, match="paragraph"):
        load_neutral_paragraphs("\n\n  \n\n")


def test_kl_zero_unedited_positive_edited_and_ppl_matches_manual():
    base = make_tiny_causal_lm("llama")
    tok = CharTokenizer(bos=2)
    paragraphs = ["The cat sat on the mat.", "Rivers run to the sea, slowly and surely.", "Bread."]
    neutral = NeutralText(tok, paragraphs, batch_size=2)
    ref_ppl = neutral.compute_reference(base)
    # manual perplexity, one paragraph at a time (no padding)
    nll, n = 0.0, 0
    with torch.no_grad():
        for p in paragraphs:
            ids = torch.tensor([tok(p)["input_ids"]])
            logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    assert ref_ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert neutral.n_tokens == n

    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[1, 2], init_weights=False))
    model.eval()
    off = neutral.measure(model, unedited_context(model))
    assert off.kl == pytest.approx(0.0, abs=1e-6)
    assert off.perplexity == pytest.approx(ref_ppl, rel=1e-5)
    on = neutral.measure(model)
    assert on.kl > 1e-4
    assert on.perplexity != pytest.approx(ref_ppl, rel=1e-6)


def test_run_forwards_every_real_token_for_a_monitor():
    """``run`` feeds the corpus to hooks (here HPR's monitor) without a reference or any scoring."""
    from hpr_peft import monitor

    tok = CharTokenizer(bos=2)
    paragraphs = ["The cat sat on the mat.", "Rivers run to the sea.", "Bread."]
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1], init_weights=False))
    model.train()
    neutral = NeutralText(tok, paragraphs, batch_size=2)
    with monitor(model) as records:
        neutral.run(model)
    # every real token but each paragraph's first (the sequence start is never edited); no padding
    assert records[1].n_tokens == sum(len(tok(p)["input_ids"]) - 1 for p in paragraphs)
    assert model.training  # the mode it had is restored
    assert neutral.paragraphs == paragraphs


def test_measure_needs_reference():
    neutral = NeutralText(CharTokenizer(), ["Some text here."])
    with pytest.raises(ValueError, match="compute_reference"):
        neutral.measure(make_tiny_causal_lm("llama"))
    with pytest.raises(TypeError, match="list of str"):
        NeutralText(CharTokenizer(), "one string")
