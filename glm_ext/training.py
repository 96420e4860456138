"""Pretraining a GLM with autoregressive blank infilling: :class:`TrainConfig` and :class:`Trainer`.

The trainer is a set of small steps (build the data, the model and the optimizer; the learning
rate of a step; one training step; the held-out loss; save and resume) that :meth:`Trainer.fit`
strings together. Data are the authors' pretraining rows: :class:`~glm_ext.data.PackedRowStream`
over a token file (``[CLS]`` + the next tokens of the shuffled documents), made into
blank-infilling rows by :class:`~glm_ext.data.BlankInfillingCollator` (GLM_SPEC section 1).

The run directory (``TrainConfig.output_dir``) is laid out and written by :mod:`glm_ext.run_dir`:
checkpoints appear atomically, so a crash at any point leaves the previous checkpoint intact, and
one trainer at a time holds the directory (:meth:`~glm_ext.run_dir.RunDirectory.lock`). SIGINT and
SIGTERM stop :meth:`Trainer.fit` after the current step with a checkpoint (:mod:`glm_ext.stopping`).
Resuming restores everything that decides the next
steps: a run of N steps and a run of k steps resumed for N - k more give the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glm_ext.data import BlankInfillingBatch, BlankInfillingCollator, BlankInfillingConfig, PackedRowStream, TokenFile
from glm_ext.devices import resolve_device
from glm_ext.model import GLMConfig, GLMModel, lm_loss
from glm_ext.run_dir import CONFIG_FILE, MODEL_DIR, TOKENIZER_FILE, RunDirectory, check_tokenizer
from glm_ext.stopping import StopSignals
from glm_ext.tokenizer import GLMTokenizer

__all__ = [
    "DTYPES",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "lr_at",
    "resolve_device",
]

DTYPES = ("auto", "float32", "float64", "bfloat16")
EVAL_SEED = 1234  # the held-out batches are the same for every run and every seed

# Fields that decide which batches a run sees: a resumed run must keep them.
_RESUME_FIXED = ("batch_size", "max_length", "seed", "objectives", "preset", "model_overrides")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on.

    - ``train_data`` / ``eval_data``: token file prefixes (``glm-ext prepare-data``); ``eval_data``
      (optional) gives the held-out loss, over at most ``eval_batches`` batches of its rows.
    - ``tokenizer``: the ``tokenizer.json`` the token files were made with (checked).
    - ``preset`` and ``model_overrides``: the architecture, ``GLMConfig.preset(preset,
      vocab_size=<the tokenizer's padded size>, **model_overrides)``.
    - ``max_length``: the width of a blank-infilling row (input rows are shorter: each blank adds
      two tokens, see ``BlankInfillingCollator.input_length``).
    - ``lr``: peak learning rate, reached linearly over ``warmup`` steps, then a cosine decay to
      ``min_lr_ratio * lr`` at ``steps``; AdamW with ``betas`` and ``weight_decay`` (not on biases
      and LayerNorms); gradients clipped to norm ``grad_clip`` (0: no clipping).
    - ``log_every``, ``eval_every``, ``save_every``: in steps (0: never; the end of the run always
      saves and evaluates); ``keep_checkpoints``: how many of the newest checkpoints stay.
    - ``device``: ``"auto"`` (CUDA when visible and the extension has CUDA kernels, else CPU) or a
      torch device string. ``dtype``: ``"auto"`` (bf16 autocast on CUDA, float32 on the CPU),
      ``"float32"``, ``"bfloat16"`` (autocast, float32 weights) or ``"float64"`` (weights and
      maths in float64: exact comparisons in tests). ``compile``: ``torch.compile`` the model.
    """

    train_data: str
    tokenizer: str
    eval_data: str | None = None
    output_dir: str = "glm-run"
    preset: str = "tiny"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    objectives: BlankInfillingConfig = dataclasses.field(default_factory=BlankInfillingConfig)
    steps: int = 1000
    batch_size: int = 16
    max_length: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    keep_checkpoints: int = 2
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if isinstance(self.objectives, dict):
            values = dict(self.objectives)
            values["objective_probs"] = tuple(values.get("objective_probs", (1.0, 0.0, 0.0)))
            self.objectives = BlankInfillingConfig(**values)
        positive = ("steps", "batch_size", "eval_batches", "keep_checkpoints")
        non_negative = ("warmup", "log_every", "eval_every", "save_every", "weight_decay", "grad_clip")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in non_negative:
            if not 0 <= getattr(self, name) < math.inf:  # NaN too (it compares false, e.g. a NaN grad_clip never clips)
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def lr_at(step: int, *, lr: float, warmup: int, total_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup`` during
    the warmup, then a cosine from ``lr`` (at ``step == warmup``) down to ``min_lr`` (at
    ``step == total_steps``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype or None)."""
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.float32, torch.bfloat16 if use_bf16 else None
    if dtype == "bfloat16":
        return torch.float32, torch.bfloat16
    return {"float32": torch.float32, "float64": torch.float64}[dtype], None


# --------------------------------------------------------------------------------------------
# Files


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run (``checkpoints/step-N``), or None."""
    return RunDirectory(output_dir).latest_checkpoint()


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains a GLM as ``config`` says. ``log`` receives the progress lines (default: ``print``).

    ``Trainer(config).fit()`` trains from scratch; call :meth:`resume` first to continue the
    newest checkpoint of ``config.output_dir``. The small steps are public so that scripts and
    tests can drive them: :meth:`next_batch`, :meth:`train_step`, :meth:`evaluate`, :meth:`save`.
    """

    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.device = resolve_device(config.device)
        self.param_dtype, self.autocast_dtype = _resolve_dtype(config.dtype, self.device)
        self.run_dir = RunDirectory(config.output_dir)
        self.run_dir.check_writable()
        self.tokenizer = GLMTokenizer.from_file(config.tokenizer)
        self.collator = self.build_collator(config.seed)
        self.train_file = self.open_token_file(config.train_data)
        self.stream = PackedRowStream(self.train_file, self.collator.input_length, seed=config.seed)
        self.eval_file = self.open_token_file(config.eval_data) if config.eval_data else None
        self._eval_batches: list[BlankInfillingBatch] | None = None
        self.model = self.build_model()
        self.model_fn = torch.compile(self.model) if config.compile else self.model
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.saved_step: int | None = None  # the step of the checkpoint that holds the current state
        self.history: list[dict[str, float]] = []  # per step: loss, lr, grad_norm
        self._pending: list[tuple[torch.Tensor, float]] = []  # ([loss, grad norm] on the device, lr)
        self._log_window: list[dict[str, float]] = []  # history entries not logged yet
        self._window_start = (time.perf_counter(), 0)

    # ----- building -----------------------------------------------------------------------------

    def build_collator(self, seed: int) -> BlankInfillingCollator:
        return BlankInfillingCollator(self.tokenizer, self.config.max_length, config=self.config.objectives, seed=seed)

    def open_token_file(self, prefix: str) -> TokenFile:
        """The token file at ``prefix``, checked against the tokenizer."""
        token_file = TokenFile(prefix)
        if token_file.metadata.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise ValueError(
                f"token file {prefix!r} was made with a different tokenizer than {self.config.tokenizer!r}"
            )
        return token_file

    def model_config(self) -> GLMConfig:
        config = GLMConfig.preset(
            self.config.preset, **{"vocab_size": self.tokenizer.padded_vocab_size, **self.config.model_overrides}
        )
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
                             f"({self.tokenizer.vocab_size})")
        if self.config.max_length - 1 > config.max_sequence_length:
            raise ValueError(
                f"max_length {self.config.max_length} needs positions up to {self.config.max_length - 1}, but the "
                f"model's max_sequence_length is {config.max_sequence_length}"
            )
        return config

    def build_model(self) -> GLMModel:
        """A freshly initialised model (seeded by ``config.seed``) on the device, in the weight dtype."""
        torch.manual_seed(self.config.seed)
        model = GLMModel(self.model_config())
        return model.to(device=self.device, dtype=self.param_dtype)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; matrices and embeddings decay, biases and LayerNorm weights do not (as the authors)."""
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            (no_decay if parameter.ndim < 2 or "layernorm" in name else decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)

    # ----- one step -----------------------------------------------------------------------------

    def lr_schedule(self, step: int) -> float:
        c = self.config
        return lr_at(step, lr=c.lr, warmup=c.warmup, total_steps=c.steps, min_lr=c.lr * c.min_lr_ratio)

    def next_batch(self) -> BlankInfillingBatch:
        """The next ``batch_size`` rows of the stream as a blank-infilling batch, on the device."""
        rows = [self.stream.next_row() for _ in range(self.config.batch_size)]
        return self.collator(rows).to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss(self, batch: BlankInfillingBatch) -> torch.Tensor:
        """The blank-infilling loss (mean over Part B tokens) of a batch."""
        with self.autocast():
            logits = self.model_fn(batch.tokens, batch.position_ids, batch.sep)
        return lm_loss(logits, batch.targets, batch.loss_mask)

    def train_step(self, batch: BlankInfillingBatch) -> torch.Tensor:
        """Forward, loss, backward, clipping and an optimizer step at this step's learning rate.
        Returns the loss (a detached device tensor: reading it waits for the device)."""
        self.model.train()
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        grad_norm = loss.new_full((), math.nan)
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip).detach()
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += int(batch.tokens.numel())
        self._pending.append((torch.stack([loss.double(), grad_norm.double()]), lr))
        return loss

    def _flush_pending(self) -> list[dict[str, float]]:
        """Moves the losses of the steps since the last call into ``history`` (one device sync)."""
        if not self._pending:
            return []
        values = torch.stack([v for v, _ in self._pending]).tolist()
        first = self.step - len(self._pending) + 1
        entries = [
            {"step": first + i, "loss": loss, "lr": lr, "grad_norm": norm}
            for i, ((loss, norm), (_, lr)) in enumerate(zip(values, self._pending))
        ]
        self._pending = []
        self.history.extend(entries)
        self._log_window.extend(entries)
        bad = [e["step"] for e in entries if not math.isfinite(e["loss"])]
        if bad:
            raise FloatingPointError(f"the training loss is not finite at step(s) {bad}; lower the learning rate")
        return entries

    # ----- evaluation ---------------------------------------------------------------------------

    def eval_batches(self) -> list[BlankInfillingBatch]:
        """The held-out batches (drawn once, the same for every evaluation): the eval token file's
        rows in file order, at most ``eval_batches`` batches and about one pass over the file."""
        if self.eval_file is None:
            return []
        if self._eval_batches is None:
            collator = self.build_collator(EVAL_SEED)
            stream = PackedRowStream(self.eval_file, collator.input_length, seed=EVAL_SEED, shuffle=False)
            rows_in_file = math.ceil(self.eval_file.num_tokens / (collator.input_length - 1))
            count = min(self.config.eval_batches, math.ceil(rows_in_file / self.config.batch_size))
            self._eval_batches = [
                collator([stream.next_row() for _ in range(self.config.batch_size)]) for _ in range(count)
            ]
        return self._eval_batches

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The held-out loss: mean cross-entropy over all Part B tokens of the held-out batches
        (None without ``eval_data``)."""
        batches = self.eval_batches()
        if not batches:
            return None
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in batches:
            batch = batch.to(self.device)
            tokens = int(batch.loss_mask.sum())
            total += self.loss(batch).double() * tokens
            count += tokens
        return float(total / max(count, 1))

    # ----- saving and resuming ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that the next steps depend on (plain tensors and values)."""
        self._flush_pending()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "data_stream": self.stream.state_dict(),
            "collator": self.collator.state_dict(),
            "rng": rng,
            "config": self.config.to_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TrainConfig.from_dict(state["config"])
        changed = [name for name in _RESUME_FIXED if getattr(saved, name) != getattr(self.config, name)]
        if changed:
            details = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(self.config, n)!r}" for n in changed)
            raise ValueError(f"cannot resume: the checkpoint was trained with other settings ({details})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data_stream"])
        self.collator.load_state_dict(state["collator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.history = list(state["history"])
        self._pending, self._log_window = [], []

    def save(self) -> Path:
        """Writes ``checkpoints/step-N`` (model and trainer state) atomically, then points
        ``latest`` at it and removes checkpoints beyond the newest ``keep_checkpoints``."""
        state = self.state_dict()
        with self.run_dir.lock():
            self._write_run_files()
            path = self.run_dir.save_checkpoint(self.step, self.model, state, keep=self.config.keep_checkpoints,
                                                tokenizer_sha256=self.tokenizer.sha256)
        self.saved_step = self.step
        return path

    def _write_run_files(self) -> None:
        self.run_dir.write_text(CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        tokenizer_copy = self.run_dir.tokenizer_file
        if not tokenizer_copy.exists() or not tokenizer_copy.samefile(self.config.tokenizer):
            self.run_dir.write_text(TOKENIZER_FILE, Path(self.config.tokenizer).read_text(encoding="utf-8"))

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Continues from ``checkpoint`` (a ``checkpoints/step-N`` directory), by default the newest
        intact one of ``output_dir`` (:meth:`~glm_ext.run_dir.RunDirectory.load_newest_checkpoint`).
        Returns False when there is none to resume from."""
        with self.run_dir.lock():
            if checkpoint is None:
                found = self.run_dir.load_newest_checkpoint()
            else:
                found = (Path(checkpoint), *self.run_dir.load_checkpoint(Path(checkpoint)))
        if found is None:
            return False
        path, saved, state = found
        if saved.config != self.model.config:
            raise ValueError(
                f"cannot resume: {path} holds a model of {saved.config}, this run builds {self.model.config}"
            )
        check_tokenizer(path / MODEL_DIR, self.tokenizer.sha256, self.config.tokenizer)
        self.load_state_dict(state)
        with torch.no_grad():
            self.model.load_state_dict(saved.state_dict())
        self.saved_step = self.step
        return True

    # ----- the loop -----------------------------------------------------------------------------

    def _log_progress(self) -> None:
        self._flush_pending()
        entries, self._log_window = self._log_window, []
        if not entries:
            return
        start, tokens_then = self._window_start
        seconds = time.perf_counter() - start
        rate = (self.tokens_seen - tokens_then) / max(seconds, 1e-9)
        loss = sum(e["loss"] for e in entries) / len(entries)
        norm = entries[-1]["grad_norm"]
        width = len(str(self.config.steps))
        self.log(
            f"step {self.step:>{width}}/{self.config.steps} | loss {loss:.4f} | lr {entries[-1]['lr']:.2e}"
            + ("" if math.isnan(norm) else f" | grad norm {norm:.2f}")
            + f" | {rate:,.0f} tokens/s"
        )
        self._window_start = (time.perf_counter(), self.tokens_seen)

    def fit(self, *, evaluate_first: bool = True, stop: StopSignals | None = None) -> dict[str, Any]:
        """Trains until ``config.steps`` (from the current step: 0, or where :meth:`resume` left),
        logging, evaluating and saving as configured; the end always saves and evaluates. Holds the
        run directory's lock throughout.

        ``stop`` (default: a :class:`~glm_ext.stopping.StopSignals` installed for the call) is asked
        before every step; when it says stop, the run saves and returns at once (no evaluation).

        Returns a summary: ``step``, ``eval_loss_before`` (when evaluated first), ``eval_loss``,
        ``train_loss`` (mean of the last logging window), ``seconds``, ``tokens_per_second``,
        ``checkpoint``, ``stopped`` (whether a stop was requested).
        """
        with self.run_dir.lock(), contextlib.ExitStack() as stack:
            stop = stop or stack.enter_context(StopSignals())
            self._write_run_files()  # at once: a damaged copy is repaired even when no step is left to do
            return self._fit(evaluate_first, stop)

    def _fit(self, evaluate_first: bool, stop: StopSignals) -> dict[str, Any]:
        c = self.config
        summary: dict[str, Any] = {"start_step": self.step}
        if evaluate_first and self.eval_file is not None:
            summary["eval_loss_before"] = loss = self.evaluate()
            self.log(f"held-out loss at step {self.step}: {loss:.4f}")
        start, tokens_then = time.perf_counter(), self.tokens_seen
        self._window_start = (start, self.tokens_seen)
        self._log_window = []
        window = max(1, c.log_every)
        while self.step < c.steps and not stop.requested():
            self.train_step(self.next_batch())
            if (c.log_every and self.step % c.log_every == 0) or self.step == c.steps:
                self._log_progress()
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                self.log(f"held-out loss at step {self.step}: {self.evaluate():.4f}")
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.log(f"saved {self.save()}")
        summary["stopped"] = stop.requested()
        self._flush_pending()
        seconds = time.perf_counter() - start
        if self.saved_step != self.step:
            summary["checkpoint"] = self.save()
            self.log(f"saved {summary['checkpoint']}")
        else:
            summary["checkpoint"] = self.run_dir.checkpoint_dir(self.step)
        if summary["stopped"]:
            self.log(f"stopped at step {self.step} as asked: run the same command again to resume")
        recent = [e["loss"] for e in self.history[-window:]]
        summary.update(
            step=self.step,
            train_loss=sum(recent) / len(recent) if recent else None,
            seconds=seconds,
            tokens_per_second=(self.tokens_seen - tokens_then) / max(seconds, 1e-9),
        )
        if self.eval_file is not None and not summary["stopped"]:
            summary["eval_loss"] = loss = self.evaluate()
            self.log(f"held-out loss at step {self.step}: {loss:.4f}")
        return summary
