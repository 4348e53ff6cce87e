"""Progress bars: one factory so that every long loop honours ``progress=False`` (``--no-progress``)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int | None, desc: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar over ``total`` steps, or a silent one (same interface) when ``enabled`` is False."""
    return tqdm(total=total, desc=desc, disable=not enabled, **options)
