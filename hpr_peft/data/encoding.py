"""Tokenising a context and its continuation the way lm-eval-harness does, defined once.

The TruthfulQA scorer (evaluation) and the preference objective (fitting) both score an answer as
the continuation of its context; they must cut the tokens at the same place.
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_pair"]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) the way lm-eval's ``_encode_pair`` builds them.

    Trailing whitespace of the context moves to the continuation; the continuation tokens are the
    tokens of ``context + continuation`` after as many tokens as the context alone has.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"The continuation {continuation!r} tokenises to nothing after its context.")
    return context_ids, continuation_ids
