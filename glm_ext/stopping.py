"""Stopping a training run cleanly when asked: SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers
send before preemption) become a request that the training loop honours at the next step boundary
(finish the step, save, exit 0), so a stopped run loses nothing and the same command resumes it.

:class:`StopSignals` installs the handlers for the duration of a ``with`` block and restores the
previous ones afterwards. The loop asks :meth:`StopSignals.requested` after every step; that one
method is the whole interface (a test may pass any object that has it). In a distributed run the
trainer makes the answer collective (:func:`glm_ext.distributed.any_rank`): a signal to any rank
stops every rank after the same step.

A second SIGINT while a stop is pending aborts at once (``KeyboardInterrupt``), as users expect of a
second Ctrl-C; checkpoints are written atomically, so the previous one stays intact. Not under
torchrun (``abort_on_second_interrupt=False``): torchrun forwards a Ctrl-C it receives to every rank,
which then sees it twice, and torchrun itself kills ranks that are not done after its
``--shutdown-timeout`` (30 s by default).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["StopSignals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager turning ``signals`` into a stop request (see the module docstring).

    Outside the main thread (where Python cannot install handlers) it installs nothing and
    :meth:`requested` stays False.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *,
                 abort_on_second_interrupt: bool = True) -> None:
        self.signals = signals
        self.abort_on_second_interrupt = abort_on_second_interrupt
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT and self.abort_on_second_interrupt:
            self._restore()
            raise KeyboardInterrupt
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        print(
            f"\nreceived {self.received.name}: stopping after this step and saving a checkpoint"
            + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT and self.abort_on_second_interrupt else ""),
            file=sys.stderr, flush=True,
        )

    def requested(self) -> bool:
        """Whether the run should stop now (after the step that just ended)."""
        return self.received is not None
