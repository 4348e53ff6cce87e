"""Seeded, deterministic splits by group (question): no group is ever on both sides.

Orders come from sha256 of ``(seed, group id)``, never from ``hash()`` or a global RNG, so a split is
identical in every process, Python version and platform, and does not depend on the order in which
group ids are given. Splits are saved as JSON (written atomically) beside the results they produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hpr_peft.runtime.atomic_files import write_text_atomic

__all__ = [
    "Fold",
    "GroupSplit",
    "filter_by_group",
    "filter_pairs",
    "filter_questions",
    "kfold_groups",
    "load_folds",
    "load_split",
    "save_split",
    "split_groups",
]

_FORMAT = "hpr_peft.split"
_VERSION = 1
T = TypeVar("T")


@dataclass(frozen=True)
class GroupSplit:
    """Train / validation / test group ids (disjoint), with the seed and fractions that made them."""

    train: list[str]
    validation: list[str]
    test: list[str]
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        _check_disjoint({"train": self.train, "validation": self.validation, "test": self.test})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": "group_split",
            "seed": self.seed,
            "fractions": list(self.fractions) if self.fractions is not None else None,
            "train": list(self.train),
            "validation": list(self.validation),
            "test": list(self.test),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (temp file + ``os.replace``)."""
        return save_split(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GroupSplit:
        return load_split(path)


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: ``test`` groups and the ``train`` groups (all the others)."""

    train: list[str]
    test: list[str]
    index: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        _check_disjoint({"train": self.train, "test": self.test})


def _check_disjoint(parts: dict[str, Sequence[str]]) -> None:
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError(f"split part {name!r} must be a list of group ids, got {type(ids).__name__}.")
        for gid in ids:
            if not isinstance(gid, str):
                raise TypeError(f"split part {name!r} holds a {type(gid).__name__}; group ids are str.")
            if gid in seen:
                where = "twice in" if seen[gid] == name else f"in both {seen[gid]!r} and"
                raise ValueError(f"group id {gid!r} is {where} {name!r}: splits must be disjoint by group.")
            seen[gid] = name


def _unique_groups(group_ids: Iterable[str], caller: str) -> list[str]:
    """Distinct ids, sorted (so the result never depends on input order)."""
    if isinstance(group_ids, str):
        raise TypeError(f"{caller}: group_ids must be a collection of ids, not a single str.")
    ids = set()
    for gid in group_ids:
        if not isinstance(gid, str):
            raise TypeError(f"{caller}: group ids must be str, got {type(gid).__name__} ({gid!r:.40}).")
        ids.add(gid)
    if not ids:
        raise ValueError(f"{caller}: group_ids is empty; there is nothing to split.")
    return sorted(ids)


def _check_seed(seed: Any, caller: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{caller}: seed must be an int, got {type(seed).__name__}.")
    return seed


def _shuffled(ids: list[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda gid: hashlib.sha256(f"{seed}\x00{gid}".encode()).digest())


def _part_sizes(n: int, fracs: list[float]) -> list[int]:
    """Largest-remainder sizes; every part with a non-zero fraction gets at least one group."""
    exact = [f * n for f in fracs]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(fracs)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    names = ("train", "validation", "test")
    nonzero = [i for i, f in enumerate(fracs) if f > 0]
    if n < len(nonzero):
        empty = names[nonzero[-1]]
        raise ValueError(
            f"split_groups: {n} group(s) are too few for fractions {tuple(fracs)}: the {empty} part would "
            f"be empty. Use more groups or set the {empty} fraction to 0."
        )
    for i in nonzero:
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts


def split_groups(
    group_ids: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> GroupSplit:
    """Split distinct group ids into train / validation / test by ``fractions`` (summing to 1).

    Duplicates in ``group_ids`` are fine (pass ``[p.group_id for p in pairs]``). Part sizes are
    ``fraction * n`` rounded by largest remainder; every part with a non-zero fraction gets at least one
    group (fewer groups than such parts is an error).
    """
    seed = _check_seed(seed, "split_groups")
    if isinstance(fractions, str) or not isinstance(fractions, Sequence) or len(fractions) != 3:
        raise ValueError(f"split_groups: fractions must be (train, validation, test), got {fractions!r}.")
    fracs = []
    for name, value in zip(("train", "validation", "test"), fractions, strict=True):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"split_groups: the {name} fraction must be a finite number >= 0, got {value!r}."
            )
        fracs.append(float(value))
    if not math.isclose(sum(fracs), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_groups: fractions {tuple(fracs)} sum to {sum(fracs):g}; they must sum to 1.")
    ids = _shuffled(_unique_groups(group_ids, "split_groups"), seed)
    counts = _part_sizes(len(ids), fracs)
    cut1, cut2 = counts[0], counts[0] + counts[1]
    parts = {"train": ids[:cut1], "validation": ids[cut1:cut2], "test": ids[cut2:]}
    return GroupSplit(parts["train"], parts["validation"], parts["test"], seed=seed, fractions=tuple(fracs))


def kfold_groups(group_ids: Iterable[str], k: int, seed: int = 0) -> list[Fold]:
    """``k`` folds over distinct group ids: every group is in exactly one test fold (sizes differ by <= 1)."""
    seed = _check_seed(seed, "kfold_groups")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"kfold_groups: k must be an int >= 2, got {k!r}.")
    ids = _shuffled(_unique_groups(group_ids, "kfold_groups"), seed)
    if k > len(ids):
        raise ValueError(f"kfold_groups: k={k} folds need at least {k} groups, got {len(ids)}; lower k.")
    base, extra = divmod(len(ids), k)
    folds, start = [], 0
    for index in range(k):
        stop = start + base + (index < extra)
        folds.append(Fold(train=ids[:start] + ids[stop:], test=ids[start:stop], index=index))
        start = stop
    return folds


# ----------------------------------------------------------------------------------------------------
# Filtering
# ----------------------------------------------------------------------------------------------------


def filter_by_group(items: Iterable[T], group_ids: Iterable[str], attribute: str = "group_id") -> list[T]:
    """Items whose ``getattr(item, attribute)`` is in ``group_ids`` (input order kept)."""
    if isinstance(group_ids, str):
        raise TypeError("group_ids must be a collection of ids, not a single str: wrap it in a list.")
    wanted = set(group_ids)
    out = []
    for item in items:
        if not hasattr(item, attribute):
            raise TypeError(f"{type(item).__name__} has no attribute {attribute!r} to filter on.")
        if getattr(item, attribute) in wanted:
            out.append(item)
    return out


def filter_pairs(pairs: Iterable[T], group_ids: Iterable[str]) -> list[T]:
    """ContrastivePairs whose ``group_id`` is in ``group_ids``."""
    return filter_by_group(pairs, group_ids, "group_id")


def filter_questions(questions: Iterable[T], question_ids: Iterable[str]) -> list[T]:
    """MCQuestions whose ``question_id`` is in ``question_ids``."""
    return filter_by_group(questions, question_ids, "question_id")


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def _atomic_write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def save_split(split: GroupSplit | Sequence[Fold], path: str | os.PathLike) -> Path:
    """Write a :class:`GroupSplit` or a list of :class:`Fold` as JSON, atomically; returns the path."""
    path = Path(path)
    if isinstance(split, GroupSplit):
        payload = split.to_dict()
    elif isinstance(split, Sequence) and split and all(isinstance(f, Fold) for f in split):
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": "folds",
            "folds": [{"train": list(f.train), "test": list(f.test)} for f in split],
        }
    else:
        raise TypeError(
            f"save_split expects a GroupSplit or a non-empty list of Fold, got {type(split).__name__}."
        )
    _atomic_write_json(path, payload)
    return path


def _read(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split file {path} does not exist: check the path.")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f'{path} is not an hpr_peft split file (no "format": {_FORMAT!r}).')
    if payload.get("version") != _VERSION:
        raise ValueError(
            f"{path}: split file version {payload.get('version')!r} is not supported ({_VERSION})."
        )
    if payload.get("kind") != kind:
        other = "load_folds" if payload.get("kind") == "folds" else "load_split"
        raise ValueError(f"{path} holds {payload.get('kind')!r}, not {kind!r}: read it with {other}().")
    return payload


def load_split(path: str | os.PathLike) -> GroupSplit:
    """Read a :class:`GroupSplit` written by :func:`save_split`."""
    payload = _read(path, "group_split")
    try:
        fractions = payload.get("fractions")
        return GroupSplit(
            list(payload["train"]),
            list(payload["validation"]),
            list(payload["test"]),
            seed=payload.get("seed"),
            fractions=tuple(fractions) if fractions is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid split ({exc}).") from None


def load_folds(path: str | os.PathLike) -> list[Fold]:
    """Read folds written by :func:`save_split`."""
    payload = _read(path, "folds")
    try:
        folds = [Fold(list(f["train"]), list(f["test"]), index=i) for i, f in enumerate(payload["folds"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid folds ({exc}).") from None
    tests = [gid for f in folds for gid in f.test]
    if len(set(tests)) != len(tests):
        raise ValueError(f"{path}: a group is in more than one test fold.")
    return folds
