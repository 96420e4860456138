"""The run directory of a training run: its layout, written and read in one place.

A run directory (``TrainConfig.output_dir``, what ``glm-ext generate/plot RUN_DIR`` take) holds::

    train.lock                        locked (flock) by the trainer at work, holds its pid
    train_config.json                 the configuration of the run (TrainConfig)
    tokenizer.json                    a copy of the tokenizer the run was trained with
    metrics.jsonl                     one JSON object per logged step (glm_ext.metrics)
    loss.png                          the curves of metrics.jsonl (glm-ext plot; train writes it at the end)
    tensorboard/                      TensorBoard event files (with TrainConfig.tensorboard)
    latest                            the name of the newest complete checkpoint
    checkpoints/step-00000400/
        model/                        glm_ext.checkpoint format (model.safetensors, config.json,
                                      manifest.json with the tokenizer's SHA-256 as metadata)
        optimizer/                    the optimizer state, torch.distributed.checkpoint format: a
                                      .metadata file and one __R_0.distcp file per writing rank R
                                      (readable by any number of processes)
        trainer_state.pt              step, data stream, collator, history, configuration
        manifest.json                 size and SHA-256 of trainer_state.pt and optimizer/*

Guarantees (README "Reliability"):

* A checkpoint directory is assembled under a temporary name and renamed into place once complete
  (:func:`glm_ext.files.staged_directory`), then ``latest`` is replaced atomically, so a crash at
  any point leaves the previous checkpoints and ``latest`` intact. In a distributed run every rank
  writes its optimizer shard into the staging directory that rank 0 made, and rank 0 renames it
  into place once all have written (:meth:`RunDirectory.staged_checkpoint`): the run directory must
  be on a file system that every rank sees.
* One trainer at a time: :meth:`RunDirectory.lock` takes an exclusive ``flock`` on ``train.lock``
  (the kernel drops it when the process ends, however it ends), and refuses a second trainer,
  naming the directory and the pid holding it. Whoever takes the lock first removes the temporaries
  that a crashed writer left (:meth:`RunDirectory.remove_stale_temporaries`).
* Resuming (:meth:`RunDirectory.load_newest_checkpoint`) takes the newest checkpoint whose files
  match their checksums and whose weights fit their config, whatever ``latest`` says; damaged
  newer ones are skipped with a warning. A directory whose checkpoints are all damaged is refused,
  never trained again from step 0 (which would prune the checkpoints).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glm_ext.checkpoint import (
    TOKENIZER_FILE,
    TOKENIZER_SHA256,
    checkpoint_metadata,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from glm_ext.files import (
    CorruptFileError,
    remove_directory,
    remove_temporaries,
    staged_directory,
    verify_manifest,
    write_file_atomically,
    write_manifest,
)
from glm_ext.model import GLMConfig, GLMModel

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "LATEST_FILE",
    "LOCK_FILE",
    "LOSS_PLOT_FILE",
    "METRICS_FILE",
    "MODEL_DIR",
    "OPTIMIZER_DIR",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "TOKENIZER_FILE",
    "ResumeWarning",
    "RunDirectory",
    "RunDirectoryInUse",
    "check_tokenizer",
    "checkpoint_name",
    "resolve_model_source",
]

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
LATEST_FILE = "latest"
LOCK_FILE = "train.lock"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "step-"
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, LATEST_FILE)  # written atomically in the root
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


class RunDirectoryInUse(OSError):
    """Another process holds the run directory's lock."""


class ResumeWarning(UserWarning):
    """A run resumes from another checkpoint than ``latest`` names (damaged or missing ones skipped)."""


def checkpoint_name(step: int) -> str:
    """``step-00000400``: zero-padded, so names sort like steps."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _step_of(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


class RunDirectory:
    """The files of one run directory (see the module docstring). Creating the object touches nothing."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._lock_depth = 0

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
    def latest_file(self) -> Path:
        return self.path / LATEST_FILE

    @property
    def loss_plot_file(self) -> Path:
        return self.path / LOSS_PLOT_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories present, oldest first (complete or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=_step_of)

    # ----- one writer at a time -----------------------------------------------------------------

    def check_writable(self) -> None:
        """Raises OSError (naming the directory) unless the run directory is, or can become, a
        writable directory: called before a run starts, so that it does not fail only at its first save."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"run directory {self.path}: {existing} exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"run directory {self.path}: {existing} is not writable")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds the run directory's exclusive lock for the block (re-entrant on this object): raises
        :class:`RunDirectoryInUse` when another process (or RunDirectory object) holds it. Taking it
        creates the directory and removes stale temporaries."""
        if self._lock_depth == 0:
            self._acquire()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._release()

    def _acquire(self) -> None:
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirectoryInUse(
                f"run directory {self.path} is in use by another trainer"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + "; wait for it to finish or stop it, or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            self.remove_stale_temporaries()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the flock

    def remove_stale_temporaries(self) -> list[Path]:
        """Removes what crashed writers left (half-written checkpoint directories, temporary files,
        directories retired by a replacement), only names of this layout. Call it holding the lock."""
        removed = remove_temporaries(self.path, lambda target: target in RUN_FILES)
        removed += remove_temporaries(self.checkpoints_dir, lambda target: bool(_CHECKPOINT_NAME.fullmatch(target)))
        return removed

    # ----- writing ------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        """Writes the run file ``name`` (e.g. ``CONFIG_FILE``) atomically, unless it holds ``text`` already."""
        with self.lock():
            try:
                if (self.path / name).read_text(encoding="utf-8") == text:
                    return
            except (OSError, UnicodeDecodeError):
                pass
            write_file_atomically(self.path / name, lambda f: f.write(text))

    @contextlib.contextmanager
    def staged_checkpoint(self, step: int, *, keep: int) -> Iterator[Path]:
        """The staging directory of checkpoint ``step`` for the block to fill (:meth:`write_checkpoint`,
        and, in a distributed run, every rank's optimizer shard under ``OPTIMIZER_DIR``). When the
        block succeeds the checkpoint is synced and renamed into place, ``latest`` points at it and
        all but the newest ``keep`` of the checkpoints before it are removed (later ones, left by a
        damaged checkpoint that was skipped, stay); when it fails the staging directory goes and
        the previous checkpoints stay as they were. Holds the lock throughout."""
        target = self.checkpoint_dir(step)
        with self.lock():
            with staged_directory(target) as staging:
                yield staging
            self._point_latest_at(target)
            earlier = [p for p in self.checkpoints() if _step_of(p) < step]
            for path in earlier[: max(0, len(earlier) - (keep - 1))]:
                remove_directory(path)

    @staticmethod
    def write_checkpoint(
        staging: Path, weights: dict[str, torch.Tensor], config: GLMConfig, trainer_state: dict[str, Any], *,
        tokenizer_sha256: str,
    ) -> None:
        """Writes the model (``weights`` of a ``config`` model, in the ``glm_ext.checkpoint`` format) and
        ``trainer_state`` into ``staging``, then the manifest: the checksums of the trainer state and of
        the optimizer files already there. The last step of filling :meth:`staged_checkpoint`."""
        save_checkpoint(weights, staging / MODEL_DIR, config=config, metadata={TOKENIZER_SHA256: tokenizer_sha256})
        with open(staging / STATE_FILE, "wb") as out:
            torch.save(trainer_state, out)
        optimizer = sorted(str(p.relative_to(staging)) for p in (staging / OPTIMIZER_DIR).rglob("*") if p.is_file())
        write_manifest(staging, [STATE_FILE, *optimizer])

    def _point_latest_at(self, checkpoint: Path) -> None:
        if self.latest_file.is_dir() and not self.latest_file.is_symlink():
            os.rmdir(self.latest_file)  # only an empty one: anything else stays (and the write fails)
        write_file_atomically(self.latest_file, lambda f: f.write(checkpoint.name + "\n"))

    # ----- reading ------------------------------------------------------------------------------

    def _latest_name(self) -> str | None:
        """What ``latest`` names, or None when it is missing, not a file or not a checkpoint name."""
        try:
            name = self.latest_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if _CHECKPOINT_NAME.fullmatch(name) else None

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint directory (``checkpoints/step-N``) that ``latest`` names or, when ``latest``
        is missing or names no checkpoint, the newest one present (with a :class:`ResumeWarning`);
        None when there are none. Its files are checked when it is loaded."""
        name = self._latest_name()
        if name is not None and (self.checkpoints_dir / name).is_dir():
            return self.checkpoints_dir / name
        present = self.checkpoints()
        if not present:
            return None
        warnings.warn(f"{self.latest_file} is missing or names no checkpoint; using the newest one, {present[-1]}",
                      ResumeWarning, stacklevel=2)
        return present[-1]

    def load_checkpoint(self, path: Path, *, map_location: str | torch.device = "cpu") -> tuple[GLMModel, dict]:
        """(model, trainer state) of the checkpoint directory ``path``, its files verified first (the
        optimizer state stays in ``path / OPTIMIZER_DIR``, verified too).

        Raises :class:`~glm_ext.files.CorruptFileError` or FileNotFoundError naming the damaged or
        missing file.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        verify_manifest(path, required=[STATE_FILE])
        model = load_checkpoint(path / MODEL_DIR, map_location=map_location)
        return model, _read_trainer_state(path / STATE_FILE)

    def load_newest_checkpoint(
        self, *, map_location: str | torch.device = "cpu"
    ) -> tuple[Path, GLMModel, dict] | None:
        """(directory, model, trainer state) of the newest intact checkpoint, or None when the run
        has none; ``latest`` is pointed at it. Damaged newer checkpoints are skipped with a
        :class:`ResumeWarning`; when every checkpoint is damaged, ValueError (a run is never silently
        restarted over its checkpoints)."""
        present = self.checkpoints()
        latest = self._latest_name()
        if not present:
            if self.latest_file.exists():
                warnings.warn(f"{self.latest_file} exists but {self.checkpoints_dir} holds no checkpoint; "
                              "starting from step 0", ResumeWarning, stacklevel=2)
            return None
        problems = []
        for path in reversed(present):
            try:
                model, state = self.load_checkpoint(path, map_location=map_location)
            except (CorruptFileError, FileNotFoundError) as exc:
                problems.append(str(exc))
                warnings.warn(f"skipping checkpoint {path}: {exc}", ResumeWarning, stacklevel=2)
                continue
            if latest is None or not (self.checkpoints_dir / latest).is_dir():
                warnings.warn(f"{self.latest_file} is missing or damaged; resuming from the newest intact "
                              f"checkpoint, {path}", ResumeWarning, stacklevel=2)
            if latest != path.name:
                with self.lock():
                    self._point_latest_at(path)
            return path, model, state
        raise ValueError(
            f"run directory {self.path} holds checkpoints, but none is intact ({'; '.join(problems)}); "
            f"refusing to start again from step 0 over them: move {self.checkpoints_dir} away to start afresh"
        )


def _read_trainer_state(path: Path) -> dict[str, Any]:
    """A trainer state written by :meth:`RunDirectory.write_checkpoint`; only tensors and plain values
    are unpickled (``weights_only=True``, never anything else for our own files)."""
    try:
        with warnings.catch_warnings():  # torch's remarks on foreign pickles: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged bytes fail torch.load in many ways; never advise weights_only=False
        raise CorruptFileError(f"{path} is damaged or not a glm_ext trainer state ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptFileError(f"{path} is not a glm_ext trainer state")
    return state


def check_tokenizer(model_dir: str | os.PathLike, tokenizer_sha256: str, tokenizer_name: str) -> None:
    """ValueError when the checkpoint at ``model_dir`` records that it was trained with another
    tokenizer than the one (``tokenizer_name``) whose fingerprint is ``tokenizer_sha256``."""
    expected = checkpoint_metadata(model_dir).get(TOKENIZER_SHA256)
    if expected is not None and expected != tokenizer_sha256:
        raise ValueError(
            f"tokenizer {tokenizer_name} is not the one {model_dir} was trained with (SHA-256 "
            f"{tokenizer_sha256[:12]}..., the model's tokenizer {expected[:12]}...); use the run's tokenizer.json"
        )


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
