"""Tiny random causal LMs of several architectures and a character tokenizer for them (offline, < 1 s)."""

from __future__ import annotations

import torch


def make_tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM of the given architecture (offline, < 1 s)."""
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    builders = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **common),
        "gemma3": lambda: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **common),
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **common),
        "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=256),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),
        "opt": lambda: tf.OPTConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
        ),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny arch {arch!r}")
    config = builders[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


TINY_ARCHS = ["llama", "mistral", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]


def make_char_tokenizer():
    """A fast character-level tokenizer (ASCII + newline, < 128 ids) for the tiny models; offsets work."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    return tokenizer
