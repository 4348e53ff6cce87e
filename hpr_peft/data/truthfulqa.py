"""TruthfulQA: multiple-choice questions and contrastive pairs, from a local folder or the Hub.

TruthfulQA is read in place from a local folder (``mc_task.json`` + ``TruthfulQA.csv``) or, when the
optional ``datasets`` package is installed, from the Hub dataset ``truthfulqa/truthful_qa``. Without an
explicit location the folder named by ``$HPR_TRUTHFULQA_DIR`` is used; the library never guesses one.
Question ids are ``"tqa-0000"`` ... ``"tqa-0816"`` (index in ``mc_task.json``) for both the pairs used
in fitting (:func:`load_truthfulqa`) and the MC questions used in evaluation (:func:`load_truthfulqa_mc`),
so a split by id lines up between the two.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hpr_peft.data.pairs import ContrastivePair
from hpr_peft.data.prompts import (
    answer_continuation,
    has_chat_template,
    mc_chat_prompt,
    qa_prompt,
    stable_order,
)
from hpr_peft.data.validation import require_text

logger = logging.getLogger(__name__)

__all__ = [
    "ANSWER_SOURCES",
    "FORMATS",
    "HUB_DATASET_ID",
    "TRUTHFULQA_DIR_ENV",
    "GenerationQuestion",
    "MCQuestion",
    "default_truthfulqa_dir",
    "load_truthfulqa",
    "load_truthfulqa_generation",
    "load_truthfulqa_mc",
    "truthfulqa_question_id",
]

HUB_DATASET_ID = "truthfulqa/truthful_qa"
"""Hub id of TruthfulQA (configs ``multiple_choice`` and ``generation``, split ``validation``)."""

TRUTHFULQA_DIR_ENV = "HPR_TRUTHFULQA_DIR"
"""Environment variable naming the local TruthfulQA folder used when no location is passed."""

FORMATS = ("qa", "mc_chat")
ANSWER_SOURCES = ("mc2", "csv")
_FORMAT_ALIASES = {"qa": "qa", "mc_chat": "mc_chat", "mc": "mc_chat"}
_MC_TASK_FILE = "mc_task.json"
_CSV_FILE = "TruthfulQA.csv"
_CSV_COLUMNS = ("Question", "Correct Answers", "Incorrect Answers")
# "org/name" (a Hub dataset id), as opposed to a local path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------


def _checked_targets(question_id: str, kind: str, choices: Any, labels: Any) -> tuple[tuple, tuple]:
    """``(choices, labels)`` as tuples after checking one ``mc1`` / ``mc2`` target list."""
    if isinstance(choices, str) or isinstance(labels, str):
        raise TypeError(f"MCQuestion.{kind}_choices/_labels must be sequences, not a single str.")
    choices, labels = tuple(choices), tuple(labels)
    where = f"MCQuestion {question_id!r}: {kind}"
    if len(choices) != len(labels):
        raise ValueError(f"{where} has {len(choices)} choices but {len(labels)} labels: give one label each.")
    for choice in choices:
        require_text(choice, f"{kind}_choices[...]", "MCQuestion")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}_choices contains duplicates: every choice must be distinct.")
    if any(isinstance(x, bool) or x not in (0, 1) for x in labels):
        raise ValueError(f"{where}_labels must be 0/1 integers (1 = true answer), got {labels}.")
    n_true = sum(labels)
    if kind == "mc1" and n_true != 1:
        raise ValueError(f"{where} needs exactly one true answer, got {n_true}.")
    if n_true == 0 or n_true == len(labels):
        raise ValueError(f"{where} needs at least one true and one false answer, got labels {labels}.")
    return choices, labels


@dataclass(frozen=True)
class MCQuestion:
    """A TruthfulQA multiple-choice question, as lm-eval-harness ``truthfulqa_mc1``/``mc2`` score it.

    ``mc1_labels`` has exactly one 1 (the true answer; in ``mc_task.json`` always listed first, so never
    break ties by position); ``mc2_labels`` has at least one 1 and one 0. Sequences are stored as tuples.
    """

    question_id: str
    question: str
    mc1_choices: tuple[str, ...]
    mc1_labels: tuple[int, ...]
    mc2_choices: tuple[str, ...]
    mc2_labels: tuple[int, ...]

    def __post_init__(self) -> None:
        require_text(self.question_id, "question_id", "MCQuestion")
        require_text(self.question, "question", "MCQuestion")
        for kind in ("mc1", "mc2"):
            choices, labels = _checked_targets(
                self.question_id, kind, getattr(self, f"{kind}_choices"), getattr(self, f"{kind}_labels")
            )
            object.__setattr__(self, f"{kind}_choices", choices)
            object.__setattr__(self, f"{kind}_labels", labels)

    @property
    def mc1_true_index(self) -> int:
        """Index of the single true MC1 answer."""
        return self.mc1_labels.index(1)

    @property
    def mc2_true(self) -> tuple[str, ...]:
        """True MC2 answers, in file order."""
        return tuple(c for c, label in zip(self.mc2_choices, self.mc2_labels, strict=True) if label == 1)

    @property
    def mc2_false(self) -> tuple[str, ...]:
        """False MC2 answers, in file order."""
        return tuple(c for c, label in zip(self.mc2_choices, self.mc2_labels, strict=True) if label == 0)


def truthfulqa_question_id(index: int) -> str:
    """Stable id of the question at ``index`` of ``mc_task.json``: ``"tqa-0000"`` ..."""
    return f"tqa-{index:04d}"


# ----------------------------------------------------------------------------------------------------
# Sources: an explicit folder or Hub id, else $HPR_TRUTHFULQA_DIR
# ----------------------------------------------------------------------------------------------------


def default_truthfulqa_dir() -> Path:
    """The local TruthfulQA folder named by ``$HPR_TRUTHFULQA_DIR``.

    The library has no other default: without the variable this raises a FileNotFoundError that says
    to pass the folder (or set the variable) or to pass the Hub id.
    """
    env = os.environ.get(TRUTHFULQA_DIR_ENV)
    if not env:
        raise FileNotFoundError(
            f"No TruthfulQA location given and ${TRUTHFULQA_DIR_ENV} is not set: pass the folder holding "
            f"{_MC_TASK_FILE} and {_CSV_FILE} (or set {TRUTHFULQA_DIR_ENV} to it), or pass the Hub id "
            f"{HUB_DATASET_ID!r} (needs `pip install datasets`)."
        )
    folder = Path(env).expanduser()
    if not (folder / _MC_TASK_FILE).is_file():
        raise FileNotFoundError(
            f"{TRUTHFULQA_DIR_ENV}={env} has no {_MC_TASK_FILE}: point it to the folder holding "
            f"{_MC_TASK_FILE} and {_CSV_FILE}, or unset it and pass the folder."
        )
    return folder.resolve()


def _resolve_source(source: str | os.PathLike | None) -> tuple[str, Any]:
    """("local", folder) or ("hub", dataset id)."""
    if source is None:
        return "local", default_truthfulqa_dir()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"TruthfulQA source must be a path or a Hub dataset id, got {type(source).__name__}.")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / _MC_TASK_FILE).is_file():
            raise FileNotFoundError(
                f"{path / _MC_TASK_FILE} does not exist: pass the folder holding {_MC_TASK_FILE}."
            )
        return "local", path
    if path.is_file():
        if path.name in (_MC_TASK_FILE, _CSV_FILE):
            return "local", path.parent
        raise ValueError(
            f"TruthfulQA source {path} is a file: pass the folder holding {_MC_TASK_FILE} and {_CSV_FILE}."
        )
    if isinstance(source, str) and _HUB_ID_RE.match(source):
        return "hub", source
    raise FileNotFoundError(
        f"TruthfulQA source {str(source)!r} is neither an existing folder nor a Hub dataset id such as "
        f"{HUB_DATASET_ID!r}: check the path."
    )


def _hub_rows(repo: str, config: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"Loading TruthfulQA from the Hub ({repo!r}) needs the optional 'datasets' package: "
            "pip install datasets (or pip install 'hpr_peft[datasets]'), or pass a local folder with "
            f"{_MC_TASK_FILE} and {_CSV_FILE}."
        ) from None
    return list(datasets.load_dataset(repo, config, split="validation"))


# ----------------------------------------------------------------------------------------------------
# MC questions
# ----------------------------------------------------------------------------------------------------


def _targets_from_dict(targets: Any, where: str) -> tuple[list[str], list[int]]:
    if not isinstance(targets, dict) or not targets:
        raise ValueError(f"{where} must be a non-empty {{answer: 0 or 1}} object.")
    return list(targets.keys()), list(targets.values())


def _targets_from_hub(targets: Any, where: str) -> tuple[list[str], list[int]]:
    if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
        raise ValueError(
            f"{where} must be {{'choices': [...], 'labels': [...]}}, got {type(targets).__name__}."
        )
    return list(targets["choices"]), [int(x) for x in targets["labels"]]


def _mc_questions_from_records(records: Any, origin: str, hub: bool) -> list[MCQuestion]:
    if not isinstance(records, list) or not records:
        raise ValueError(f"{origin} must hold a non-empty list of questions.")
    convert = _targets_from_hub if hub else _targets_from_dict
    questions = []
    for index, record in enumerate(records):
        where = f"{origin}: question {index}"
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise ValueError(f"{where} must be an object with a 'question' string.")
        for key in ("mc1_targets", "mc2_targets"):
            if key not in record:
                raise ValueError(f"{where} has no {key!r}.")
        mc1 = convert(record["mc1_targets"], f"{where} mc1_targets")
        mc2 = convert(record["mc2_targets"], f"{where} mc2_targets")
        try:
            questions.append(
                MCQuestion(truthfulqa_question_id(index), record["question"], mc1[0], mc1[1], mc2[0], mc2[1])
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    return questions


def load_truthfulqa_mc(path: str | os.PathLike | None = None) -> list[MCQuestion]:
    """The 817 TruthfulQA MC questions (ids ``"tqa-0000"``…, the index in ``mc_task.json``).

    ``path``: a folder with ``mc_task.json`` (default ``$HPR_TRUTHFULQA_DIR``, see
    :func:`default_truthfulqa_dir`) or the Hub id ``"truthfulqa/truthful_qa"`` (config
    ``multiple_choice``; needs ``datasets``).
    """
    kind, where = _resolve_source(path)
    if kind == "hub":
        return _mc_questions_from_records(
            _hub_rows(where, "multiple_choice"), f"{where} (multiple_choice)", hub=True
        )
    file = Path(where) / _MC_TASK_FILE
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: malformed JSON ({exc.msg} at line {exc.lineno}).") from None
    return _mc_questions_from_records(records, str(file), hub=False)


# ----------------------------------------------------------------------------------------------------
# Answers per question: mc2 targets, or the CSV's Correct / Incorrect Answers
# ----------------------------------------------------------------------------------------------------


class _QuestionAnswers(NamedTuple):
    question_id: str
    question: str
    true_answers: list[str]
    false_answers: list[str]


def _split_answers(text: str) -> list[str]:
    """CSV answer cell -> answers (split on ';', stripped, empty parts and duplicates dropped)."""
    out: list[str] = []
    for part in text.split(";"):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


def _norm(text: str) -> str:
    return " ".join(text.split())


def _csv_rows(folder: Path) -> list[tuple[str, list[str], list[str]]]:
    file = folder / _CSV_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: answers='csv' needs {_CSV_FILE} beside {_MC_TASK_FILE}."
        )
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{file}: missing column(s) {missing}; expected the TruthfulQA header {_CSV_COLUMNS}."
            )
        return [
            (
                row["Question"],
                _split_answers(row["Correct Answers"]),
                _split_answers(row["Incorrect Answers"]),
            )
            for row in reader
        ]


def _hub_csv_rows(repo: str) -> list[tuple[str, list[str], list[str]]]:
    rows = []
    for index, row in enumerate(_hub_rows(repo, "generation")):
        try:
            correct = _split_answers(";".join(row["correct_answers"]))
            incorrect = _split_answers(";".join(row["incorrect_answers"]))
            rows.append((row["question"], correct, incorrect))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{repo} (generation): row {index} is malformed ({exc!r}).") from None
    return rows


def _match_csv(
    rows: list[tuple[str, list[str], list[str]]], questions: list[MCQuestion], stacklevel: int
) -> list[_QuestionAnswers]:
    """Attach mc_task ids to CSV rows by question text (exact, then whitespace-normalised)."""
    exact = {q.question: q for q in questions}
    normal = {_norm(q.question): q for q in questions}
    out, n_exact, n_norm, unmatched = [], 0, 0, []
    for row_index, (text, correct, incorrect) in enumerate(rows):
        question = exact.get(text)
        if question is not None:
            n_exact += 1
        else:
            question = normal.get(_norm(text))
            n_norm += question is not None
        if question is None:
            unmatched.append(text)
            out.append(_QuestionAnswers(f"tqa-csv-{row_index:04d}", text, correct, incorrect))
        else:
            # the mc_task text is the one evaluation prompts with
            out.append(_QuestionAnswers(question.question_id, question.question, correct, incorrect))
    logger.info(
        "TruthfulQA CSV: %d rows, %d matched mc_task exactly, %d after whitespace normalisation, %d unmatched",
        len(rows), n_exact, n_norm, len(unmatched),
    )  # fmt: skip
    if unmatched:
        warnings.warn(
            f"{len(unmatched)} TruthfulQA CSV question(s) match no mc_task question (e.g. {unmatched[0]!r}); "
            "they get ids 'tqa-csv-<row>' and are never in the evaluation set.",
            stacklevel=stacklevel + 1,
        )
    ids = [item.question_id for item in out]
    if len(set(ids)) != len(ids):
        raise ValueError("Several TruthfulQA CSV rows match the same mc_task question: the files disagree.")
    return out


def _csv_answers(
    source: str | os.PathLike | None, questions: list[MCQuestion], stacklevel: int
) -> list[_QuestionAnswers]:
    """CSV (or Hub ``generation``) answers per question; answers listed as both true and false dropped."""
    kind, where = _resolve_source(source)
    rows = _hub_csv_rows(where) if kind == "hub" else _csv_rows(Path(where))
    items = []
    for item in _match_csv(rows, questions, stacklevel + 1):
        ambiguous = set(item.true_answers) & set(item.false_answers)
        items.append(
            item._replace(
                true_answers=[a for a in item.true_answers if a not in ambiguous],
                false_answers=[a for a in item.false_answers if a not in ambiguous],
            )
        )
    return items


def _answers_per_question(
    source: str | os.PathLike | None, answers: str, stacklevel: int
) -> list[_QuestionAnswers]:
    """The true and false answers of every question, from ``mc2_targets`` or from the CSV."""
    questions = load_truthfulqa_mc(source)
    if answers == "mc2":
        return [
            _QuestionAnswers(q.question_id, q.question, list(q.mc2_true), list(q.mc2_false))
            for q in questions
        ]
    return _csv_answers(source, questions, stacklevel + 1)


def _keep_questions(
    items: list[_QuestionAnswers], question_ids: Iterable[str] | None
) -> list[_QuestionAnswers]:
    """``items`` restricted to ``question_ids`` (all when None); unknown ids are an error."""
    if question_ids is None:
        return items
    if isinstance(question_ids, str):
        raise TypeError("question_ids must be a collection of ids, not a single str: wrap it in a list.")
    wanted = set(question_ids)
    unknown = wanted - {item.question_id for item in items}
    if unknown:
        raise ValueError(
            f"question_ids has {len(unknown)} id(s) that are not TruthfulQA questions, e.g. "
            f"{sorted(unknown)[:3]}; ids look like 'tqa-0000' (see load_truthfulqa_mc)."
        )
    return [item for item in items if item.question_id in wanted]


@dataclass(frozen=True)
class GenerationQuestion:
    """A TruthfulQA question with the reference answers generation is scored against (the CSV's
    ``Correct Answers`` / ``Incorrect Answers``, as in the Hub dataset's ``generation`` config)."""

    question_id: str
    question: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]


def load_truthfulqa_generation(
    source: str | os.PathLike | None = None, question_ids: Iterable[str] | None = None
) -> list[GenerationQuestion]:
    """TruthfulQA's questions with their true and false reference answers, for generation.

    ``source``: a folder with ``TruthfulQA.csv`` beside ``mc_task.json`` (default
    ``$HPR_TRUTHFULQA_DIR``) or the Hub id (config ``generation``). Ids are those of
    :func:`load_truthfulqa_mc` (matched by question text), in CSV order; ``question_ids`` keeps only
    those. Answers are kept as the file lists them (lm-eval formats them when it scores).
    """
    questions = load_truthfulqa_mc(source)
    kind, where = _resolve_source(source)
    rows = _hub_csv_rows(where) if kind == "hub" else _csv_rows(Path(where))
    items = _keep_questions(_match_csv(rows, questions, stacklevel=2), question_ids)
    return [
        GenerationQuestion(
            item.question_id, item.question, tuple(item.true_answers), tuple(item.false_answers)
        )
        for item in items
    ]


# ----------------------------------------------------------------------------------------------------
# Contrastive pairs
# ----------------------------------------------------------------------------------------------------


def _checked_format(format: Any) -> str:
    if not isinstance(format, str) or format not in _FORMAT_ALIASES:
        raise ValueError(f"format={format!r} is not supported: use one of {list(FORMATS)}.")
    return _FORMAT_ALIASES[format]


def _check_pair_options(answers: str, seed: Any, max_pairs_per_question: Any) -> None:
    if answers not in ANSWER_SOURCES:
        raise ValueError(f"answers={answers!r} is not supported: use one of {list(ANSWER_SOURCES)}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if max_pairs_per_question is not None and (
        isinstance(max_pairs_per_question, bool)
        or not isinstance(max_pairs_per_question, int)
        or max_pairs_per_question < 1
    ):
        raise ValueError(
            f"max_pairs_per_question must be a positive int or None, got {max_pairs_per_question!r}."
        )


def _question_pairs(
    item: _QuestionAnswers,
    format: str,
    seed: int,
    tokenizer: Any,
    primer: bool,
    max_pairs_per_question: int | None,
) -> list[ContrastivePair]:
    """Every (true, false) answer combination of one question (a seeded subsample when capped)."""
    qid, choices = item.question_id, item.true_answers + item.false_answers
    if format == "qa":
        prompt = qa_prompt(item.question, primer=primer)
        completion = {a: answer_continuation(a) for a in choices}
    else:
        prompt, completion = mc_chat_prompt(item.question, choices, seed, qid, tokenizer)
    combos = [(t, f) for t in item.true_answers for f in item.false_answers]
    if max_pairs_per_question is not None and len(combos) > max_pairs_per_question:
        keep = sorted(stable_order(len(combos), f"pairs:{seed}:{qid}")[:max_pairs_per_question])
        combos = [combos[i] for i in keep]
    return [ContrastivePair(prompt, completion[t], completion[f], qid) for t, f in combos]


def load_truthfulqa(
    source: str | os.PathLike | None = None,
    format: str = "qa",
    answers: str = "mc2",
    seed: int = 0,
    tokenizer: Any = None,
    *,
    primer: bool = True,
    question_ids: Iterable[str] | None = None,
    max_pairs_per_question: int | None = None,
    path_or_repo: str | os.PathLike | None = None,
) -> list[ContrastivePair]:
    """TruthfulQA contrastive pairs: every (true, false) answer combination of every question.

    - ``source``: local folder (default ``$HPR_TRUTHFULQA_DIR``, see :func:`default_truthfulqa_dir`)
      or the Hub id ``"truthfulqa/truthful_qa"`` (needs ``datasets``). ``path_or_repo`` is an alias.
    - ``format``: ``"qa"`` (lm-eval primer + ``"Q: …\\nA:"``, completion ``" " + answer``; the format
      evaluation scores) or ``"mc_chat"`` (alias ``"mc"``; see :func:`mc_chat_prompt`).
    - ``answers``: ``"mc2"`` (true/false answers of ``mc2_targets``, the answers evaluation scores) or
      ``"csv"`` (Correct/Incorrect Answers of ``TruthfulQA.csv``, or the Hub ``generation`` config;
      answers listed as both true and false are dropped as ambiguous).
    - ``seed``: fixes the ``mc_chat`` choice order and the ``max_pairs_per_question`` subsample.
    - ``tokenizer``: for ``mc_chat``, its chat template renders the prompt (raw text without one).
    - ``question_ids``: keep only these questions (ids from :func:`load_truthfulqa_mc`).
    - ``max_pairs_per_question``: seeded subsample of each question's pairs (kept in order).

    ``group_id`` is the question id, identical to ``MCQuestion.question_id``.
    """
    if path_or_repo is not None:
        if source is not None:
            raise ValueError("Pass the TruthfulQA location once: either source or path_or_repo, not both.")
        source = path_or_repo
    format = _checked_format(format)
    _check_pair_options(answers, seed, max_pairs_per_question)
    if format == "mc_chat" and tokenizer is not None and not has_chat_template(tokenizer):
        warnings.warn(
            "format='mc_chat': the tokenizer has no chat template, so prompts are raw text.", stacklevel=2
        )
    items = _keep_questions(_answers_per_question(source, answers, stacklevel=2), question_ids)
    pairs: list[ContrastivePair] = []
    for item in items:
        pairs.extend(_question_pairs(item, format, seed, tokenizer, primer, max_pairs_per_question))
    return pairs
