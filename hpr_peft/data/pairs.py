"""Contrastive pairs and their JSONL file format.

A :class:`ContrastivePair` is one prompt with a desired (``positive``) and an undesired (``negative``)
completion; the model input is ``prompt + completion`` (completions carry their own leading space
where the format needs one). Pairs that come from the same source example share a ``group_id`` so that
splits (:mod:`hpr_peft.data.splits`) never put one example on both sides. The JSONL schema is
documented in ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpr_peft.data.validation import require_text
from hpr_peft.runtime.atomic_files import write_text_atomic

__all__ = ["ContrastivePair", "load_pairs_jsonl", "save_pairs_jsonl"]

_JSONL_KEYS = ("prompt", "positive", "negative")


@dataclass(frozen=True)
class ContrastivePair:
    """One prompt with a desired (``positive``) and an undesired (``negative``) completion.

    ``group_id`` names the source example (for TruthfulQA: the question id); pairs sharing it always
    land in the same split. The model sees ``prompt + positive`` and ``prompt + negative``.
    """

    prompt: str
    positive: str
    negative: str
    group_id: str

    def __post_init__(self) -> None:
        for field in ("prompt", "positive", "negative", "group_id"):
            require_text(getattr(self, field), field, "ContrastivePair")
        if self.positive == self.negative:
            raise ValueError(
                f"ContrastivePair.positive and .negative are identical ({self.positive!r}): a contrastive "
                "pair needs two different completions; drop this pair or fix one of them."
            )


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _default_group(prompt: str) -> str:
    return "prompt-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _check_texts(record: Any, where: str) -> None:
    """``record`` is an object whose prompt / positive / negative are non-empty strings."""
    if not isinstance(record, dict):
        raise ValueError(
            f'{where}: expected a JSON object {{"prompt", "positive", "negative", "group"?}}, '
            f"got a JSON {type(record).__name__}."
        )
    for key in _JSONL_KEYS:
        if key not in record:
            raise ValueError(
                f'{where}: missing key {key!r}; every line needs "prompt", "positive" and "negative" '
                f'(and optionally "group"), found keys {sorted(record)}.'
            )
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: {key!r} must be a string, got {type(value).__name__} ({value!r:.60})."
            )
        if not value.strip():
            raise ValueError(f"{where}: {key!r} is empty or only whitespace; give it some text.")


def _group_of(record: dict, where: str) -> str:
    """The record's ``"group"`` as a str; derived from the prompt when absent."""
    group = record.get("group")
    if group is None:
        return _default_group(record["prompt"])
    if isinstance(group, int) and not isinstance(group, bool):
        return str(group)
    if not isinstance(group, str) or not group.strip():
        raise ValueError(f"{where}: 'group' must be a non-empty string (or an integer), got {group!r:.60}.")
    return group


class _GroupSpellings:
    """Refuses a file that writes one group both as a number and as a string (``1`` and ``"1"``):
    groups are compared as text, so the two would silently become one group."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[Any, str]] = {}

    def check(self, record: dict, group: str, where: str) -> None:
        value = record["group"]
        first, first_where = self._first.setdefault(group, (value, where))
        if type(first) is not type(value):
            raise ValueError(
                f"{where}: group {value!r} ({_kind(value)}) and group {first!r} at {first_where} "
                f"({_kind(first)}) would silently be one group: write every group the same way (all strings "
                "or all numbers), or give different groups different names."
            )


def _kind(value: Any) -> str:
    return "a number" if isinstance(value, int) else "a string"


def _pair_from_record(record: Any, where: str) -> ContrastivePair:
    _check_texts(record, where)
    group = _group_of(record, where)
    if record["positive"] == record["negative"]:
        raise ValueError(
            f"{where}: 'positive' and 'negative' are identical ({record['positive']!r:.80}); a contrastive "
            "pair needs two different completions: fix or remove this line."
        )
    return ContrastivePair(record["prompt"], record["positive"], record["negative"], group)


def _parse_line(raw: bytes, where: str) -> Any:
    """The JSON value of one raw line, or None for a blank line (a UTF-8 byte-order mark, which some
    editors put at the start of a file, is skipped)."""
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not valid UTF-8 ({exc.reason}); save the file as UTF-8.") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be one "
            "complete JSON object."
        ) from None


def load_pairs_jsonl(path: str | os.PathLike) -> list[ContrastivePair]:
    """Read contrastive pairs from a JSONL file (schema in ``docs/data.md``).

    One JSON object per line: ``{"prompt": str, "positive": str, "negative": str, "group": str?}``;
    blank lines are skipped, other keys are ignored, a UTF-8 byte-order mark is accepted. Without
    ``"group"`` the group is derived from the prompt (pairs with the same prompt share a group); an
    integer group is the group of its decimal text, and a file that writes one group both ways
    (``1`` and ``"1"``) is refused. Every error names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pairs file {path} does not exist (or is not a file): check the path.")
    pairs: list[ContrastivePair] = []
    spellings = _GroupSpellings()
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}: line {lineno}"
            record = _parse_line(raw, where)
            if record is not None:
                pairs.append(_pair_from_record(record, where))
                if record.get("group") is not None:
                    spellings.check(record, pairs[-1].group_id, where)
    if not pairs:
        raise ValueError(f"Pairs file {path} is empty: it needs at least one JSON line with a pair.")
    return pairs


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def save_pairs_jsonl(pairs: Iterable[ContrastivePair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL (``{"prompt", "positive", "negative", "group"}`` per line), atomically."""
    lines = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, ContrastivePair):
            raise TypeError(
                f"save_pairs_jsonl: item {index} is a {type(pair).__name__}, not a ContrastivePair."
            )
        record = {
            "prompt": pair.prompt,
            "positive": pair.positive,
            "negative": pair.negative,
            "group": pair.group_id,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise ValueError("save_pairs_jsonl: no pairs to write (an empty pairs file could not be read back).")
    path = Path(path)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
