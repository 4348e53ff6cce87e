"""hpr_peft.data.splits: group splits and folds (no leakage, deterministic across processes), saving."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hpr_peft.data.splits as splits_module
from hpr_peft.data.splits import (
    Fold,
    GroupSplit,
    filter_by_group,
    filter_pairs,
    filter_questions,
    kfold_groups,
    load_folds,
    load_split,
    save_split,
    split_groups,
)

IDS = [f"tqa-{i:04d}" for i in range(817)]


@pytest.fixture(scope="module")
def tqa(mc_questions, qa_pairs):
    return mc_questions, qa_pairs


# ----------------------------------------------------------------------------------------- split_groups


def test_split_groups_sizes_cover_and_pinned_order():
    split = split_groups(IDS)
    assert (len(split.train), len(split.validation), len(split.test)) == (653, 82, 82)
    assert sorted(split.train + split.validation + split.test) == IDS
    assert split.seed == 0 and split.fractions == (0.8, 0.1, 0.1)
    # pinned: saved splits from earlier runs must stay reproducible by future versions
    assert split.test[:3] == ["tqa-0344", "tqa-0732", "tqa-0524"]


def test_split_groups_deterministic_and_order_independent():
    a = split_groups(IDS, seed=3)
    assert split_groups(IDS, seed=3) == a
    assert split_groups(list(reversed(IDS)) + IDS[:100], seed=3) == a  # order and duplicates do not matter
    assert split_groups(IDS, seed=4).test != a.test
    assert split_groups(IDS, fractions=(0.5, 0.25, 0.25), seed=3) != a


def test_split_groups_zero_fraction_and_small_inputs():
    split = split_groups(IDS[:10], fractions=(0.9, 0.0, 0.1))
    assert (len(split.train), len(split.validation), len(split.test)) == (9, 0, 1)
    small = split_groups(IDS[:3], fractions=(0.8, 0.1, 0.1))  # each non-zero part gets a group
    assert (len(small.train), len(small.validation), len(small.test)) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"2 group\(s\) are too few.*test part would be empty"):
        split_groups(IDS[:2], fractions=(0.8, 0.1, 0.1))


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.2), r"must be \(train, validation, test\)"),
        ((0.8, 0.1, 0.2), r"sum to 1\.1; they must sum to 1"),
        ((1.1, -0.1, 0.0), r"validation fraction must be a finite number >= 0"),
        ((math.nan, 0.5, 0.5), r"train fraction must be a finite number"),
        ("abc", r"must be \(train, validation, test\)"),
    ],
)
def test_split_groups_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        split_groups(IDS, fractions=fractions)


def test_split_groups_rejects_bad_ids_and_seed():
    with pytest.raises(ValueError, match="group_ids is empty"):
        split_groups([])
    with pytest.raises(TypeError, match="not a single str"):
        split_groups("tqa-0000")
    with pytest.raises(TypeError, match="group ids must be str, got int"):
        split_groups([1, 2, 3])
    with pytest.raises(TypeError, match="seed must be an int"):
        split_groups(IDS, seed="0")


def test_group_split_rejects_overlap():
    with pytest.raises(ValueError, match="'b' is in both 'train' and 'test'"):
        GroupSplit(["a", "b"], ["c"], ["b"])
    with pytest.raises(ValueError, match="'a' is twice in 'train'"):
        GroupSplit(["a", "a"], [], [])


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=60),
    weights=st.tuples(*[st.integers(0, 10)] * 3).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**31),
)
def test_split_groups_never_leaks(ids, weights, seed):
    fractions = tuple(w / sum(weights) for w in weights)
    groups = set(ids)
    try:
        split = split_groups(ids, fractions=fractions, seed=seed)
    except ValueError as exc:
        assert "too few" in str(exc) and len(groups) < sum(f > 0 for f in fractions)
        return
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert sum(map(len, parts)) == len(groups) and set().union(*parts) == groups
    n_nonzero = sum(f > 0 for f in fractions)
    assert len(groups) >= n_nonzero
    for part, fraction in zip(parts, fractions, strict=True):
        assert (fraction == 0) == (not part)  # empty exactly when its fraction is zero
        if all(f * len(groups) >= 1 for f in fractions if f > 0):  # no minimum-one adjustment needed
            assert abs(len(part) - fraction * len(groups)) < 1.0
    assert split_groups(list(reversed(ids)), fractions=fractions, seed=seed) == split


# ----------------------------------------------------------------------------------------- kfold_groups


def test_kfold_groups_partition():
    folds = kfold_groups(IDS, 5, seed=0)
    assert [len(f.test) for f in folds] == [164, 164, 163, 163, 163]
    assert sorted(g for f in folds for g in f.test) == IDS
    for fold in folds:
        assert sorted(fold.train + fold.test) == IDS and not set(fold.train) & set(fold.test)
    assert [f.index for f in folds] == [0, 1, 2, 3, 4]
    assert folds[0].test[:3] == ["tqa-0709", "tqa-0486", "tqa-0511"]  # pinned
    assert kfold_groups(list(reversed(IDS)), 5, seed=0) == folds
    assert kfold_groups(IDS, 5, seed=1) != folds


def test_kfold_groups_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        kfold_groups(IDS, 1)
    with pytest.raises(ValueError, match=r"k=4 folds need at least 4 groups, got 3"):
        kfold_groups(["a", "b", "c"], 4)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=60),
    k=st.integers(2, 8),
    seed=st.integers(0, 99),
)
def test_kfold_every_group_in_exactly_one_test_fold(ids, k, seed):
    groups = set(ids)
    if k > len(groups):
        with pytest.raises(ValueError, match="lower k"):
            kfold_groups(ids, k, seed)
        return
    folds = kfold_groups(ids, k, seed)
    tests = [g for f in folds for g in f.test]
    assert sorted(tests) == sorted(groups)
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        assert set(fold.train) == groups - set(fold.test)


# ------------------------------------------------------------------------------------ with real data


def test_no_question_leaks_between_fitting_and_scoring(tqa):
    questions, pairs = tqa
    split = split_groups([p.group_id for p in pairs], seed=0)
    train_pairs = filter_pairs(pairs, split.train)
    test_questions = filter_questions(questions, split.test)
    assert len(test_questions) == 82 and len(filter_questions(questions, split.train)) == 653
    assert {q.question_id for q in test_questions} == set(split.test)
    # group ids line up: the pairs' prompts never contain a scored question
    test_texts = {q.question for q in test_questions}
    assert not any(p.prompt.rsplit("\n\nQ: ", 1)[1][: -len("\nA:")] in test_texts for p in train_pairs)
    # every pair lands in exactly one part, and order is kept
    parts = [filter_pairs(pairs, ids) for ids in (split.train, split.validation, split.test)]
    assert sum(map(len, parts)) == len(pairs) and parts[0] == [
        p for p in pairs if p.group_id in set(split.train)
    ]


def test_filter_errors(tqa):
    questions, _ = tqa
    with pytest.raises(TypeError, match="not a single str"):
        filter_questions(questions, "tqa-0000")
    with pytest.raises(TypeError, match="has no attribute 'group_id'"):
        filter_pairs(questions, ["tqa-0000"])
    assert filter_by_group([{"x": 1}], [], attribute="__class__") == []


# ----------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    split = split_groups(IDS, fractions=(0.7, 0.1, 0.2), seed=5)
    path = save_split(split, tmp_path / "out" / "split.json")
    assert load_split(path) == split and GroupSplit.load(path) == split
    assert json.loads(path.read_text())["kind"] == "group_split"
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # temp file replaced, none left
    folds = kfold_groups(IDS, 3, seed=2)
    fpath = save_split(folds, tmp_path / "folds.json")
    assert load_folds(fpath) == folds
    with pytest.raises(ValueError, match=r"holds 'folds', not 'group_split': read it with load_folds"):
        load_split(fpath)
    with pytest.raises(ValueError, match=r"read it with load_split"):
        load_folds(path)
    with pytest.raises(TypeError, match="GroupSplit or a non-empty list of Fold"):
        save_split([], tmp_path / "x.json")


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json does not exist"):
        load_split(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON"):
        load_split(bad)
    bad.write_text('{"train": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="not an hpr_peft split file"):
        load_split(bad)
    payload = split_groups(IDS[:20]).to_dict()
    payload["test"].append(payload["train"][0])  # hand-edited file with a leak
    bad.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(ValueError, match=r"invalid split .*in both 'train' and 'test'"):
        load_split(bad)
    folds = {"format": "hpr_peft.split", "version": 1, "kind": "folds",
             "folds": [{"train": ["b"], "test": ["a"]}, {"train": ["b"], "test": ["a"]}]}  # fmt: skip
    bad.write_text(json.dumps(folds), encoding="utf-8")
    with pytest.raises(ValueError, match="more than one test fold"):
        load_folds(bad)


def test_identical_across_processes(tmp_path):
    """Fresh interpreters with different hash seeds produce the same splits (no reliance on hash())."""
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('s', sys.argv[1]); m = importlib.util.module_from_spec(spec)\n"
        "sys.modules['s'] = m; spec.loader.exec_module(m)\n"
        "ids = [f'tqa-{i:04d}' for i in range(817)]\n"
        "s = m.split_groups(ids, seed=7); f = m.kfold_groups(ids, 4, seed=7)\n"
        "print(json.dumps([s.train, s.validation, s.test, [x.test for x in f]]))\n"
    )
    here = split_groups(IDS, seed=7)
    expected = [here.train, here.validation, here.test, [f.test for f in kfold_groups(IDS, 4, seed=7)]]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", script, str(Path(splits_module.__file__))],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert json.loads(out.stdout) == expected


def test_fold_rejects_overlap():
    with pytest.raises(ValueError, match="in both 'train' and 'test'"):
        Fold(["a", "b"], ["b"])
