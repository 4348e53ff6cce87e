"""Atomic adapter saves: a crash or error mid-save never leaves a half-written adapter directory.

``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` one after the other,
straight into the target directory: an exception or a killed process in between leaves a config that
does not match its weights (or a truncated safetensors file) where a good adapter used to be. Here the
new adapter is written into a temporary directory next to the target (same filesystem, so renames are
atomic), flushed to disk, and only then swapped in with ``os.replace``; the old directory is renamed
aside first and removed only once the new one is in place.

Files already in the target directory that the new save does not write (a fit report, plots, other
adapters in sub-directories) are carried over into the new directory (hard links where possible), so a
save replaces the adapter, not the user's other files.

The core calls :func:`atomic_directory` (``with atomic_directory(path) as tmp: <write into tmp>``);
users call :func:`save_adapter_atomic`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "replace_directory", "save_adapter_atomic", "write_text_atomic"]

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


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` every entry of ``old`` that ``new`` does not have (hard links where possible)."""
    # a stale pickle beside fresh safetensors weights would only confuse loaders: drop it
    skip = {"adapter_model.bin"} if (new / "adapter_model.safetensors").exists() else set()
    for entry in old.iterdir():
        target = new / entry.name
        if entry.name in skip or target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def replace_directory(new: str | os.PathLike, target: str | os.PathLike, keep_existing: bool = True) -> Path:
    """Move the complete directory ``new`` to ``target``, replacing what is there.

    ``new`` must be on the same filesystem as ``target`` (make it next to it). With ``keep_existing``,
    entries of the old ``target`` that ``new`` lacks are carried over first. The old directory is renamed
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
        _carry_over(target, new)
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
def atomic_directory(directory: str | os.PathLike, keep_existing: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``directory``; on success it replaces ``directory``.

    If the body raises (or the process dies), ``directory`` is left exactly as it was and the temporary
    directory is removed (after a hard kill a hidden ``.<name>.tmp-*`` directory may remain; it is never
    read). See :func:`replace_directory` for ``keep_existing``.
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
        replace_directory(tmp, target, keep_existing=keep_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter_atomic(
    model: Any, directory: str | os.PathLike, *, keep_existing: bool = True, **kwargs: Any
) -> Path:
    """``model.save_pretrained(directory, **kwargs)``, atomically: the old adapter survives any failure.

    ``model`` is anything with ``save_pretrained`` (a ``PeftModel`` with an HPR adapter, typically);
    ``kwargs`` go to ``save_pretrained`` (``selected_adapters=``, ``safe_serialization=`` ...). Pickle
    output is refused: ``safe_serialization=False`` raises ValueError. Returns the target directory.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save_adapter_atomic: model must have save_pretrained(), got {type(model).__name__}")
    if kwargs.get("safe_serialization") is False:
        raise ValueError(
            "save_adapter_atomic: safe_serialization=False (pickle) is not supported; use safetensors"
        )
    with atomic_directory(directory, keep_existing=keep_existing) as tmp:
        model.save_pretrained(str(tmp), **kwargs)
    return Path(directory).expanduser().absolute()


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
