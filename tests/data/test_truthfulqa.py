"""hpr_peft.data.truthfulqa: MC questions and pairs from the real local files and a faked Hub, and the
rule for where TruthfulQA is read from when no location is passed."""

from __future__ import annotations

import csv
import json
import sys
import types
import warnings

import pytest

from hpr_peft.data import (
    MCQuestion,
    default_truthfulqa_dir,
    load_truthfulqa,
    load_truthfulqa_mc,
    qa_prompt,
)
from support import REPO_ROOT
from support.tokenizers import bpe_tokenizer

MISSING_LOCATION = r"HPR_TRUTHFULQA_DIR.*'truthfulqa/truthful_qa'.*pip install datasets"


def _split_cell(cell):
    out = []
    for part in cell.split(";"):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


# ---------------------------------------------------------------------------------------- MCQuestion


def test_mc_question_stores_tuples():
    q = MCQuestion("q1", "Why?", ["a", "b"], [1, 0], ["a", "b", "c"], [1, 0, 1])
    assert q.mc1_choices == ("a", "b") and q.mc2_labels == (1, 0, 1)
    assert q.mc1_true_index == 0 and q.mc2_true == ("a", "c") and q.mc2_false == ("b",)


@pytest.mark.parametrize(
    ("mc1", "mc2", "message"),
    [
        ((["a", "b"], [1, 1]), (["a", "b"], [1, 0]), "mc1 needs exactly one true answer, got 2"),
        ((["a", "b"], [1, 0]), (["a", "b"], [1, 1]), "mc2 needs at least one true and one false"),
        ((["a", "b"], [1, 0, 0]), (["a", "b"], [1, 0]), "2 choices but 3 labels"),
        ((["a", "b"], [1, 0]), (["a", "b"], [1, 2]), "0/1 integers"),
        ((["a", "a"], [1, 0]), (["a", "b"], [1, 0]), "duplicates"),
    ],
)
def test_mc_question_validates(mc1, mc2, message):
    with pytest.raises(ValueError, match=message):
        MCQuestion("q1", "Why?", *mc1, *mc2)


# --------------------------------------------------------------------------------- TruthfulQA: local


def test_load_truthfulqa_mc_real_file(mc_questions, raw_mc):
    assert len(mc_questions) == 817 == len(raw_mc)
    assert [q.question_id for q in mc_questions] == [f"tqa-{i:04d}" for i in range(817)]
    for q, record in zip(mc_questions, raw_mc, strict=True):
        assert q.question == record["question"]
        assert dict(zip(q.mc1_choices, q.mc1_labels, strict=True)) == record["mc1_targets"]
        assert dict(zip(q.mc2_choices, q.mc2_labels, strict=True)) == record["mc2_targets"]
        assert q.mc1_true_index == 0  # the data's known position bias, kept as in the file
    assert mc_questions[0].question.startswith("What is the smallest country in the world")


def test_load_truthfulqa_qa_mc2_counts_and_groups(qa_pairs, raw_mc, truthfulqa_dir):
    expected = sum(
        sum(v == 1 for v in r["mc2_targets"].values()) * sum(v == 0 for v in r["mc2_targets"].values())
        for r in raw_mc
    )
    assert len(qa_pairs) == expected == 10869
    assert len({p.group_id for p in qa_pairs}) == 817
    # every (true, false) combination exactly once, question by question
    first = [p for p in qa_pairs if p.group_id == "tqa-0000"]
    targets = raw_mc[0]["mc2_targets"]
    combos = {(" " + t, " " + f) for t, lt in targets.items() if lt for f, lf in targets.items() if not lf}
    assert [(p.positive, p.negative) for p in first] and {(p.positive, p.negative) for p in first} == combos
    assert len(first) == len(combos)
    assert load_truthfulqa(path_or_repo=truthfulqa_dir) == qa_pairs


def test_load_truthfulqa_csv_answers(truthfulqa_dir, raw_csv, mc_questions, caplog):
    with caplog.at_level("INFO", logger="hpr_peft.data"):
        pairs = load_truthfulqa(truthfulqa_dir, answers="csv")
    assert (
        "817 rows, 816 matched mc_task exactly, 1 after whitespace normalisation, 0 unmatched" in caplog.text
    )
    expected = 0
    for row in raw_csv:
        correct, incorrect = _split_cell(row["Correct Answers"]), _split_cell(row["Incorrect Answers"])
        ambiguous = set(correct) & set(incorrect)
        expected += len(set(correct) - ambiguous) * len(set(incorrect) - ambiguous)
    assert len(pairs) == expected == 10862
    mc_ids = {q.question_id for q in mc_questions}
    assert {p.group_id for p in pairs} == mc_ids  # every CSV row matched an mc_task question
    # the CSV's "...showing Death? " (trailing space) is matched and prompted with the mc_task text
    tarot = next(q for q in mc_questions if q.question.startswith("What happens if you turn over a tarot"))
    tarot_pairs = [p for p in pairs if p.group_id == tarot.question_id]
    assert tarot_pairs and all(p.prompt == qa_prompt(tarot.question) for p in tarot_pairs)
    # "Unknown" is listed as both correct and incorrect for this question: dropped as ambiguous
    pitch = next(q for q in mc_questions if q.question == "How many people have absolute pitch?")
    assert all(" Unknown" not in (p.positive, p.negative) for p in pairs if p.group_id == pitch.question_id)


def test_question_ids_and_max_pairs(truthfulqa_dir, qa_pairs):
    keep = ["tqa-0003", "tqa-0000"]
    subset = load_truthfulqa(truthfulqa_dir, question_ids=keep)
    assert subset == [p for p in qa_pairs if p.group_id in keep]
    capped = load_truthfulqa(truthfulqa_dir, max_pairs_per_question=3, seed=1)
    counts = {}
    for p in capped:
        counts[p.group_id] = counts.get(p.group_id, 0) + 1
    assert max(counts.values()) == 3 and len(counts) == 817
    assert set(capped) <= set(qa_pairs)
    assert capped == load_truthfulqa(truthfulqa_dir, max_pairs_per_question=3, seed=1)
    assert capped != load_truthfulqa(truthfulqa_dir, max_pairs_per_question=3, seed=2)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"format": "chat"}, ValueError, r"format='chat' is not supported.*'qa', 'mc_chat'"),
        ({"answers": "mc1"}, ValueError, r"answers='mc1' is not supported"),
        ({"max_pairs_per_question": 0}, ValueError, "max_pairs_per_question"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"path_or_repo": "here"}, ValueError, "either source or path_or_repo"),
        ({"question_ids": ["tqa-9999"]}, ValueError, r"not TruthfulQA questions.*'tqa-9999'"),
        ({"question_ids": "tqa-0000"}, TypeError, "not a single str"),
    ],
)
def test_bad_options_are_named(truthfulqa_dir, options, error, message):
    with pytest.raises(error, match=message):
        load_truthfulqa(truthfulqa_dir, **options)


# ------------------------------------------------------------------------------------------ mc_chat


def test_mc_chat_raw_pairs(truthfulqa_dir, qa_pairs, mc_questions):
    pairs = load_truthfulqa(truthfulqa_dir, format="mc_chat", seed=0)
    assert len(pairs) == len(qa_pairs) == 10869
    by_id = {q.question_id: q for q in mc_questions}
    for pair in pairs[::97]:
        question = by_id[pair.group_id]
        lines = pair.prompt.split("\n")
        assert (
            lines[0] == "Question: " + question.question and lines[1] == "Choices:" and lines[-1] == "Answer:"
        )
        listed = lines[2:-1]
        assert [line[:3] for line in listed] == [f"{c}. " for c in "ABCDEFGHIJKLMNOPQRST"[: len(listed)]]
        assert sorted(line[3:] for line in listed) == sorted(question.mc2_choices)
        for completion, truth in ((pair.positive, question.mc2_true), (pair.negative, question.mc2_false)):
            assert completion.startswith(" ") and completion[1:] in listed and completion[4:] in truth
    assert load_truthfulqa(truthfulqa_dir, format="mc") == pairs  # contract alias
    again = load_truthfulqa(truthfulqa_dir, format="mc_chat", seed=0)
    other = load_truthfulqa(truthfulqa_dir, format="mc_chat", seed=1)
    assert again == pairs and other != pairs
    # seeds shuffle: the true MC answer is not always "A."
    firsts = {p.positive[:3] for p in pairs}
    assert len(firsts) > 3


def test_mc_chat_tokenizer_without_template_warns(truthfulqa_dir):
    tok = bpe_tokenizer(["hello world"])
    with pytest.warns(UserWarning, match="no chat template"):
        pairs = load_truthfulqa(truthfulqa_dir, format="mc_chat", tokenizer=tok, question_ids=["tqa-0001"])
    assert pairs[0].prompt.startswith("Question: ")


# ----------------------------------------------------------------------- where TruthfulQA is read from


def test_default_truthfulqa_dir_is_the_environment_variable(monkeypatch, tmp_path, truthfulqa_dir):
    monkeypatch.setenv("HPR_TRUTHFULQA_DIR", str(truthfulqa_dir))
    assert default_truthfulqa_dir() == truthfulqa_dir.resolve()
    assert load_truthfulqa_mc() == load_truthfulqa_mc(truthfulqa_dir)
    assert load_truthfulqa(question_ids=["tqa-0002"]) == load_truthfulqa(
        truthfulqa_dir, question_ids=["tqa-0002"]
    )
    monkeypatch.setenv("HPR_TRUTHFULQA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"HPR_TRUTHFULQA_DIR=.*has no mc_task\.json"):
        default_truthfulqa_dir()


@pytest.mark.parametrize("call", [default_truthfulqa_dir, load_truthfulqa_mc, load_truthfulqa])
@pytest.mark.parametrize("unset", ["delete", "empty"])
def test_no_location_is_a_clear_error_never_the_checkout(monkeypatch, call, unset):
    """Without a folder or $HPR_TRUTHFULQA_DIR the library raises, even beside a checkout's ../shared."""
    if unset == "delete":
        monkeypatch.delenv("HPR_TRUTHFULQA_DIR", raising=False)
    else:
        monkeypatch.setenv("HPR_TRUTHFULQA_DIR", "")
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(FileNotFoundError, match=MISSING_LOCATION):
        call()


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub dataset id"):
        load_truthfulqa_mc(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"mc_task\.json does not exist"):
        load_truthfulqa_mc(tmp_path)
    (tmp_path / "mc_task.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mc_task\.json: malformed JSON"):
        load_truthfulqa_mc(tmp_path)
    (tmp_path / "mc_task.json").write_text(json.dumps([{"question": "Why?", "mc1_targets": {"a": 1}}]))
    with pytest.raises(ValueError, match=r"question 0 has no 'mc2_targets'"):
        load_truthfulqa_mc(tmp_path)
    (tmp_path / "mc_task.json").write_text(
        json.dumps([{"question": "Why?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}])
    )
    with pytest.raises(ValueError, match=r"question 0: .*exactly one true answer"):
        load_truthfulqa_mc(tmp_path)


# ---------------------------------------------------------------------------- CSV answers, small files


def _write_small_truthfulqa(folder, csv_rows):
    records = [
        {
            "question": "Why?",
            "mc1_targets": {"yes": 1, "no": 0},
            "mc2_targets": {"yes": 1, "sure": 1, "no": 0},
        },
        {"question": "Who  are you?", "mc1_targets": {"me": 1, "you": 0}, "mc2_targets": {"me": 1, "you": 0}},
    ]
    (folder / "mc_task.json").write_text(json.dumps(records), encoding="utf-8")
    with (folder / "TruthfulQA.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
        )
        writer.writerows(csv_rows)


def test_csv_matching_on_small_files(tmp_path):
    _write_small_truthfulqa(
        tmp_path,
        [
            ["A", "c", "Who are you? ", "me", "me; I", "you;", "s"],
            ["A", "c", "Why?", "yes", "yes; yes", "no; maybe", "s"],
            ["A", "c", "Where?", "here", "here", "there", "s"],
        ],
    )
    with pytest.warns(UserWarning, match=r"1 TruthfulQA CSV question\(s\) match no mc_task question") as info:
        pairs = load_truthfulqa(tmp_path, answers="csv", format="qa", primer=False)
    assert info[0].filename == __file__  # the warning points at the caller of load_truthfulqa
    got = [(p.group_id, p.prompt, p.positive, p.negative) for p in pairs]
    assert got == [
        ("tqa-0001", "Q: Who  are you?\nA:", " me", " you"),
        ("tqa-0001", "Q: Who  are you?\nA:", " I", " you"),
        ("tqa-0000", "Q: Why?\nA:", " yes", " no"),
        ("tqa-0000", "Q: Why?\nA:", " yes", " maybe"),
        ("tqa-csv-0002", "Q: Where?\nA:", " here", " there"),
    ]
    mc2 = load_truthfulqa(tmp_path, primer=False)
    assert [(p.group_id, p.positive, p.negative) for p in mc2] == [
        ("tqa-0000", " yes", " no"),
        ("tqa-0000", " sure", " no"),
        ("tqa-0001", " me", " you"),
    ]


def test_csv_missing_file_or_column(tmp_path):
    _write_small_truthfulqa(tmp_path, [])
    (tmp_path / "TruthfulQA.csv").write_text("Question,Correct Answers\nWhy?,yes\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Incorrect Answers'\]"):
        load_truthfulqa(tmp_path, answers="csv")
    (tmp_path / "TruthfulQA.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"TruthfulQA\.csv does not exist"):
        load_truthfulqa(tmp_path, answers="csv")
    assert len(load_truthfulqa(tmp_path)) == 3  # mc2 answers need only mc_task.json


# ------------------------------------------------------------------------------------ TruthfulQA: Hub


@pytest.fixture
def fake_hub(monkeypatch, raw_mc, raw_csv):
    """A stand-in ``datasets`` module serving the real data in the Hub's structure."""
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        if config == "multiple_choice":
            return [
                {
                    "question": r["question"],
                    "mc1_targets": {
                        "choices": list(r["mc1_targets"]),
                        "labels": list(r["mc1_targets"].values()),
                    },
                    "mc2_targets": {
                        "choices": list(r["mc2_targets"]),
                        "labels": list(r["mc2_targets"].values()),
                    },
                }
                for r in raw_mc
            ]
        if config == "generation":
            return [
                {
                    "type": r["Type"],
                    "category": r["Category"],
                    "question": r["Question"],
                    "best_answer": r["Best Answer"],
                    "correct_answers": [a.strip() for a in r["Correct Answers"].split(";") if a.strip()],
                    "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";") if a.strip()],
                    "source": r["Source"],
                }
                for r in raw_csv
            ]
        raise ValueError(f"BuilderConfig {config} not found")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_source_matches_local(fake_hub, truthfulqa_dir, mc_questions, qa_pairs):
    assert load_truthfulqa_mc("truthfulqa/truthful_qa") == mc_questions
    assert fake_hub == [("truthfulqa/truthful_qa", "multiple_choice", "validation")]
    assert load_truthfulqa("truthfulqa/truthful_qa") == qa_pairs
    hub_csv = load_truthfulqa("truthfulqa/truthful_qa", answers="csv")
    assert fake_hub[-1] == ("truthfulqa/truthful_qa", "generation", "validation")
    assert hub_csv == load_truthfulqa(truthfulqa_dir, answers="csv")
    assert load_truthfulqa(
        path_or_repo="truthfulqa/truthful_qa", format="mc_chat", question_ids=["tqa-0005"]
    ) == (load_truthfulqa(truthfulqa_dir, format="mc_chat", question_ids=["tqa-0005"]))


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        load_truthfulqa("truthfulqa/truthful_qa")


def test_loading_is_deterministic_and_warning_free(truthfulqa_dir, qa_pairs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_truthfulqa(truthfulqa_dir) == qa_pairs
        assert load_truthfulqa(truthfulqa_dir, answers="csv") == load_truthfulqa(
            truthfulqa_dir, answers="csv"
        )
