"""Argument checks shared by the data types and prompt builders of :mod:`hpr_peft.data`."""

from __future__ import annotations

from typing import Any

__all__ = ["require_text"]


def require_text(value: Any, field: str, owner: str) -> None:
    """Raise unless ``value`` is a str with some non-whitespace text (``owner.field`` names it)."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{field} must be a str, got {type(value).__name__}: pass the text itself.")
    if not value.strip():
        raise ValueError(f"{owner}.{field} is empty or only whitespace: give it some text.")
