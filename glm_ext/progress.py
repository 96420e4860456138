"""Progress of a long job (training, evaluation, tokenising, the demo) as a person watching sees it.

:class:`Progress` shows one job in one of three ways, chosen once from where the output goes:

* ``"bar"``: a tqdm bar (position / total, rate, elapsed and ETA, plus the job's own statistics such
  as the loss) when standard output is a terminal; other lines are printed above the bar;
* ``"lines"``: plain lines, one per :meth:`Progress.report` (``step 40/800 | loss 5.1234 | ... |
  ETA 0:03:10``), when the output is a file or a pipe (CI, log files): no carriage returns;
* ``"off"``: nothing, on every process but the main one of a distributed run (torchrun), so that
  only rank 0 speaks.

:func:`is_main_process` is the one place that decides which process that is.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

__all__ = ["Progress", "ProgressMode", "is_main_process", "progress_mode"]

ProgressMode = Literal["bar", "lines", "off"]


def is_main_process() -> bool:
    """True on the process that reports (rank 0 of ``torch.distributed`` once it is initialised,
    else the ``RANK`` that torchrun sets, else the only process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def progress_mode(stream: TextIO | None = None) -> ProgressMode:
    """``"off"`` off the main process, ``"bar"`` when ``stream`` (standard output) is a terminal,
    else ``"lines"``."""
    if not is_main_process():
        return "off"
    stream = sys.stdout if stream is None else stream
    return "bar" if stream.isatty() else "lines"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """The progress of one job of ``total`` units (``None``: unknown), starting at ``initial``.

    ``advance(n)`` moves on; ``report(*parts)`` shows the job's statistics (in the bar's postfix,
    or as one plain line); ``write(line)`` prints a line that is not
    progress (a result, a saved checkpoint) without breaking the bar. Lines go to ``log``
    (``print`` by default). ``unit_scale`` shows large counts as 1.2M; ``leave=False`` clears the
    bar when done (a job inside another one).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        initial: int = 0,
        unit: str = "it",
        unit_scale: bool = False,
        log: Callable[[str], None] = print,
        mode: ProgressMode | None = None,
        leave: bool = True,
    ) -> None:
        self.desc, self.total, self.position, self.unit, self.log = desc, total, initial, unit, log
        self.mode = progress_mode() if mode is None else mode
        self._start, self._initial = time.perf_counter(), initial
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                             file=sys.stdout, dynamic_ncols=True, leave=leave)

    def advance(self, n: int = 1) -> None:
        self.position += n
        if self._bar is not None:
            self._bar.update(n)

    def eta_seconds(self) -> float | None:
        """Seconds left at the average rate since the start (None while unknown)."""
        done, seconds = self.position - self._initial, time.perf_counter() - self._start
        if self.total is None or done <= 0:
            return None
        return max(0, self.total - self.position) * seconds / done

    def report(self, *parts: str) -> None:
        """Shows the job's statistics (e.g. ``"loss 4.1234"``, ``"12,000 tokens/s"``): in the bar's
        postfix, or as one plain line ``DESC POSITION/TOTAL | PARTS | ETA H:MM:SS``."""
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(parts), refresh=True)
        elif self.mode == "lines":
            where = str(self.position) + (f"/{self.total}" if self.total is not None else "")
            eta = self.eta_seconds()
            ending = [] if eta is None else [f"ETA {_duration(eta)}"]
            self.log(" | ".join([f"{self.desc} {where}", *parts, *ending]))

    def write(self, line: str) -> None:
        """Prints a line that is not progress (above the bar in a terminal; nothing off rank 0)."""
        if self._bar is not None:
            with self._bar.external_write_mode(file=sys.stdout):
                self.log(line)
        elif self.mode == "lines":
            self.log(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
