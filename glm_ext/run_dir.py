"""The run directory of a training run: its layout, written and read in one place.

A run directory (``TrainConfig.output_dir``, what ``glm-ext generate/plot RUN_DIR`` take) holds::

    train_config.json                 the configuration of the run (TrainConfig)
    tokenizer.json                    a copy of the tokenizer the run was trained with
    metrics.jsonl                     one JSON object per logged step
    latest                            the name of the newest complete checkpoint
    checkpoints/step-00000400/
        model/                        glm_ext.checkpoint format (model.safetensors + config.json)
        trainer_state.pt              optimizer, step, data stream, collator, RNG states

A checkpoint directory is assembled under a temporary name and renamed into place once complete
(:func:`glm_ext.files.staged_directory`), then ``latest`` is replaced atomically, so a crash at any
point leaves the previous checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from glm_ext.checkpoint import TOKENIZER_FILE, is_checkpoint
from glm_ext.files import staged_directory, write_file_atomically

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "LATEST_FILE",
    "METRICS_FILE",
    "MODEL_DIR",
    "STATE_FILE",
    "TOKENIZER_FILE",
    "RunDirectory",
    "checkpoint_name",
    "resolve_model_source",
]

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    """``step-00000400``: zero-padded, so names sort like steps."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


class RunDirectory:
    """The files of one run directory (see the module docstring). Creating the object touches nothing."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories present, oldest first (complete or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory (``checkpoints/step-N``) named by ``latest``, or None."""
        pointer = self.path / LATEST_FILE
        if not pointer.is_file():
            return None
        path = self.checkpoints_dir / pointer.read_text(encoding="utf-8").strip()
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def write_text(self, name: str, text: str) -> None:
        """Writes the run file ``name`` (e.g. ``CONFIG_FILE``) atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_file_atomically(self.path / name, lambda f: f.write(text))

    def save_checkpoint(self, step: int, write: Callable[[Path], None], *, keep: int) -> Path:
        """Writes checkpoint ``step``: ``write(directory)`` fills a staging directory that then
        replaces ``checkpoints/step-N``; ``latest`` is pointed at it and all but the newest ``keep``
        checkpoints are removed. Returns the checkpoint directory."""
        target = self.checkpoint_dir(step)
        with staged_directory(target) as staging:
            write(staging)
        write_file_atomically(self.path / LATEST_FILE, lambda f: f.write(target.name + "\n"))
        present = self.checkpoints()
        for path in [p for p in present if p != target][: max(0, len(present) - keep)]:
            shutil.rmtree(path)
        return target


def resolve_model_source(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model checkpoint directory, the tokenizer that goes with it or None) for what a user names:
    a run directory (its newest checkpoint), a ``checkpoints/step-N`` directory, or a checkpoint
    (with the ``tokenizer.json`` it carries, e.g. written by ``glm-ext convert --tokenizer-files``)."""
    root = Path(path)
    if is_checkpoint(root):
        return root, root / TOKENIZER_FILE if (root / TOKENIZER_FILE).is_file() else None
    if is_checkpoint(root / MODEL_DIR):
        return root / MODEL_DIR, root.parent.parent / TOKENIZER_FILE
    step_dir = RunDirectory(root).latest_checkpoint()
    if step_dir is not None:
        return step_dir / MODEL_DIR, root / TOKENIZER_FILE
    raise FileNotFoundError(f"{path} is neither a training run (glm-ext train --output-dir) nor a checkpoint")
