"""Progress bars: one factory so that every long loop honours ``progress=False`` (``--no-progress``),
and a switch that also silences the bars of the libraries we call (model loading, GGUF conversion)."""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "quiet_library_bars"]

# Modules that create tqdm bars with no switch of their own: their module-level ``tqdm`` is swapped
# for a disabled one while quiet. transformers converts GGUF checkpoints under such a bar.
_UNSWITCHED_BARS = ("transformers.modeling_gguf_pytorch_utils",)


def progress_bar(total: int | None, desc: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar over ``total`` steps, or a silent one (same interface) when ``enabled`` is False."""
    return tqdm(total=total, desc=desc, disable=not enabled, **options)


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _hub_bars_off() -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def _unswitched_bars_off() -> Iterator[None]:
    swapped = []
    for name in _UNSWITCHED_BARS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "tqdm", None)
        if original is not None:
            swapped.append((module, original))
            module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        for module, original in swapped:
            module.tqdm = original


@contextlib.contextmanager
def quiet_library_bars(quiet: bool = True) -> Iterator[None]:
    """While active (and ``quiet``), the progress bars of transformers (weight loading, GGUF
    conversion) and huggingface_hub (downloads) are silent; each switch is restored afterwards."""
    if not quiet:
        yield
        return
    with _transformers_bars_off(), _hub_bars_off(), _unswitched_bars_off():
        yield
