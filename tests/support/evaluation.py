"""Helpers for the evaluation tests: a tiny character tokenizer and tiny MC questions."""

from __future__ import annotations

from hpr_peft.data import MCQuestion


class CharTokenizer:
    """A byte-level tokenizer for tiny models (vocab 128): one token per character, BOS optional."""

    def __init__(self, bos: int | None = None, vocab: int = 128) -> None:
        self.bos = bos
        self.vocab = vocab
        self.pad_token_id = 0
        self.eos_token_id = 1

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = [3 + (ord(c) % (self.vocab - 3)) for c in text]
        return {"input_ids": ([self.bos] if self.bos is not None else []) + ids}


def tiny_questions(n: int = 3) -> list[MCQuestion]:
    out = []
    for i in range(n):
        mc1 = (f"Yes {i}.", "No.", f"Maybe so {i}", "x")
        mc2 = (f"Yes {i}.", f"Sure {i}", "No.", f"Maybe so {i}", "x", "A much longer false answer here.")
        out.append(
            MCQuestion(
                question_id=f"q{i}",
                question=f"Is {i} a number?",
                mc1_choices=mc1,
                mc1_labels=(1, 0, 0, 0),
                mc2_choices=mc2,
                mc2_labels=(1, 1, 0, 0, 0, 0),
            )
        )
    return out
