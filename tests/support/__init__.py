"""Helpers shared by the tests (tiny models, tokenizers, a local Hub server)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout's root folder (``tests/support`` is two levels below it)."""
