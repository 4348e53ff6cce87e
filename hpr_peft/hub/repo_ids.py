"""Telling a Hub repo id ("name" or "namespace/name") from a filesystem path."""

from __future__ import annotations

import os
import re

__all__ = ["REPO_ID_PATTERN", "is_repo_id", "looks_like_repo_id"]

# letters, digits, "-", "_", "." in each part; at most one "/"
REPO_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(value: object) -> bool:
    """Whether ``value`` is a string with the shape of a Hub repo id."""
    return isinstance(value, str) and REPO_ID_PATTERN.fullmatch(value) is not None


def looks_like_repo_id(value: str | None) -> bool:
    """A repo id that is not also an existing local path (a path wins: it is what the user has)."""
    return bool(value) and is_repo_id(value) and not os.path.exists(value)
