"""The metrics of a training run: ``metrics.jsonl`` in the run directory (and TensorBoard, optionally).

``metrics.jsonl`` holds one JSON object per logged step, in step order, each line flushed as it is
written. Keys (absent when not measured at that step):

====================  =============================================================================
``step``              optimizer steps done
``loss``              mean training loss over the steps since the previous line
``lr``                learning rate of the last of those steps
``grad_norm``         gradient norm of the last of those steps, before clipping
``tokens_per_second`` training throughput since the previous line (real tokens, all processes)
``tokens_seen``       real training tokens (Part A and Part B, no padding) since the start of the run
``padding_share``     share of padding among the positions computed since the previous line (packed
                      rows: and ``padding_share_without_packing``, the share as padded rows)
``eval_loss``         held-out loss (mean cross-entropy over all held-out Part B tokens)
``eval_accuracy``     held-out blank-infilling token accuracy (argmax = target, same tokens)
``wall_time``         Unix time of the line
====================  =============================================================================

A resumed run continues the file: :meth:`MetricsLogger.start` first drops every line beyond the
step it resumes from (written after its checkpoint by a run that then crashed), so every logged step
appears exactly once. The trainer syncs the file before writing a checkpoint, so a checkpoint never
exists without the lines up to its step.

With ``tensorboard=True`` the same values also go to TensorBoard event files in the run directory's
``tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``), as ``train/<key>`` and
``eval/<key>``; a resumed run purges the events beyond its step there too.

Only the main process (:func:`glm_ext.progress.is_main_process`) writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from glm_ext.files import fsync_path, write_file_atomically
from glm_ext.progress import is_main_process
from glm_ext.run_dir import RunDirectory

__all__ = ["MetricsLogger", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a run directory or the file itself), in file order. A
    last line cut short by a crash is skipped."""
    path = Path(path)
    if path.is_dir():
        path = RunDirectory(path).metrics_file
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: not a metrics line: {line[:80]!r}") from None
    return records


class MetricsLogger:
    """Appends the trainer's records to ``run_dir``'s ``metrics.jsonl`` (and TensorBoard).

    Call :meth:`start` with the step a run starts from, :meth:`log` for each logged step,
    :meth:`sync` before a checkpoint and :meth:`close` at the end.
    """

    def __init__(self, run_dir: RunDirectory, *, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self.enabled = is_main_process()
        self._file = None
        self._writer = None
        self._last_step: int | None = None

    def start(self, step: int) -> None:
        """Prepares to log the steps after ``step``: lines beyond it (a crashed run's) are dropped."""
        if not self.enabled:
            return
        self.close()
        path = self.run_dir.metrics_file
        self._last_step = None
        if path.exists():
            records = read_metrics(path)
            kept = [r for r in records if r["step"] <= step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            if text != path.read_text(encoding="utf-8"):  # lines beyond step, or a cut-off last line
                write_file_atomically(path, lambda f: f.write(text))
            self._last_step = kept[-1]["step"] if kept else None
        if self.tensorboard:
            self._writer = _summary_writer(self.run_dir.tensorboard_dir, purge_step=step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (``step`` and the measured values, see the module docstring)."""
        if not self.enabled:
            return
        step = record["step"]
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"metrics for step {step} come after step {self._last_step}: steps must increase")
        if self._file is None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir.metrics_file, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last_step = step
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "wall_time") and value is not None:
                    group = "eval" if key.startswith("eval_") else "train"
                    self._writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step,
                                            walltime=record.get("wall_time"))
            self._writer.flush()

    def sync(self) -> None:
        """Forces the lines written so far to disk (before a checkpoint that relies on them)."""
        if self._file is not None:
            os.fsync(self._file.fileno())
            fsync_path(self.run_dir.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(
            "TrainConfig.tensorboard (--tensorboard) needs the tensorboard package: "
            "pip install 'glm_ext[tensorboard]'"
        ) from error
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
