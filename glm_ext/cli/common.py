"""What the subcommands share: reporting an expected failure as one line instead of a traceback,
and warnings as one line too."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

# Failures a user can act on (a missing file, a bad value, a diverging run, an optional package not
# installed, e.g. sentencepiece for the Chinese tokenizers): printed as one line.
USER_ERRORS = (OSError, ValueError, FloatingPointError, ImportError)
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def error(message: str, status: int = 1) -> int:
    """Prints ``error: message`` to stderr and returns ``status`` (the command's exit status)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def reports_errors(run: Callable[..., int]) -> Callable[..., int]:
    """Wraps a command's ``run`` so that the errors of ``USER_ERRORS`` end it with one line and
    status 1, an interrupt (a second Ctrl-C) with one line and status 130, and warnings print as
    ``warning: ...`` lines. In a distributed run, a rank whose peer failed (``RankFailed``) ends
    with status 1 and leaves the message to the rank that failed."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs) -> int:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return run(*args, **kwargs)
            except USER_ERRORS as exc:
                return error(str(exc))
            except KeyboardInterrupt:
                return error("interrupted (checkpoints already written are intact)", INTERRUPTED)
            except Exception as exc:
                from glm_ext.distributed import RankFailed  # only a distributed run raises it

                if isinstance(exc, RankFailed):
                    return 1  # the rank that failed has reported its error
                raise

    return wrapper
