"""Pretraining a GLM with autoregressive blank infilling: :class:`TrainConfig` and :class:`Trainer`.

The trainer is a set of small steps (build the data, the model and the optimizer; the learning
rate of a step; one training step; the held-out loss; save and resume) that :meth:`Trainer.fit`
strings together. Data are the authors' pretraining rows: :class:`~glm_ext.data.PackedRowStream`
over a token file (``[CLS]`` + the next tokens of the shuffled documents), made into
blank-infilling rows by :class:`~glm_ext.data.BlankInfillingCollator` (GLM_SPEC section 1).

Several processes (``torchrun ... -m glm_ext train``, :mod:`glm_ext.distributed`) share each step:
``batch_size`` is the global batch, the rows of a step on all processes together, shared out by
:class:`~glm_ext.data.steps.StepLayout` (each rank its own rows, in ``grad_accum`` micro-batches),
and the model is replicated with DDP or sharded with FSDP2 (``parallel``). A step's blanks are drawn
per global row, so the same configuration trains on the same data at any world size and
``grad_accum``: only the rounding (and the dropout masks, drawn per rank) differs.

The run directory (``TrainConfig.output_dir``) is laid out and written by :mod:`glm_ext.run_dir`:
checkpoints appear atomically, so a crash at any point leaves the previous checkpoint intact, and
one trainer at a time holds the directory (:meth:`~glm_ext.run_dir.RunDirectory.lock`; rank 0 holds
it for all ranks). Rank 0 writes the model and the trainer state, every rank its optimizer shard.
SIGINT and SIGTERM stop :meth:`Trainer.fit` after the current step with a checkpoint, on every rank
once any rank got one (:mod:`glm_ext.stopping`). Resuming restores everything that decides the next
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

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from glm_ext.data import BlankInfillingBatch, BlankInfillingCollator, BlankInfillingConfig, PackedRowStream, TokenFile
from glm_ext.data.collate import PackedBatch
from glm_ext.data.steps import StepLayout, batch_logits, batch_to, next_step_batches, pack_batch, real_tokens
from glm_ext.devices import resolve_device
from glm_ext.distributed import (
    accumulate_gradients,
    any_rank,
    apply_ddp,
    apply_fsdp,
    clip_grad_norm,
    current_context,
    full_model_state_dict,
    load_full_model_state_dict,
    load_optimizer_state,
    on_main_process,
    save_optimizer_state,
)
from glm_ext.metrics import MetricsLogger
from glm_ext.model import PRESETS, AttentionBackend, GLMConfig, GLMModel, PositionEncoding, lm_loss
from glm_ext.progress import Progress, is_main_process
from glm_ext.run_dir import CONFIG_FILE, MODEL_DIR, OPTIMIZER_DIR, TOKENIZER_FILE, RunDirectory, check_tokenizer
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
Parallel = Literal["ddp", "fsdp"]
DROPOUTS = ("embedding_dropout", "attention_dropout", "output_dropout")  # the GLMConfig fields TrainConfig.dropout sets
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
    dropout: float = config_field(
        0.0, help="embedding, attention-probability and output dropout (GLMConfig's three *_dropout fields; the "
                  "authors pretrain with 0.1; 0 trains exactly as without dropout; model_overrides may set one "
                  "of them apart)")
    attention_backend: AttentionBackend = config_field(
        "auto", help="auto: the fused mixed_mask_attention kernel wherever it supports the inputs (the CPU; SDPA "
                     "with attention dropout, which only SDPA applies), else SDPA; sdpa, fused or reference: that one")
    activation_checkpointing: bool = config_field(
        False, help="recompute each layer in the backward pass (less activation memory, one more forward)")
    objectives: BlankInfillingConfig = config_field(
        default_factory=BlankInfillingConfig, named=OBJECTIVE_MIXES, metavar="MIX|FIELD=VALUE",
        help="blank-infilling objectives: a mix (glm-base: token spans only; glm-10b: 0.5 token / "
             "0.3 sentence / 0.2 document spans) and/or BlankInfillingConfig fields, e.g. "
             "objective_probs=0.5,0.3,0.2 mask_ratio=0.2")
    steps: int = config_field(1000, help="train until this optimizer step")
    batch_size: int = config_field(16, help="rows per step, all processes together (the global batch): each of "
                                            "the world_size processes trains batch_size / world_size of them, in "
                                            "grad_accum micro-batches; it decides the data, not the world size")
    grad_accum: int = config_field(1, help="micro-batches per step on each process (gradients accumulate, and are "
                                           "reduced over processes once, after the last): less activation memory, "
                                           "the same step")
    max_length: int = config_field(128, help="tokens per blank-infilling row (input rows are shorter: each blank "
                                             "adds two tokens)")
    packing: bool = config_field(False, help="train on packed rows: each micro-batch's samples without their padding "
                                             "in one varlen row (cu_seqlens), for the fused attention; the same "
                                             "loss as padded rows, less work")
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
    parallel: Parallel = config_field(
        "ddp", help="how the processes of torchrun share the model: ddp replicates it (DistributedDataParallel); "
                    "fsdp shards each layer over them (FSDP2, bf16 compute with float32 gradient reduction under "
                    "bf16 autocast); needs torchrun, also for one process. One process without torchrun trains "
                    "the plain model")
    compile: bool = config_field(False, help="torch.compile the model")
    tensorboard: bool = config_field(False, help="also write TensorBoard event files to OUTPUT_DIR/tensorboard "
                                                 "(needs the tensorboard package)")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.objectives = objectives_config(self.objectives)
        self.model_overrides = dict(self.model_overrides)
        positive = ("steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints")
        non_negative = ("warmup", "log_every", "eval_every", "save_every", "weight_decay", "grad_clip")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in non_negative:
            if not 0 <= getattr(self, name) < math.inf:  # NaN too (it compares false, e.g. a NaN grad_clip never clips)
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be a probability in [0, 1), got {self.dropout}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, choices in (("preset", tuple(PRESETS)), ("position_encoding", get_args(PositionEncoding)),
                              ("parallel", get_args(Parallel)), ("attention_backend", get_args(AttentionBackend))):
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
    tests can drive them: :meth:`next_batches`, :meth:`train_step`, :meth:`evaluate`, :meth:`save`.

    In a process group (:func:`~glm_ext.distributed.init_distributed`, as ``glm-ext train`` under
    torchrun does) the trainer is one rank of the run, and :meth:`train_step`, :meth:`evaluate`,
    :meth:`save`, :meth:`resume` and :meth:`fit` are collectives: every rank calls them in turn.
    """

    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.context = current_context(resolve_device(config.device))
        self.device = self.context.device
        self.layout = StepLayout.for_global_batch(config.batch_size, grad_accum=config.grad_accum,
                                                  world_size=self.context.world_size, rank=self.context.rank)
        if config.parallel == "fsdp" and not dist.is_initialized():
            raise ValueError("parallel 'fsdp' (--parallel fsdp) shards the model over the processes of a process "
                             "group, and this process was not started by torchrun: launch it with torchrun "
                             "(torchrun --nproc-per-node 1 ... for one process), or use --parallel ddp")
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
        self.wrapped = self.parallelize(self.model)
        self.model_fn = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.tokens_seen = 0  # real tokens (no padding) of all ranks, up to the last step read back
        self.saved_step: int | None = None  # the step of the checkpoint that holds the current state
        self.history: list[dict[str, float]] = []  # per step: loss, lr, grad_norm, tokens, positions, ...
        # ([loss, grad norm, real tokens] on the device, (positions, positions as padded rows), lr) of the
        # steps not yet read back; the counts are this rank's
        self._pending: list[tuple[torch.Tensor, tuple[int, int], float]] = []
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
            **{name: self.config.dropout for name in DROPOUTS}, **self.config.model_overrides,
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
        """A freshly initialised model (seeded by ``config.seed``: the same on every rank) on the
        device, in the weight dtype."""
        torch.manual_seed(self.config.seed)
        model = GLMModel(self.model_config(), attention_backend=self.config.attention_backend,
                         activation_checkpointing=self.config.activation_checkpointing)
        return model.to(device=self.device, dtype=self.param_dtype)

    def parallelize(self, model: GLMModel) -> nn.Module:
        """``model`` as the processes share it: sharded by FSDP2 (``parallel="fsdp"``, in place),
        wrapped by DDP (several processes), or as it is (one process)."""
        if self.config.parallel == "fsdp":
            return apply_fsdp(model, param_dtype=self.autocast_dtype)
        if self.context.world_size > 1:
            return apply_ddp(model, self.device)
        return model

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

    def next_batches(self) -> list[BlankInfillingBatch | PackedBatch]:
        """This rank's ``grad_accum`` micro-batches of the next step (its share of the step's
        ``batch_size`` rows, :func:`~glm_ext.data.steps.next_step_batches`), each packed into one
        row with ``packing``, on the device."""
        batches = next_step_batches(self.stream, self.collator, self.layout)
        if self.config.packing:
            batches = [pack_batch(batch, pad_id=self.tokenizer.special_ids.pad) for batch in batches]
        return [batch_to(batch, self.device) for batch in batches]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def logits(self, batch: BlankInfillingBatch | PackedBatch) -> torch.Tensor:
        """The model's logits for a padded or packed batch, under the run's autocast."""
        with self.autocast():
            return batch_logits(self.model_fn, batch)

    def train_step(self, batches: list[BlankInfillingBatch | PackedBatch]) -> torch.Tensor:
        """One optimizer step on this rank's micro-batches (:meth:`next_batches`): forward and backward
        of each with the loss averaged over the loss tokens of the whole step, the gradients reduced
        over ranks once (:func:`~glm_ext.distributed.accumulate_gradients`), clipping, and an AdamW
        step at this step's learning rate. Returns the step's loss (a detached device tensor: reading
        it waits for the device)."""
        self.wrapped.train()
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self._seed_dropout()
        loss = accumulate_gradients(self.wrapped, batches, forward=self.logits)
        grad_norm = loss.new_full((), math.nan)
        if self.config.grad_clip > 0:
            grad_norm = clip_grad_norm(self.wrapped, self.config.grad_clip).detach()
        self.optimizer.step()
        self.step += 1
        real = torch.stack([real_tokens(batch) for batch in batches]).sum()
        positions = sum(batch.tokens.numel() for batch in batches)  # what the model computed, padding included
        as_padded_rows = sum(batch.sep.numel() for batch in batches) * self.config.max_length
        self._pending.append((torch.stack([loss.double(), grad_norm.double(), real.double()]),
                              (positions, as_padded_rows), lr))
        return loss

    def _seed_dropout(self) -> None:
        """Seeds this step's dropout masks from (seed, step, rank) alone: a resumed run draws the
        masks the uninterrupted one drew, and the ranks draw different ones."""
        seed = np.random.SeedSequence([self.config.seed, self.step, self.context.rank]).generate_state(1, np.uint64)[0]
        torch.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)

    def _flush_pending(self) -> list[dict[str, float]]:
        """Moves the losses of the steps since the last call into ``history`` (one device sync; in a
        process group, a collective summing the token counts of the ranks)."""
        if not self._pending:
            return []
        values = torch.stack([v for v, _, _ in self._pending])
        positions = values.new_tensor([p for _, p, _ in self._pending])
        counts = torch.cat([values[:, 2:], positions], dim=1)  # real tokens, positions, positions as padded rows
        if dist.is_initialized():
            dist.all_reduce(counts)
        first = self.step - len(self._pending) + 1
        entries = [
            {"step": first + i, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": int(tokens),
             "positions": int(positions), "positions_as_padded_rows": int(as_padded_rows)}
            for i, ((loss, norm), (tokens, positions, as_padded_rows), (_, _, lr))
            in enumerate(zip(values[:, :2].tolist(), counts.tolist(), self._pending))
        ]
        self._pending = []
        self.history.extend(entries)
        self._log_window.extend(entries)
        self.tokens_seen += sum(e["tokens"] for e in entries)
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
        tokens whose most likely prediction (teacher-forced) is the target. Every rank evaluates
        all batches (an FSDP2 forward pass is a collective)."""
        batches = self.eval_batches()
        if not batches:
            return None
        self.wrapped.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss * tokens, right tokens
        count = 0
        with Progress("held-out", len(batches), unit="batch", log=self.log, leave=False) as progress:
            for batch in batches:
                batch = batch.to(self.device)
                tokens = int(batch.loss_mask.sum())
                logits = self.logits(batch)
                right = ((logits.argmax(-1) == batch.targets) & batch.loss_mask.bool()).sum()
                sums += torch.stack([lm_loss(logits, batch.targets, batch.loss_mask).double() * tokens, right.double()])
                count += tokens
                progress.advance()
        loss, right = (sums / max(count, 1)).tolist()
        return {"eval_loss": loss, "eval_accuracy": right}

    # ----- saving and resuming ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights and the optimizer that the next steps depend on (plain
        values; the same on every rank: every rank's stream and collator pass the whole step)."""
        self._flush_pending()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_stream": self.stream.state_dict(),
            "collator": self.collator.state_dict(),
            "config": self.config.to_dict(),
            "history": self.history,
            "world_size": self.context.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TrainConfig.from_dict(state["config"])
        changed = [name for name in _RESUME_FIXED if getattr(saved, name) != getattr(self.config, name)]
        if changed:
            details = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(self.config, n)!r}" for n in changed)
            hint = ("; batch_size is the global batch (all processes together): keep it, and fit another world "
                    "size with grad_accum" if "batch_size" in changed else "")
            raise ValueError(f"cannot resume: the checkpoint was trained with other settings ({details}){hint}")
        self.config, note = schedule_for_resume(saved, self.config)
        if note:
            self._say(note)
        world_size = int(state.get("world_size", 1))
        if world_size != self.context.world_size:
            self._say(f"resuming a checkpoint of {world_size} process(es) on {self.context.world_size}: the model and "
                      "the optimizer state are loaded (resharded); the data order stays the same (batch_size is the "
                      "global batch: every step trains on the rows and blanks it would have), only the rounding and "
                      "the dropout masks (drawn per process) differ")
        self.stream.load_state_dict(state["data_stream"])
        self.collator.load_state_dict(state["collator"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.history = list(state["history"])
        self._pending, self._log_window = [], []

    def save(self) -> Path:
        """Writes ``checkpoints/step-N`` atomically (:meth:`RunDirectory.staged_checkpoint`): the
        whole model and the trainer state (rank 0) and the optimizer (every rank its shard); then
        points ``latest`` at it and removes checkpoints beyond the newest ``keep_checkpoints``."""
        self.log_metrics()  # the steps since the last metrics line, so that the checkpoint has them all
        self.metrics.sync()
        state = self.state_dict()
        weights = full_model_state_dict(self.wrapped)  # the whole model on rank 0
        with contextlib.ExitStack() as checkpoint:  # rank 0: the staged checkpoint, open until all ranks wrote

            def begin() -> Path:
                staging = checkpoint.enter_context(self.run_dir.staged_checkpoint(
                    self.step, keep=self.config.keep_checkpoints))
                self._write_run_files()
                return staging

            staging = on_main_process(begin)
            save_optimizer_state(self.wrapped, self.optimizer, staging / OPTIMIZER_DIR)

            def finish() -> Path:
                self.run_dir.write_checkpoint(staging, weights, self.model.config, state,
                                              tokenizer_sha256=self.tokenizer.sha256)
                checkpoint.close()  # synced, renamed into place; latest; pruning
                return self.run_dir.checkpoint_dir(self.step)

            path = on_main_process(finish)
        self.saved_step = self.step
        return path

    def _write_run_files(self) -> None:
        self.run_dir.write_text(CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        tokenizer_copy = self.run_dir.tokenizer_file
        if not tokenizer_copy.exists() or not tokenizer_copy.samefile(self.config.tokenizer):
            self.run_dir.write_text(TOKENIZER_FILE, Path(self.config.tokenizer).read_text(encoding="utf-8"))

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Continues from ``checkpoint`` (a ``checkpoints/step-N`` directory), by default the newest
        intact one of ``output_dir`` (:meth:`~glm_ext.run_dir.RunDirectory.load_newest_checkpoint`),
        written by any number of processes. Returns False when there is none to resume from.
        Rank 0 reads and checks the checkpoint; the model and the optimizer reach every rank."""
        weights: dict[str, torch.Tensor] = {}  # rank 0's copy of the saved model, broadcast when loaded

        def read() -> tuple[Path, dict[str, Any]] | None:
            with self.run_dir.lock():
                if checkpoint is None:
                    found = self.run_dir.load_newest_checkpoint()
                else:
                    found = (Path(checkpoint), *self.run_dir.load_checkpoint(Path(checkpoint)))
            if found is None:
                return None
            path, saved, state = found
            if saved.config != self.model.config:
                differences = ", ".join(f"{name} {getattr(saved.config, name)!r} -> {value!r}"
                                        for name, value in self.model.config.to_dict().items()
                                        if getattr(saved.config, name) != value)
                raise ValueError(f"cannot resume: {path} holds another model than this run builds ({differences})")
            check_tokenizer(path / MODEL_DIR, self.tokenizer.sha256, self.config.tokenizer)
            self.load_state_dict(state)
            weights.update(saved.state_dict())
            return path, state

        found = on_main_process(read)
        if found is None:
            return False
        path, state = found
        if not self.context.is_main:
            self.load_state_dict(state)
        load_full_model_state_dict(self.wrapped, weights)
        if "optimizer" in state:  # a checkpoint of one process from before the optimizer had its own directory
            if self.wrapped is not self.model or self.config.parallel == "fsdp":
                raise ValueError(f"{path} holds the optimizer state of an older glm_ext, which one process without "
                                 "FSDP reads: resume it once without torchrun")
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_optimizer_state(self.wrapped, self.optimizer, path / OPTIMIZER_DIR)
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
                tokens_seen=self.tokens_seen, padding_share=1 - tokens / sum(e["positions"] for e in window),
            )
            parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
            parts += [] if record["grad_norm"] is None else [f"grad norm {norm:.2f}"]
            parts += [f"{record['tokens_per_second']:,.0f} tokens/s"]
            if self.config.packing:
                as_padded_rows = sum(e["positions_as_padded_rows"] for e in window)
                record["padding_share_without_packing"] = 1 - tokens / as_padded_rows
                parts += [f"padding {record['padding_share']:.1%} ({record['padding_share_without_packing']:.1%} "
                          "without packing)"]
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
        Holds the run directory's lock throughout (rank 0, for all ranks).

        ``stop`` (default: a :class:`~glm_ext.stopping.StopSignals` installed for the call) is asked
        before every step; when it says stop on any rank, every rank saves and returns at once (no
        evaluation).
        Progress goes to a progress bar or lines (:class:`~glm_ext.progress.Progress`), the metrics
        of every logged step to ``metrics.jsonl`` (:class:`~glm_ext.metrics.MetricsLogger`).

        Returns a summary: ``step``, ``eval_loss_before`` / ``eval_accuracy_before`` (when
        evaluated first, at step 0), ``eval_loss`` / ``eval_accuracy``, ``train_loss`` (mean of the
        last logging window), ``seconds``, ``tokens_per_second`` (real tokens, all ranks),
        ``checkpoint``, ``complete``, ``stopped`` (whether a stop was requested).
        """
        with contextlib.ExitStack() as stack:

            def start() -> None:
                stack.enter_context(self.run_dir.lock())
                self._write_run_files()  # at once: a damaged copy is repaired even when no step is left to do

            on_main_process(start)
            # Under torchrun every rank receives a Ctrl-C twice (from the terminal and from torchrun, which
            # forwards it and kills the ranks itself after its --shutdown-timeout): only a lone process aborts.
            stop = stop or stack.enter_context(StopSignals(abort_on_second_interrupt=not dist.is_initialized()))
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
                while self.step < c.steps:
                    summary["stopped"] = any_rank(stop.requested(), self.device)  # every rank stops after one step
                    if summary["stopped"]:
                        break
                    self.train_step(self.next_batches())
                    self._progress.advance()
                    last = self.step == c.steps
                    evaluate = last or bool(c.eval_every and self.step % c.eval_every == 0)
                    save = bool(c.save_every and self.step % c.save_every == 0) and not last
                    if last or evaluate or save or (c.log_every and self.step % c.log_every == 0):
                        record = self.log_metrics(evaluate=evaluate and self.eval_file is not None)
                    if save:
                        self._say(f"saved {self.save()}")
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
