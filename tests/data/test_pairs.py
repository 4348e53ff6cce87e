"""hpr_peft.data.pairs: ContrastivePair validation and the JSONL pair format."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hpr_peft.data import ContrastivePair, load_pairs_jsonl, save_pairs_jsonl


def test_contrastive_pair_fields_and_frozen():
    pair = ContrastivePair("Q: x\nA:", " yes", " no", "g1")
    assert (pair.prompt, pair.positive, pair.negative, pair.group_id) == ("Q: x\nA:", " yes", " no", "g1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.positive = " maybe"


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (("p", " same", " same", "g"), ValueError, r"identical.*two different completions"),
        (("p", " a", "  ", "g"), ValueError, r"ContrastivePair\.negative is empty"),
        (("p", " a", " b", ""), ValueError, r"ContrastivePair\.group_id is empty"),
        ((3, " a", " b", "g"), TypeError, r"ContrastivePair\.prompt must be a str, got int"),
    ],
)
def test_contrastive_pair_validates(fields, error, message):
    with pytest.raises(error, match=message):
        ContrastivePair(*fields)


# --------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path, qa_pairs):
    pairs = [*qa_pairs[:5], ContrastivePair('Ünïcode "quotes"\nline', " ✓", " ✗", "g-ü")]
    path = save_pairs_jsonl(pairs, tmp_path / "sub" / "pairs.jsonl")
    assert load_pairs_jsonl(path) == pairs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) == {"prompt", "positive", "negative", "group"}
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temp file left behind


@pytest.mark.parametrize(
    ("pairs", "error", "message"),
    [([], ValueError, "no pairs to write"), ([{"prompt": "p"}], TypeError, "item 0 is a dict")],
)
def test_save_pairs_jsonl_rejects(tmp_path, pairs, error, message):
    with pytest.raises(error, match=message):
        save_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")


def test_jsonl_group_defaults_and_extra_keys(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "P1", "positive": " a", "negative": " b"},
        {"prompt": "P1", "positive": " c", "negative": " d", "note": "extra keys are ignored"},
        {"prompt": "P2", "positive": " a", "negative": " b"},
        {"prompt": "P3", "positive": " a", "negative": " b", "group": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    pairs = load_pairs_jsonl(path)
    assert len(pairs) == 4
    assert pairs[0].group_id == pairs[1].group_id != pairs[2].group_id
    assert pairs[0].group_id.startswith("prompt-") and pairs[3].group_id == "7"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "positive": " a",', r"malformed JSON"),
        ('{"prompt": "p", "positive": " a"}', r"missing key 'negative'"),
        ('{"prompt": "p", "positive": 3, "negative": " b"}', r"'positive' must be a string, got int"),
        ('{"prompt": "p", "positive": " a", "negative": " a"}', r"'positive' and 'negative' are identical"),
        ('{"prompt": "", "positive": " a", "negative": " b"}', r"'prompt' is empty"),
        ('["p", " a", " b"]', r"expected a JSON object"),
        (
            '{"prompt": "p", "positive": " a", "negative": " b", "group": ["x"]}',
            r"'group' must be a non-empty string",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "positive": " a", "negative": " b"})
    path.write_text(good + "\n\n" + line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_pairs_jsonl(path)
    assert f"{path}: line 3:" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("missing.jsonl", None, FileNotFoundError, r"missing\.jsonl does not exist"),
        ("empty.jsonl", b"\n  \n", ValueError, r"empty\.jsonl is empty"),
        (
            "latin.jsonl",
            b'{"prompt": "caf\xe9", "positive": " a", "negative": " b"}\n',
            ValueError,
            r"line 1: not valid UTF-8",
        ),
    ],
)
def test_jsonl_file_level_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_pairs_jsonl(path)


def test_jsonl_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Some editors (Windows Notepad, Excel exports) start a UTF-8 file with a byte-order mark."""
    path = tmp_path / "bom.jsonl"
    lines = [
        {"prompt": "Q: é?", "positive": " a", "negative": " b", "group": 1},
        {"prompt": "Q:", "positive": " c", "negative": " d"},
    ]
    path.write_bytes("\ufeff".encode() + "".join(json.dumps(x) + "\n" for x in lines).encode())
    pairs = load_pairs_jsonl(path)
    assert [p.prompt for p in pairs] == ["Q: é?", "Q:"] and pairs[0].group_id == "1"


def test_jsonl_groups_written_one_way_are_kept_apart_or_together(tmp_path):
    """Integers are groups by their decimal text: 1 and 1 are one group, 1 and 2 two groups."""
    path = tmp_path / "groups.jsonl"
    rows = [(" a", 1), (" b", 1), (" c", 2), (" d", "x")]
    path.write_text(
        "".join(
            json.dumps({"prompt": "Q:", "positive": p, "negative": " n", "group": g}) + "\n" for p, g in rows
        )
    )
    assert [p.group_id for p in load_pairs_jsonl(path)] == ["1", "1", "2", "x"]
