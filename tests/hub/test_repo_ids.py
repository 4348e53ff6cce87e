"""Telling a Hub repo id from a local path (hpr_peft.hub.repo_ids)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpr_peft.hub.repo_ids import is_repo_id, looks_like_repo_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("name", True),
        ("alice/tiny-hpr", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("org/model_v1.5", True),
        ("not a repo id", False),
        ("a/b/c", False),
        ("/tmp/base", False),
        ("./local", False),
        ("-bad/name", False),
        ("", False),
        (None, False),
        (42, False),
    ],
)
def test_is_repo_id(value: object, expected: bool) -> None:
    assert is_repo_id(value) is expected


def test_an_existing_local_path_is_not_taken_for_a_repo_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert looks_like_repo_id("org/model")
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not looks_like_repo_id("org/model")
    assert not looks_like_repo_id(None) and not looks_like_repo_id("")
