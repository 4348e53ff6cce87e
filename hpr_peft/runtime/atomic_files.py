"""Atomic files and directories: a crash or error mid-write never leaves a half-written result.

:func:`atomic_file` (and :func:`write_text_atomic`) write a file through a temporary file next to it
and ``os.replace``. :func:`atomic_directory` yields a temporary directory next to the target (same
filesystem, so renames are atomic); when the body succeeds its contents are flushed to disk and swapped
in by :func:`replace_directory`: the old directory is renamed aside first and removed only once the new
one is in place. Entries of the old directory that the new one lacks (a report, plots,
sub-directories) are carried over (hard links where possible), unless the caller marks them stale.

They behave like writing in place, only atomically: what they write gets the permissions the umask
gives (not a temporary file's 0600 / 0700), a replaced directory or file keeps its own mode, and a
target that is a symbolic link keeps its link while the directory or file it points to is replaced. :func:`check_output_path` refuses, before any work, what a save could not do: a file where a
directory is wanted, a read-only target, an unwritable or missing parent, a broken link. Every error
names the user's path, never a temporary one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "IsStale",
    "atomic_directory",
    "atomic_file",
    "check_output_path",
    "replace_directory",
    "write_bytes_atomic",
    "write_text_atomic",
]

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


def _follow_umask(root: Path) -> None:
    """Give everything written under ``root`` the permissions the umask gives a new file or directory
    (some writers, e.g. safetensors, create 0600 files). ``root`` was made with ``os.mkdir``, so its
    own mode is ``0o777 & ~umask``: no need to read the process-wide umask (racy in threads)."""
    directory_mode = stat.S_IMODE(root.stat().st_mode)
    file_mode = directory_mode & 0o666
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), directory_mode)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), file_mode)


def _remove_tree(path: Path) -> None:
    """Remove ``path``; entries a read-only sub-directory protects are made writable first. Warns
    (naming what is left) only if that still fails."""

    def writable_and_retry(function: Callable, failed: str, error: object) -> None:
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.stat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        function(failed)

    handler = {"onexc" if sys.version_info >= (3, 12) else "onerror": writable_and_retry}
    try:
        shutil.rmtree(path, **handler)
    except OSError as error:
        warnings.warn(f"could not remove the old copy {path} ({error}); delete it by hand", stacklevel=3)


def _resolve_link(path: Path) -> Path:
    """``path``, or for a symbolic link the path it points to (raises for a broken link)."""
    if not path.is_symlink():
        return path
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise FileNotFoundError(
            f"{path} is a symbolic link to {real}, which does not exist: remove the link or point it at an "
            "existing directory"
        )
    return real


def _is_read_only(path: Path) -> bool:
    """Not writable for us, or marked read-only by its owner (also respected when running as root)."""
    return not os.access(path, os.W_OK) or not stat.S_IMODE(path.stat().st_mode) & stat.S_IWUSR


def _check_parent(path: Path, shown: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise FileNotFoundError(f"cannot write {shown}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {shown}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {shown}: the directory {ancestor} is not writable; choose a location you can "
            "write to"
        )


def check_output_path(path: str | os.PathLike, kind: str = "directory") -> Path:
    """Check, before any long work, that ``path`` can be written as a ``kind`` (``"directory"`` or
    ``"file"``); return the path that will really be written (a symbolic link's destination).

    Raises (naming ``path`` and the fix): ``FileExistsError`` for a file where a directory is wanted
    or a directory where a file is wanted, ``PermissionError`` for a read-only target or an unwritable
    parent, ``NotADirectoryError`` when a parent is a file, ``FileNotFoundError`` for a broken link.
    """
    if kind not in ("directory", "file"):
        raise ValueError(f"kind must be 'directory' or 'file', got {kind!r}")
    shown = Path(path).expanduser().absolute()
    target = _resolve_link(shown)
    if target.exists():
        if kind == "directory" and not target.is_dir():
            raise FileExistsError(
                f"cannot write the directory {shown}: it is a file; choose a directory path"
            )
        if kind == "file" and target.is_dir():
            raise FileExistsError(f"cannot write the file {shown}: it is a directory; choose a file path")
        if _is_read_only(target):
            mode = stat.filemode(target.stat().st_mode)
            raise PermissionError(
                f"cannot write {shown}: it is read-only ({mode}); make it writable (chmod u+w) or choose "
                "another path"
            )
    _check_parent(target, shown)
    return target


def _temporary_name(target: Path, keep_suffix: bool = False) -> Path:
    suffix = target.suffix if keep_suffix else ""
    return target.with_name(f".{target.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}{suffix}")


def _make_temporary_directory(target: Path, shown: Path) -> Path:
    """A new empty directory next to ``target``, created with the umask's permissions."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_name(target)
        os.mkdir(tmp)
    except OSError as error:
        raise type(error)(
            error.errno, f"cannot write {shown}: {error.strerror} in {target.parent}"
        ) from error
    return tmp


def replace_directory(
    new: str | os.PathLike,
    target: str | os.PathLike,
    keep_existing: bool = True,
    is_stale: IsStale | None = None,
) -> Path:
    """Move the complete directory ``new`` to ``target``, replacing what is there.

    ``new`` must be on the same filesystem as ``target`` (make it next to it). With ``keep_existing``,
    entries of the old ``target`` that ``new`` lacks are carried over first, except those for which
    ``is_stale(entry, new)`` is true. The old directory is renamed aside, ``new`` renamed into place
    (with the old directory's mode), then the old one removed; if the second rename fails the old
    directory is put back. A symbolic link ``target`` stays a link: the directory it points to is
    replaced. Raises FileExistsError when ``target`` is a file, not a directory.
    """
    new, shown = Path(new), Path(target)
    if not new.is_dir():
        raise FileNotFoundError(f"replace_directory: source directory {str(new)!r} does not exist")
    target = _resolve_link(shown)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot save to {str(shown)!r}: it is a file; choose a directory path")
    if not target.exists():
        os.replace(new, target)
        _fsync_dir(target.parent)
        return shown
    if keep_existing:
        _carry_over(target, new, is_stale)
        _fsync_tree(new)
    os.chmod(new, stat.S_IMODE(target.stat().st_mode))  # a replaced directory keeps its mode
    aside = target.with_name(f".{target.name}{_OLD_TAG}{uuid.uuid4().hex[:12]}")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old directory back
        raise
    _fsync_dir(target.parent)
    _remove_tree(aside)
    return shown


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike, keep_existing: bool = True, is_stale: IsStale | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``directory``; on success it replaces ``directory``.

    ``directory`` is checked first (:func:`check_output_path`). Everything the body writes gets the
    umask's permissions (``0755`` / ``0644`` under umask 022); a replaced directory keeps its mode. If the
    body raises (or the process
    dies), ``directory`` is left exactly as it was and the temporary directory is removed (after a hard
    kill a hidden ``.<name>.tmp-*`` directory may remain; it is never read). See
    :func:`replace_directory` for ``keep_existing`` and ``is_stale``.
    """
    shown = Path(directory).expanduser().absolute()
    target = check_output_path(shown, "directory")
    tmp = _make_temporary_directory(target, shown)
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        replace_directory(tmp, target, keep_existing=keep_existing, is_stale=is_stale)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that infer the format from it
    work); when the body succeeds the file written there is flushed and replaces ``path``.

    ``path`` is checked first (:func:`check_output_path`); a symbolic link keeps pointing at the
    replaced file; a replaced file keeps its mode, a new one gets the umask's. On failure ``path`` is
    untouched and the temporary file removed.
    """
    shown = Path(path).expanduser().absolute()
    target = check_output_path(shown, "file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(error.errno, f"cannot write {shown}: {error.strerror}") from error
    tmp = _temporary_name(target, keep_suffix=True)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
        if target.is_file():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`); returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_file`); returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))
