"""Atomic files and directories (hpr_peft.runtime.atomic_files): all or nothing, no temporary leftovers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import hpr_peft.runtime.atomic_files as atomic_files
from hpr_peft.runtime.atomic_files import (
    atomic_directory,
    atomic_file,
    check_output_path,
    replace_directory,
    write_text_atomic,
)


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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "directory", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_written_files_and_directories_follow_the_umask(tmp_path: Path, umask, mask, directory, file) -> None:
    umask(mask)
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_text("x")
        fd = os.open(tmp / "private", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes its file
        os.close(fd)
    assert _mode(tmp_path / "d") == directory and _mode(tmp_path / "d" / "sub") == directory
    assert _mode(tmp_path / "d" / "private") == file and _mode(tmp_path / "d" / "sub" / "f") == file
    write_text_atomic(tmp_path / "new.txt", "text")
    assert _mode(tmp_path / "new.txt") == file


def test_a_replaced_directory_and_file_keep_their_modes(tmp_path: Path, umask) -> None:
    target = tmp_path / "d"
    target.mkdir()
    os.chmod(target, 0o750)
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert _mode(target) == 0o750
    (tmp_path / "f.txt").write_text("old")
    os.chmod(tmp_path / "f.txt", 0o640)
    write_text_atomic(tmp_path / "f.txt", "new")
    assert _mode(tmp_path / "f.txt") == 0o640 and (tmp_path / "f.txt").read_text() == "new"


def test_a_symlinked_target_keeps_its_link_and_gets_the_new_contents(tmp_path: Path) -> None:
    run1 = tmp_path / "run1"
    run1.mkdir()
    (run1 / "a").write_text("old")
    (tmp_path / "latest").symlink_to("run1")
    with atomic_directory(tmp_path / "latest") as tmp:
        (tmp / "a").write_text("new")
    assert (tmp_path / "latest").is_symlink() and os.readlink(tmp_path / "latest") == "run1"
    assert (run1 / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run1"]  # nothing left behind

    (tmp_path / "note.txt").write_text("old")
    (tmp_path / "current.txt").symlink_to("note.txt")
    write_text_atomic(tmp_path / "current.txt", "new")
    assert (tmp_path / "current.txt").is_symlink() and (tmp_path / "note.txt").read_text() == "new"


def test_atomic_file_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="injected"), atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"  # writers may infer the format from it
        tmp.write_bytes(b"ha")
        raise RuntimeError("injected")
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["plot.png"]


def test_check_output_path_returns_where_the_data_goes(tmp_path: Path) -> None:
    (tmp_path / "run1").mkdir()
    (tmp_path / "latest").symlink_to("run1")
    assert check_output_path(tmp_path / "latest") == tmp_path / "run1"
    assert check_output_path(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(FileExistsError, match="it is a directory; choose a file path"):
        check_output_path(tmp_path / "run1", "file")
