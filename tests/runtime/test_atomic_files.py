"""Atomic files and directories (hpr_peft.runtime.atomic_files): all or nothing, no temporary leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import hpr_peft.runtime.atomic_files as atomic_files
from hpr_peft.runtime.atomic_files import atomic_directory, replace_directory, write_text_atomic


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_replace_directory_restores_old_when_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, new = tmp_path / "t", tmp_path / "n"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real_replace = os.replace

    def flaky_replace(src, dst):
        if Path(src) == new:
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        replace_directory(new, target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n", "t"]


def test_replace_directory_needs_an_existing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        replace_directory(tmp_path / "missing", tmp_path / "t")


def test_atomic_directory_and_bad_inputs(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "d") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".d.tmp-")
        (tmp / "x.json").write_text("{}")
    assert (tmp_path / "d" / "x.json").read_text() == "{}"
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(FileExistsError, match="is a file"), atomic_directory(tmp_path / "file"):
        pass


def test_failing_body_leaves_directory_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError, match="injected"), atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("injected")
    assert [p.name for p in target.iterdir()] == ["a"] and (target / "a").read_text() == "old"
    assert _leftovers(tmp_path, "d") == []


@pytest.mark.parametrize(
    ("keep_existing", "is_stale", "expected"),
    [
        pytest.param(True, None, {"a": "new", "kept": "old", "sub": None, "stale": "old"}, id="carry-over"),
        pytest.param(
            True,
            lambda entry, new: entry.name == "stale",
            {"a": "new", "kept": "old", "sub": None},
            id="stale",
        ),
        pytest.param(False, None, {"a": "new"}, id="replace-all"),
    ],
)
def test_entries_of_the_old_directory_are_carried_over(
    tmp_path: Path, keep_existing: bool, is_stale, expected: dict[str, str | None]
) -> None:
    target = tmp_path / "d"
    target.mkdir()
    for name in ("a", "kept", "stale"):
        (target / name).write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "f").write_text("in sub")
    with atomic_directory(target, keep_existing=keep_existing, is_stale=is_stale) as tmp:
        (tmp / "a").write_text("new")
    found = {p.name: None if p.is_dir() else p.read_text() for p in target.iterdir()}
    assert found == expected
    if "sub" in expected:
        assert (target / "sub" / "f").read_text() == "in sub"
    assert _leftovers(tmp_path, "d") == []


def test_write_text_atomic(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "card" / "README.md", "hello")
    assert (tmp_path / "card" / "README.md").read_text() == "hello"
    assert os.listdir(tmp_path / "card") == ["README.md"]
    write_text_atomic(tmp_path / "card" / "README.md", "again")
    assert (tmp_path / "card" / "README.md").read_text() == "again"
    assert os.listdir(tmp_path / "card") == ["README.md"]
