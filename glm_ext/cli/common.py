"""What the subcommands share: reporting an expected failure as one line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

# Failures a user can act on (a missing file, a bad value, a diverging run): printed as one line.
USER_ERRORS = (OSError, ValueError, FloatingPointError)


def error(message: str, status: int = 1) -> int:
    """Prints ``error: message`` to stderr and returns ``status`` (the command's exit status)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def reports_errors(run: Callable[..., int]) -> Callable[..., int]:
    """Wraps a command's ``run`` so that the errors of ``USER_ERRORS`` end it with one line and status 1."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs) -> int:
        try:
            return run(*args, **kwargs)
        except USER_ERRORS as exc:
            return error(str(exc))

    return wrapper
