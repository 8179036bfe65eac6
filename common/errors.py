"""The errors a user can fix, and the one place that reports them.

Every error of this project that a user can fix (a setting, a data line, a checkpoint, a reward, a
model folder) is a ``UserError``: its message names the file, line or constant and what would work.
A script that reaches the top level with one prints ``error: <message>`` on stderr and exits 1,
without a traceback; anything else (a bug) keeps Python's traceback.

The handler is a ``sys.excepthook``, installed by ``common.config.configure`` (which every script calls
right after its constants), rather than a ``try`` around each script: the scripts stay flat, read top
to bottom, and the atexit handlers (the run lock's release) still run as on any uncaught exception.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error the user can fix; the message alone is shown (``error: ...``, exit status 1)."""


def _report(kind, error, trace, default=sys.__excepthook__) -> None:
    if isinstance(error, UserError):
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        default(kind, error, trace)


def report_user_errors() -> None:
    """From now on an uncaught UserError is printed as one ``error: ...`` message and exits 1 (Python's
    status for an uncaught exception); every other exception keeps the hook it had (its traceback)."""
    if getattr(sys.excepthook, "func", None) is not _report:  # installed once (eval_math_base.py runs eval_math.py)
        sys.excepthook = functools.partial(_report, default=sys.excepthook)
