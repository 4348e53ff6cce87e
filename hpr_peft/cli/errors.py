"""How ``hpr-peft`` reports a failure: a user's mistake is one line on stderr and exit status 2 (as
argparse does for a bad option), a bug keeps its traceback.

User errors are what the library raises for bad input: ``ValueError`` (bad values, damaged files),
the ``OSError`` family (a missing file or model, a path that cannot be written, permissions, a full
disk) and :class:`hpr_peft.hub.HubAccessError`. Everything else (``RuntimeError``, ``KeyError``,
``TypeError`` from a wrong call inside the code ...) is an internal error and propagates with its
traceback. Set ``HPR_PEFT_TRACEBACK=1`` to see the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

__all__ = ["USER_ERROR_STATUS", "is_user_error", "one_line", "run_reporting_errors"]

USER_ERROR_STATUS = 2


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports bad input (see the module docstring) rather than a bug."""
    if isinstance(error, (ValueError, OSError)):
        return True
    from hpr_peft.hub.errors import HubAccessError

    return isinstance(error, HubAccessError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


def run_reporting_errors(
    command: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
) -> int:
    """``run(args)``; a user error prints ``hpr-peft <command>: error: <message>`` and returns 2."""
    try:
        return int(run(args) or 0)
    except Exception as error:
        if not is_user_error(error) or os.environ.get("HPR_PEFT_TRACEBACK"):
            raise
        print(f"hpr-peft {command}: error: {one_line(error)}", file=sys.stderr)
        return USER_ERROR_STATUS
