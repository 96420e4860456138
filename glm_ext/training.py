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
from typing import Any, Literal, get_args

import torch

from glm_ext.data import BlankInfillingBatch, BlankInfillingCollator, BlankInfillingConfig, PackedRowStream, TokenFile
from glm_ext.devices import resolve_device
from glm_ext.metrics import MetricsLogger
from glm_ext.model import PRESETS, GLMConfig, GLMModel, PositionEncoding, lm_loss
from glm_ext.progress import Progress, is_main_process
from glm_ext.run_dir import CONFIG_FILE, MODEL_DIR, TOKENIZER_FILE, RunDirectory, check_tokenizer
from glm_ext.stopping import StopSignals
from glm_ext.tokenizer import GLMTokenizer

__all__ = [
    "DTYPES",
    "OBJECTIVE_MIXES",
    "TrainConfig",
    "Trainer",
    "config_field",
    "latest_checkpoint",
    "lr_at",
    "objectives_config",
    "resolve_device",
    "schedule_for_resume",
]

Dtype = Literal["auto", "float32", "float64", "bfloat16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
EVAL_SEED = 1234  # the held-out batches are the same for every run and every seed

# Fields that decide which batches a run sees: a resumed run must keep them.
_RESUME_FIXED = ("batch_size", "max_length", "seed", "objectives", "preset", "model_overrides")
# Fields that shape the learning-rate schedule (see schedule_for_resume).
_SCHEDULE_FIXED = ("lr", "warmup", "min_lr_ratio")

# Named blank-infilling objective mixes (TrainConfig.objectives, glm-ext train --objectives).
OBJECTIVE_MIXES: dict[str, BlankInfillingConfig] = {
    "glm-base": BlankInfillingConfig(),  # GLM-Base/Large: token-level spans only
    "glm-10b": BlankInfillingConfig.glm_10b(),  # 0.5 token / 0.3 sentence / 0.2 document spans
}


# --------------------------------------------------------------------------------------------
# Configuration


def config_field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
                 **cli: Any) -> Any:
    """A :class:`TrainConfig` field documented by ``help`` (``glm-ext train --help`` shows it; the
    options of ``glm-ext train`` are generated from the fields). ``cli`` adds what the command line
    needs beyond the field's type: ``aliases`` (more option names), ``choices``, ``metavar``, ``named``
    (named values of a dataclass field)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; each field's ``help`` (``glm-ext train --help``) says
    what it does. ``to_dict`` / ``from_dict`` (JSON: the run directory's ``train_config.json``,
    ``glm-ext train --config``) round-trip it; ``objectives`` may also be given as the name of a mix
    of ``OBJECTIVE_MIXES`` or as a dict of ``BlankInfillingConfig`` fields.
    """

    train_data: str = config_field(help="training token file prefix (glm-ext prepare-data --output)",
                                   aliases=("--data",), metavar="PREFIX")
    tokenizer: str = config_field(help="the tokenizer.json the token files were made with (checked against "
                                       "them; glm-ext train's default: PREFIX.tokenizer.json)")
    eval_data: str | None = config_field(None, metavar="PREFIX",
                                         help="held-out token file prefix: held-out loss and blank-infilling "
                                              "token accuracy over at most eval_batches batches of its rows")
    output_dir: str = config_field("glm-run", help="the run directory (checkpoints, metrics.jsonl, loss.png); "
                                                   "a run resumes from the newest checkpoint there")
    preset: str = config_field("tiny", choices=tuple(PRESETS),
                               help="model size: a preset of glm_ext.model.PRESETS (listed below); the vocabulary "
                                    "is the tokenizer's, padded to a multiple of 128")
    position_encoding: PositionEncoding = config_field(
        "rotary_2d", help="rotary_2d: ChatGLM's 2D rotary positions (learns faster at small sizes); learned_2d: "
                          "the authors' learned 2D position tables")
    model_overrides: dict[str, Any] = config_field(
        default_factory=dict, metavar="FIELD=VALUE",
        help="GLMConfig fields that replace the preset's, e.g. num_layers=6 hidden_size=256")
    activation_checkpointing: bool = config_field(
        False, help="recompute each layer in the backward pass (less activation memory, one more forward)")
    objectives: BlankInfillingConfig = config_field(
        default_factory=BlankInfillingConfig, named=OBJECTIVE_MIXES, metavar="MIX|FIELD=VALUE",
        help="blank-infilling objectives: a mix (glm-base: token spans only; glm-10b: 0.5 token / "
             "0.3 sentence / 0.2 document spans) and/or BlankInfillingConfig fields, e.g. "
             "objective_probs=0.5,0.3,0.2 mask_ratio=0.2")
    steps: int = config_field(1000, help="train until this optimizer step")
    batch_size: int = config_field(16, help="rows per step")
    max_length: int = config_field(128, help="tokens per blank-infilling row (input rows are shorter: each blank "
                                             "adds two tokens)")
    lr: float = config_field(1e-3, help="peak learning rate: linear warmup, then a cosine decay to "
                                        "min_lr_ratio * lr at lr_schedule_steps")
    min_lr_ratio: float = config_field(0.1, help="the learning rate at the end of the cosine, as a share of lr")
    lr_schedule_steps: int = config_field(
        0, help="the step at which the cosine ends (0: steps); beyond it the learning rate stays at its minimum. "
                "A run resumed with another steps keeps its schedule (this is set to its old length)")
    warmup: int = config_field(100, help="steps of linear learning-rate warmup")
    weight_decay: float = config_field(0.1, help="AdamW weight decay (not on biases and LayerNorm weights)")
    betas: tuple[float, float] = config_field((0.9, 0.95), metavar=("BETA1", "BETA2"), help="AdamW betas")
    grad_clip: float = config_field(1.0, help="clip gradients to this norm (0: no clipping)")
    seed: int = config_field(0, help="seed of the initial weights and the data order")
    log_every: int = config_field(10, help="steps between progress lines and metrics.jsonl lines (0: only at "
                                           "evaluations, checkpoints and the end)")
    eval_every: int = config_field(0, help="steps between held-out evaluations (0: at the end only)")
    eval_batches: int = config_field(8, help="held-out batches per evaluation (at most)")
    save_every: int = config_field(0, help="steps between checkpoints (0: at the end only)")
    keep_checkpoints: int = config_field(2, help="how many of the newest checkpoints stay")
    device: str = config_field("auto", help="auto (CUDA when visible and the extension has CUDA kernels, else "
                                            "the CPU) or a torch device: cpu, cuda, cuda:1, ...")
    dtype: Dtype = config_field("auto", help="auto: bf16 autocast on CUDA, float32 on the CPU; bfloat16: autocast "
                                             "with float32 weights; float64: weights and maths in float64 (tests)")
    compile: bool = config_field(False, help="torch.compile the model")
    tensorboard: bool = config_field(False, help="also write TensorBoard event files to OUTPUT_DIR/tensorboard "
                                                 "(needs the tensorboard package)")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.objectives = objectives_config(self.objectives)
        self.model_overrides = dict(self.model_overrides)
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
        for name, choices in (("preset", tuple(PRESETS)), ("position_encoding", get_args(PositionEncoding))):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.lr_schedule_steps < 0:
            raise ValueError(f"TrainConfig.lr_schedule_steps must be >= 0, got {self.lr_schedule_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")

    @property
    def schedule_steps(self) -> int:
        """The step at which the cosine decay ends (``lr_schedule_steps``, or ``steps`` when 0)."""
        return self.lr_schedule_steps or self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def objectives_config(value: BlankInfillingConfig | str | dict[str, Any]) -> BlankInfillingConfig:
    """``TrainConfig.objectives`` from a ``BlankInfillingConfig``, the name of a mix of
    ``OBJECTIVE_MIXES`` or a dict of ``BlankInfillingConfig`` fields (as JSON holds it)."""
    if isinstance(value, BlankInfillingConfig):
        return value
    if isinstance(value, str):
        if value not in OBJECTIVE_MIXES:
            raise ValueError(f"TrainConfig.objectives: unknown mix {value!r}; choose one of {', '.join(OBJECTIVE_MIXES)}")
        return OBJECTIVE_MIXES[value]
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(BlankInfillingConfig)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"TrainConfig.objectives: unknown BlankInfillingConfig field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        values = dict(value)
        if "objective_probs" in values:
            values["objective_probs"] = tuple(values["objective_probs"])
        return BlankInfillingConfig(**values)
    raise TypeError(f"TrainConfig.objectives must be a BlankInfillingConfig, a mix name or a dict, got {value!r}")


def schedule_for_resume(saved: TrainConfig, config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The configuration a run resumed from a checkpoint trained with ``saved`` continues with, and
    a line saying what changed (None: nothing to say).

    The learning rate of the steps still to come stays exactly the checkpoint's schedule: another
    ``steps`` keeps the schedule's length (``lr_schedule_steps`` is pinned to it; a longer run
    continues at the minimum learning rate, a shorter one stops before the cosine ends). A change of
    ``lr``, ``warmup``, ``min_lr_ratio`` or an explicit other ``lr_schedule_steps`` is refused."""
    length = saved.schedule_steps
    changed = [name for name in _SCHEDULE_FIXED if getattr(saved, name) != getattr(config, name)]
    if config.lr_schedule_steps and config.lr_schedule_steps != length:
        changed.append("lr_schedule_steps")
    if changed:
        details = ", ".join(
            f"{name}: {getattr(saved, name) if name != 'lr_schedule_steps' else length!r} -> {getattr(config, name)!r}"
            for name in changed)
        raise ValueError(f"cannot resume: the checkpoint's learning-rate schedule would change ({details}); a run "
                         "keeps its schedule: start a new run (another output_dir) to train with another one")
    if config.schedule_steps == length:
        return config, None
    pinned = dataclasses.replace(config, lr_schedule_steps=length)
    if saved.steps == config.steps:
        return pinned, None
    min_lr = config.lr * config.min_lr_ratio
    after = (f"steps {length + 1}-{config.steps} run at the minimum learning rate {min_lr:.2e}"
             if config.steps > length else f"the run ends at step {config.steps}, before the cosine does")
    return pinned, (f"steps changed from {saved.steps} to {config.steps}: the learning-rate schedule stays the "
                    f"checkpoint's (warmup {config.warmup}, cosine to {min_lr:.2e} at step {length}); {after}")


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
        self.history: list[dict[str, float]] = []  # per step: loss, lr, grad_norm, tokens, padding
        # ([loss, grad norm, padding tokens] on the device, lr, tokens) of steps not yet read back
        self._pending: list[tuple[torch.Tensor, float, int]] = []
        self._log_window: list[dict[str, float]] = []  # history entries not logged yet
        self._window_start = time.perf_counter()
        self.metrics = MetricsLogger(self.run_dir, tensorboard=config.tensorboard)
        self._progress: Progress | None = None  # while fit() runs

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
        config = GLMConfig.preset(self.config.preset, **{
            "vocab_size": self.tokenizer.padded_vocab_size, "position_encoding": self.config.position_encoding,
            **self.config.model_overrides,
        })
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
        model = GLMModel(self.model_config(), activation_checkpointing=self.config.activation_checkpointing)
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
        return lr_at(step, lr=c.lr, warmup=c.warmup, total_steps=c.schedule_steps, min_lr=c.lr * c.min_lr_ratio)

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
        padding = (batch.tokens == self.tokenizer.special_ids.pad).sum()
        self._pending.append((torch.stack([loss.double(), grad_norm.double(), padding.double()]), lr,
                              int(batch.tokens.numel())))
        return loss

    def _flush_pending(self) -> list[dict[str, float]]:
        """Moves the losses of the steps since the last call into ``history`` (one device sync)."""
        if not self._pending:
            return []
        values = torch.stack([v for v, _, _ in self._pending]).tolist()
        first = self.step - len(self._pending) + 1
        entries = [
            {"step": first + i, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens, "padding": padding}
            for i, ((loss, norm, padding), (_, lr, tokens)) in enumerate(zip(values, self._pending))
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
    def evaluate(self) -> dict[str, float] | None:
        """The held-out metrics over all Part B tokens of the held-out batches (None without
        ``eval_data``): ``eval_loss``, the mean cross-entropy, and ``eval_accuracy``, the share of
        tokens whose most likely prediction (teacher-forced) is the target."""
        batches = self.eval_batches()
        if not batches:
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss * tokens, right tokens
        count = 0
        with Progress("held-out", len(batches), unit="batch", log=self.log, leave=False) as progress:
            for batch in batches:
                batch = batch.to(self.device)
                tokens = int(batch.loss_mask.sum())
                with self.autocast():
                    logits = self.model_fn(batch.tokens, batch.position_ids, batch.sep)
                right = ((logits.argmax(-1) == batch.targets) & batch.loss_mask.bool()).sum()
                sums += torch.stack([lm_loss(logits, batch.targets, batch.loss_mask).double() * tokens, right.double()])
                count += tokens
                progress.advance()
        loss, right = (sums / max(count, 1)).tolist()
        return {"eval_loss": loss, "eval_accuracy": right}

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
        self.config, note = schedule_for_resume(saved, self.config)
        if note:
            self._say(note)
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
        self.log_metrics()  # the steps since the last metrics line, so that the checkpoint has them all
        self.metrics.sync()
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

    def _say(self, line: str) -> None:
        """Prints a line that is not progress: above the progress bar, and only on the main process."""
        if self._progress is not None:
            self._progress.write(line)
        elif is_main_process():
            self.log(line)

    def log_metrics(self, *, evaluate: bool = False) -> dict[str, Any] | None:
        """Ends a logging window: appends the metrics of this step (the training steps since the
        previous line and, with ``evaluate``, the held-out metrics) to ``metrics.jsonl`` and shows
        them. Returns the record (None when there was nothing to log)."""
        self._flush_pending()
        window, self._log_window = self._log_window, []
        record: dict[str, Any] = {"step": self.step}
        parts = []
        if window:
            seconds = time.perf_counter() - self._window_start
            tokens = sum(e["tokens"] for e in window)
            norm = window[-1]["grad_norm"]
            record.update(
                loss=sum(e["loss"] for e in window) / len(window), lr=window[-1]["lr"],
                grad_norm=None if math.isnan(norm) else norm, tokens_per_second=tokens / max(seconds, 1e-9),
                tokens_seen=self.tokens_seen, padding_share=sum(e["padding"] for e in window) / tokens,
            )
            parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
            parts += [] if record["grad_norm"] is None else [f"grad norm {norm:.2f}"]
            parts += [f"{record['tokens_per_second']:,.0f} tokens/s"]
        held_out = self.evaluate() if evaluate else None
        if held_out is not None:
            record.update(held_out)
        if len(record) == 1:
            return None
        record["wall_time"] = time.time()
        self.metrics.log(record)
        if parts and self._progress is not None:
            self._progress.report(*parts)
        elif parts:
            self._say(" | ".join([f"step {self.step}/{self.config.steps}", *parts]))
        if held_out is not None:
            self._say(held_out_line(self.step, held_out))
        self._window_start = time.perf_counter()  # evaluating and saving do not count as training time
        return record

    def fit(self, *, evaluate_first: bool = True, stop: StopSignals | None = None) -> dict[str, Any]:
        """Trains until ``config.steps`` (from the current step: 0, or where :meth:`resume` left),
        logging, evaluating and saving as configured; the end always evaluates and saves. A run
        that is already complete trains, evaluates and saves nothing (the summary says ``complete``).
        Holds the run directory's lock throughout.

        ``stop`` (default: a :class:`~glm_ext.stopping.StopSignals` installed for the call) is asked
        before every step; when it says stop, the run saves and returns at once (no evaluation).
        Progress goes to a progress bar or lines (:class:`~glm_ext.progress.Progress`), the metrics
        of every logged step to ``metrics.jsonl`` (:class:`~glm_ext.metrics.MetricsLogger`).

        Returns a summary: ``step``, ``eval_loss_before`` / ``eval_accuracy_before`` (when
        evaluated first, at step 0), ``eval_loss`` / ``eval_accuracy``, ``train_loss`` (mean of the
        last logging window), ``seconds``, ``tokens_per_second``, ``checkpoint``, ``complete``,
        ``stopped`` (whether a stop was requested).
        """
        with self.run_dir.lock(), contextlib.ExitStack() as stack:
            stop = stop or stack.enter_context(StopSignals())
            self._write_run_files()  # at once: a damaged copy is repaired even when no step is left to do
            return self._fit(evaluate_first, stop)

    def _fit(self, evaluate_first: bool, stop: StopSignals) -> dict[str, Any]:
        c = self.config
        summary: dict[str, Any] = {"start_step": self.step, "complete": self.step >= c.steps, "stopped": False}
        if summary["complete"]:
            self._say(f"{c.output_dir} holds a complete run: step {self.step} of {c.steps}; nothing to train "
                      "(a larger steps trains on)")
            summary.update(step=self.step, checkpoint=self.run_dir.latest_checkpoint())
            return summary
        self.metrics.start(self.step)
        record = None
        with Progress("step", c.steps, initial=self.step, unit="step", log=self.log) as self._progress:
            try:
                if evaluate_first and self.step == 0 and self.eval_file is not None:
                    before = self.evaluate()
                    summary.update(eval_loss_before=before["eval_loss"], eval_accuracy_before=before["eval_accuracy"])
                    self._say(held_out_line(self.step, before))
                start, tokens_then = time.perf_counter(), self.tokens_seen
                self._window_start = start
                window = max(1, c.log_every)
                while self.step < c.steps and not stop.requested():
                    self.train_step(self.next_batch())
                    self._progress.advance()
                    last = self.step == c.steps
                    evaluate = last or bool(c.eval_every and self.step % c.eval_every == 0)
                    save = bool(c.save_every and self.step % c.save_every == 0) and not last
                    if last or evaluate or save or (c.log_every and self.step % c.log_every == 0):
                        record = self.log_metrics(evaluate=evaluate and self.eval_file is not None)
                    if save:
                        self._say(f"saved {self.save()}")
                summary["stopped"] = stop.requested()
                seconds = time.perf_counter() - start
                if self.saved_step != self.step:
                    summary["checkpoint"] = self.save()
                    self._say(f"saved {summary['checkpoint']}")
                else:
                    summary["checkpoint"] = self.run_dir.checkpoint_dir(self.step)
                if summary["stopped"]:
                    self._say(f"stopped at step {self.step} as asked: run the same command again to resume")
            finally:
                self._progress = None
                self.metrics.close()
        recent = [e["loss"] for e in self.history[-window:]]
        summary.update(
            step=self.step,
            train_loss=sum(recent) / len(recent) if recent else None,
            seconds=seconds,
            tokens_per_second=(self.tokens_seen - tokens_then) / max(seconds, 1e-9),
        )
        if record is not None and "eval_loss" in record:
            summary.update(eval_loss=record["eval_loss"], eval_accuracy=record["eval_accuracy"])
        return summary


def held_out_line(step: int, metrics: dict[str, float]) -> str:
    """``held-out loss at step 40: 5.1234 | token accuracy 12.3%``."""
    return f"held-out loss at step {step}: {metrics['eval_loss']:.4f} | token accuracy {metrics['eval_accuracy']:.1%}"
