"""Atomic adapter saves: a crash or error mid-save never leaves a half-written adapter directory.

``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` one after the other,
straight into the target directory: an exception or a killed process in between leaves a config that
does not match its weights (or a truncated safetensors file) where a good adapter used to be.
:func:`save_adapter_atomic` saves into a temporary directory next to the target and swaps it in with
:func:`hpr_peft.runtime.atomic_files.atomic_directory`. Files already in the target directory that the
new save does not write (a fit report, plots, other adapters in sub-directories) are carried over, so a
save replaces the adapter, not the user's other files; only a stale pickle ``adapter_model.bin`` beside
fresh safetensors weights is dropped (it would only confuse loaders). Otherwise it behaves like
``save_pretrained``: permissions follow the umask (a replaced directory keeps its own), and a target
that is a symbolic link keeps its link while the directory it points to gets the new adapter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpr_peft.hub.adapter_files import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from hpr_peft.runtime.atomic_files import atomic_directory
from hpr_peft.tuner.config import validate_adapter_name

__all__ = ["save_adapter_atomic"]


def _is_stale_pickle(old_entry: Path, new_directory: Path) -> bool:
    """A pickle weights file of the old adapter, now that the new one has safetensors weights."""
    return old_entry.name == PICKLE_WEIGHTS_NAME and (new_directory / WEIGHTS_NAME).exists()


def save_adapter_atomic(
    model: Any,
    directory: str | os.PathLike,
    *,
    keep_existing: bool = True,
    add_files: Callable[[Path], None] | None = None,
    **kwargs: Any,
) -> Path:
    """``model.save_pretrained(directory, **kwargs)``, atomically: the old adapter survives any failure.

    ``model`` is anything with ``save_pretrained`` (a ``PeftModel`` with an HPR adapter, typically);
    ``kwargs`` go to ``save_pretrained`` (``selected_adapters=``, ``safe_serialization=`` ...). Pickle
    output is refused: ``safe_serialization=False`` raises ValueError. With ``keep_existing=False`` the
    other files of the directory are not carried over. ``add_files(folder)`` may write more files (a
    report, plots, a card) into the new adapter folder before it is swapped in, so they change
    together with the adapter. Refused before anything is written: a target
    that is a file, read-only or in an unwritable place, and adapter names that are paths (PEFT saves a
    named adapter in ``<directory>/<name>``). Returns the target directory.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save_adapter_atomic: model must have save_pretrained(), got {type(model).__name__}")
    if kwargs.get("safe_serialization") is False:
        raise ValueError(
            "save_adapter_atomic: safe_serialization=False (pickle) is not supported; use safetensors"
        )
    names = kwargs.get("selected_adapters") or list(getattr(model, "peft_config", {}) or {})
    for name in names:
        validate_adapter_name(name)
    with atomic_directory(directory, keep_existing=keep_existing, is_stale=_is_stale_pickle) as tmp:
        # HPR never changes embeddings; without this, peft checks the base's vocabulary and warns when
        # the base folder has no config.json (a GGUF checkpoint's).
        kwargs.setdefault("save_embedding_layers", False)
        model.save_pretrained(str(tmp), **kwargs)
        if add_files is not None:
            add_files(tmp)
    return Path(directory).expanduser().absolute()
