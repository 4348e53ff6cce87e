"""Atomic files and directories: a crash or error mid-write never leaves a half-written result.

:func:`write_text_atomic` writes a file through a temporary file and ``os.replace``.
:func:`atomic_directory` yields a temporary directory next to the target (same filesystem, so renames
are atomic); when the body succeeds its contents are flushed to disk and swapped in by
:func:`replace_directory`: the old directory is renamed aside first and removed only once the new one is
in place. Entries of the old directory that the new one lacks (a report, plots, sub-directories) are
carried over (hard links where possible), unless the caller marks them stale.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["IsStale", "atomic_directory", "replace_directory", "write_text_atomic"]

IsStale = Callable[[Path, Path], bool]
"""``is_stale(old_entry, new_directory)``: True drops ``old_entry`` instead of carrying it over."""

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the directories, where the OS allows it) to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data itself is flushed
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, is_stale: IsStale | None) -> None:
    """Copy into ``new`` every entry of ``old`` that ``new`` does not have (hard links where possible)."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink() or (is_stale is not None and is_stale(entry, new)):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def replace_directory(
    new: str | os.PathLike,
    target: str | os.PathLike,
    keep_existing: bool = True,
    is_stale: IsStale | None = None,
) -> Path:
    """Move the complete directory ``new`` to ``target``, replacing what is there.

    ``new`` must be on the same filesystem as ``target`` (make it next to it). With ``keep_existing``,
    entries of the old ``target`` that ``new`` lacks are carried over first, except those for which
    ``is_stale(entry, new)`` is true. The old directory is renamed
    aside, ``new`` renamed into place, then the old one removed; if the second rename fails the old
    directory is put back. Raises FileExistsError when ``target`` is a file, not a directory.
    """
    new, target = Path(new), Path(target)
    if not new.is_dir():
        raise FileNotFoundError(f"replace_directory: source directory {str(new)!r} does not exist")
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"cannot save an adapter to {str(target)!r}: it is a file; choose a directory path"
        )
    if not target.exists():
        os.replace(new, target)
        _fsync_dir(target.parent)
        return target
    if keep_existing:
        _carry_over(target, new, is_stale)
        _fsync_tree(new)
    aside = target.with_name(f".{target.name}{_OLD_TAG}{uuid.uuid4().hex[:12]}")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old adapter back
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike, keep_existing: bool = True, is_stale: IsStale | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``directory``; on success it replaces ``directory``.

    If the body raises (or the process dies), ``directory`` is left exactly as it was and the temporary
    directory is removed (after a hard kill a hidden ``.<name>.tmp-*`` directory may remain; it is never
    read). See :func:`replace_directory` for ``keep_existing`` and ``is_stale``.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"cannot save an adapter to {str(target)!r}: it is a file; choose a directory path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        replace_directory(tmp, target, keep_existing=keep_existing, is_stale=is_stale)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (no torn files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
