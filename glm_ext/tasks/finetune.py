"""Finetuning through the trainer: cloze classification and seq2seq as
:class:`~glm_ext.training.TrainingTask` s (``glm-ext finetune cloze|seq2seq``).

A finetuning run is a :class:`~glm_ext.training.Trainer` run that starts from a pretrained model
(``Trainer(config, task=..., init_from=model)``) and trains on one of these tasks, so it has what
every run has: atomic checkpoints in its own run directory, exact resume, a clean stop on SIGINT and
SIGTERM, progress, ``metrics.jsonl``, torchrun DDP/FSDP2, gradient accumulation. What the tasks add:

* the data: the training file's examples (:meth:`ClozeTask.read` with ``training=True``, the
  authors' training choices; seq2seq: :func:`~glm_ext.tasks.seq2seq_data.read_seq2seq`), in a new
  random order every epoch (:class:`ExampleOrder`, drawn from the run's seed and the epoch); a step
  takes the next ``batch_size`` examples, which the ranks and micro-batches share out as pretraining
  shares rows (:class:`~glm_ext.data.steps.StepLayout`);
* the loss, averaged over the step's examples (cloze: cross-entropy over the candidate scores,
  :func:`~glm_ext.tasks.cloze.cloze_loss`) or the step's target tokens (seq2seq: the label-smoothed
  cross-entropy on Part B only, :func:`~glm_ext.tasks.seq2seq.seq2seq_loss`);
* the held-out metrics of the dev file at every evaluation, in ``metrics.jsonl``: ``eval_loss``
  (the same loss on the dev examples, no label smoothing) and the task's metrics as ``dev_<name>``
  (percentages: ``dev_accuracy``, ``dev_f1_macro``, ... ; seq2seq: ``eval_accuracy``, the share of
  target tokens predicted right, and, with ``dev_decode``, ``dev_rouge1/2/L`` of that many dev
  examples decoded by beam search);
* ``best_metric``: the model of the best dev value is kept in ``RUN_DIR/best`` (a checkpoint with
  its tokenizer); cloze: the task's first metric; seq2seq: ROUGE-1 with ``dev_decode``, else the
  dev loss. The last state is the run's newest checkpoint, as in any run.

The task settings (:class:`ClozeSettings`, :class:`Seq2SeqSettings`) are saved in every checkpoint
and in ``RUN_DIR/finetune_config.json``; a run resumes only with the same settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from glm_ext.data.steps import StepLayout, batch_to, loss_targets
from glm_ext.progress import Progress
from glm_ext.tasks.cloze import (
    ClozeBatch,
    ClozeExample,
    ClozeTask,
    EncodedCloze,
    build_cloze_batch,
    cloze_forward,
    cloze_loss,
    encode_cloze,
    evaluate_cloze,
)
from glm_ext.tasks.seq2seq import (
    Seq2SeqBatch,
    Seq2SeqLayout,
    collate_seq2seq,
    evaluate_seq2seq,
    seq2seq_loss,
)
from glm_ext.tasks.seq2seq_data import SEQ2SEQ_TASKS, Seq2SeqExample, read_seq2seq

__all__ = [
    "ClozeFinetuning",
    "ClozeSettings",
    "ClozeTrainingBatch",
    "ExampleOrder",
    "Seq2SeqFinetuning",
    "Seq2SeqSettings",
    "settings_from_dict",
]

#: Trainer state key of the task's settings and data order.
STATE_KEY = "finetune"
#: Examples per batch of a held-out pass (teacher-forced rows, cloze scoring is bounded by tokens).
EVAL_BATCH_SIZE = 16


class ExampleOrder:
    """The order in which a run visits ``count`` training examples: epoch ``e`` is a permutation
    drawn from ``(seed, e)``, and :meth:`take` continues across epochs. Its state (epoch, position)
    is what a checkpoint keeps."""

    def __init__(self, count: int, seed: int) -> None:
        if count < 1:
            raise ValueError("finetuning needs at least one training example")
        self.count, self.seed = count, seed
        self.epoch, self.position = 0, 0
        self._permutation = self._draw(0)

    def _draw(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def take(self, n: int) -> list[int]:
        """The next ``n`` example indices."""
        taken: list[int] = []
        while len(taken) < n:
            if self.position == self.count:
                self.epoch, self.position = self.epoch + 1, 0
                self._permutation = self._draw(self.epoch)
            step = min(n - len(taken), self.count - self.position)
            taken += self._permutation[self.position : self.position + step].tolist()
            self.position += step
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["count"] != self.count:
            raise ValueError(f"cannot resume: the checkpoint's training data had {state['count']} examples, this "
                             f"file gives {self.count}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._permutation = self._draw(self.epoch)


# --------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class ClozeSettings:
    """A cloze finetuning run's task: ``task`` (a SuperGLUE task or ``custom``, see
    :func:`glm_ext.tasks.cloze_task` for the pattern fields), the ``train`` and ``dev`` files,
    ``max_length`` (tokens per row; None: the model's ``max_sequence_length``), ``length_penalty``
    (None: the task's) and the ``pretrained`` model it starts from."""

    task: str
    train: str
    dev: str | None = None
    pretrained: str | None = None
    pattern_id: int | None = None
    pattern: str | None = None
    pattern_function: str | None = None
    verbalizer: dict[str, str] = dataclasses.field(default_factory=dict)
    label_field: str = "label"
    max_length: int | None = None
    length_penalty: float | None = None

    mode = "cloze"

    def cloze_task(self) -> ClozeTask:
        from glm_ext.tasks import cloze_task
        from glm_ext.tasks.custom import load_callable

        if self.pattern is not None and self.pattern_function is not None:
            raise ValueError("give a pattern or a pattern function, not both")
        pattern = load_callable(self.pattern_function) if self.pattern_function else self.pattern
        return cloze_task(self.task, pattern_id=self.pattern_id, pattern=pattern, verbalizer=self.verbalizer,
                          label_field=self.label_field)


@dataclasses.dataclass(frozen=True)
class Seq2SeqSettings:
    """A seq2seq finetuning run's task: the ``train`` and ``dev`` files, the ``layout`` (task,
    source and target lengths, mask token), ``label_smoothing``, ``dev_decode`` (dev examples
    decoded for ROUGE at each evaluation; 0: none), ``generation`` (the
    :class:`~glm_ext.generation.GenerationConfig` fields of that decoding that replace the task's
    beam search, :meth:`~glm_ext.tasks.seq2seq.Seq2SeqLayout.decoding`) and the ``pretrained``
    model it starts from."""

    train: str
    dev: str | None = None
    pretrained: str | None = None
    layout: Seq2SeqLayout = Seq2SeqLayout.for_task("summarization")
    label_smoothing: float = 0.0
    dev_decode: int = 0
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)

    mode = "seq2seq"

    def __post_init__(self) -> None:
        if isinstance(self.layout, dict):
            object.__setattr__(self, "layout", Seq2SeqLayout(**self.layout))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.dev_decode < 0:
            raise ValueError(f"dev_decode must be >= 0, got {self.dev_decode}")
        if self.dev_decode and self.dev is None:
            raise ValueError("dev_decode decodes dev examples: give a dev file")

    def generation_config(self):
        from glm_ext.generation import GenerationConfig

        return GenerationConfig(**self.layout.decoding(self.generation))


def settings_to_dict(settings: ClozeSettings | Seq2SeqSettings) -> dict[str, Any]:
    """The settings as JSON values, with their ``mode``."""
    return {"mode": settings.mode, **dataclasses.asdict(settings)}


def settings_from_dict(values: dict[str, Any]) -> ClozeSettings | Seq2SeqSettings:
    """The inverse of :func:`settings_to_dict` (``RUN_DIR/finetune_config.json``)."""
    values = dict(values)
    kinds = {"cloze": ClozeSettings, "seq2seq": Seq2SeqSettings}
    mode = values.pop("mode", None)
    if mode not in kinds:
        raise ValueError(f"finetuning settings need a mode of {', '.join(kinds)}, got {mode!r}")
    return kinds[mode](**values)


# --------------------------------------------------------------------------------------------
# What the two tasks share: the data order, the state, the shares of a step


class _ExampleTask:
    """A finetuning task over a list of training examples (see the module docstring)."""

    best_metric: tuple[str, str] | None = None

    def __init__(self, settings: ClozeSettings | Seq2SeqSettings, tokenizer, num_train: int, seed: int) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.order = ExampleOrder(num_train, seed)

    def step_indices(self, layout: StepLayout) -> list[list[int]]:
        """This rank's micro-batches of the next step, as training example indices."""
        indices = self.order.take(layout.rows_per_step)
        mine = indices[layout.first_row : layout.first_row + layout.rows_per_rank]
        size = layout.micro_batch_size
        return [mine[start : start + size] for start in range(0, len(mine), size)]

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: {"settings": settings_to_dict(self.settings), "order": self.order.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if STATE_KEY not in state:
            raise ValueError("cannot resume: the run directory holds a pretraining run, not a finetuning one; choose "
                             "another output directory")
        saved = state[STATE_KEY]["settings"]
        current = settings_to_dict(self.settings)
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
            raise ValueError(f"cannot resume: the checkpoint was finetuned with other task settings ({details}); "
                             "start a new run (another output directory) for other ones")
        self.order.load_state_dict(state[STATE_KEY]["order"])


# --------------------------------------------------------------------------------------------
# Cloze


@dataclasses.dataclass(frozen=True)
class ClozeTrainingBatch:
    """The rows and picks of some training examples (:class:`~glm_ext.tasks.cloze.ClozeBatch`),
    ``loss_mask [E]`` (ones: the loss units are the examples) and the real (unpadded) tokens of
    its rows."""

    cloze: ClozeBatch
    loss_mask: torch.Tensor
    real_tokens: int

    def to(self, device) -> ClozeTrainingBatch:
        return ClozeTrainingBatch(self.cloze.to(device), self.loss_mask.to(device), self.real_tokens)


def _row_tokens(example: EncodedCloze) -> int:
    if example.multi_token:
        return sum(len(example.part_a) + len(answer) for answer in example.answers)
    return len(example.part_a) + 1


class ClozeFinetuning(_ExampleTask):
    """Cloze classification finetuning (module docstring): the training examples encoded once in
    the authors' layouts (:func:`~glm_ext.tasks.cloze.encode_cloze`), all candidates of a
    micro-batch scored in one forward pass."""

    def __init__(self, settings: ClozeSettings, tokenizer, *, max_sequence_length: int, seed: int = 0,
                 max_tokens: int = 4096) -> None:
        self.task = settings.cloze_task()
        self.max_length = settings.max_length or max_sequence_length
        if self.max_length > max_sequence_length:
            raise ValueError(f"max_length {self.max_length} exceeds the model's max_sequence_length "
                             f"{max_sequence_length}")
        examples = self.task.read(settings.train, training=True)
        if not examples:
            raise ValueError(f"{settings.train} gives no training examples for {self.task.name} (WSC trains on the "
                             "records labelled True only)")
        unlabelled = next((x for x in examples if x.target is None), None)
        if unlabelled is not None:
            raise ValueError(f"{unlabelled.source}: a training example needs its label")
        self.train = [encode_cloze(tokenizer, x, max_length=self.max_length, multi_token=self.task.multi_token)
                      for x in examples]
        self.dev: list[ClozeExample] = self.task.read(settings.dev) if settings.dev else []
        self.length_penalty = self.task.length_penalty if settings.length_penalty is None else settings.length_penalty
        self.max_tokens = max_tokens
        super().__init__(settings, tokenizer, len(self.train), seed)

    def next_batches(self, layout: StepLayout, device: torch.device) -> list[ClozeTrainingBatch]:
        batches = []
        for indices in self.step_indices(layout):
            encoded = [self.train[i] for i in indices]
            batch = ClozeTrainingBatch(build_cloze_batch(encoded, self.tokenizer.special_ids),
                                       torch.ones(len(encoded), dtype=torch.int64), sum(map(_row_tokens, encoded)))
            batches.append(batch.to(device))
        return batches

    def forward(self, model: nn.Module, batch: ClozeTrainingBatch) -> torch.Tensor:
        return cloze_forward(model, batch.cloze, self.length_penalty).scores

    def loss(self, scores: torch.Tensor, batch: ClozeTrainingBatch, normalizer: torch.Tensor) -> torch.Tensor:
        return cloze_loss(scores, batch.cloze.targets, self.task.training_loss, weights=batch.loss_mask,
                          normalizer=normalizer)

    def token_counts(self, batch: ClozeTrainingBatch) -> tuple[torch.Tensor, int, int]:
        positions = batch.cloze.scoring.input_ids.numel()
        return batch.loss_mask.new_tensor(batch.real_tokens), positions, positions

    def evaluate(self, trainer) -> dict[str, float] | None:
        """The dev file scored as ``glm-ext evaluate cloze`` scores it: ``eval_loss`` (the training
        loss over its labelled examples) and the task's metrics as ``dev_<name>``."""
        if not self.dev:
            return None
        with trainer.autocast():
            evaluation = evaluate_cloze(trainer.model, self.tokenizer, self.task, self.dev,
                                        max_length=self.max_length, length_penalty=self.length_penalty,
                                        max_tokens=self.max_tokens)
        labelled = [(x, r) for x, r in zip(evaluation.examples, evaluation.results) if x.target is not None]
        if not labelled:
            return None
        width = max(len(r.scores) for _, r in labelled)
        scores = torch.tensor([list(r.scores) + [-math.inf] * (width - len(r.scores)) for _, r in labelled],
                              dtype=torch.float64)
        targets = torch.tensor([x.target for x, _ in labelled])
        metrics = {"eval_loss": float(cloze_loss(scores, targets, self.task.training_loss))}
        metrics.update({f"dev_{name}": value for name, value in evaluation.metrics.items()})
        if self.best_metric is None and evaluation.metrics:
            self.best_metric = (f"dev_{next(iter(evaluation.metrics))}", "max")
        return metrics


# --------------------------------------------------------------------------------------------
# Seq2seq


def _read_labelled(path: str, layout: Seq2SeqLayout, split: str) -> list[Seq2SeqExample]:
    examples = read_seq2seq(path, layout.task, split=split)
    unlabelled = next((x for x in examples if x.target is None), None)
    if unlabelled is not None:
        field = "question" if SEQ2SEQ_TASKS[layout.task] == "question_generation" else "target"
        raise ValueError(f"{unlabelled.where}: field {field!r} is missing (a finetuning example needs its target)")
    return examples


class Seq2SeqFinetuning(_ExampleTask):
    """Seq2seq finetuning (module docstring): every training example one row of the fixed length
    ``source_length + target_length`` (:meth:`Seq2SeqLayout.training_row`). An XSum split file
    gives its ``train`` split for training and its ``validation`` split for the dev metrics."""

    def __init__(self, settings: Seq2SeqSettings, tokenizer, *, max_sequence_length: int, seed: int = 0) -> None:
        layout = settings.layout
        layout.check_model(max_sequence_length)
        self.rows = [layout.training_row(tokenizer, x) for x in _read_labelled(settings.train, layout, "train")]
        self.dev = _read_labelled(settings.dev, layout, "validation") if settings.dev else []
        self.dev_rows = [layout.training_row(tokenizer, x) for x in self.dev]
        self.generation = settings.generation_config() if settings.dev_decode else None
        if self.dev:
            self.best_metric = ("dev_rouge1", "max") if settings.dev_decode else ("eval_loss", "min")
        super().__init__(settings, tokenizer, len(self.rows), seed)

    def next_batches(self, layout: StepLayout, device: torch.device) -> list[Seq2SeqBatch]:
        return [batch_to(collate_seq2seq([self.rows[i] for i in indices]), device)
                for indices in self.step_indices(layout)]

    def forward(self, model: nn.Module, batch: Seq2SeqBatch) -> torch.Tensor:
        """The logits of the target (Part B) positions only (``[N, vocab]``)."""
        return model(batch.input_ids, batch.position_ids, batch.sep, logits_mask=batch.loss_mask != 0)

    def loss(self, logits: torch.Tensor, batch: Seq2SeqBatch, normalizer: torch.Tensor) -> torch.Tensor:
        targets, weights = loss_targets(batch)
        return seq2seq_loss(logits, targets, weights, self.settings.label_smoothing, normalizer=normalizer)

    def token_counts(self, batch: Seq2SeqBatch) -> tuple[torch.Tensor, int, int]:
        pad = self.tokenizer.special_ids.pad
        real = ((batch.input_ids != pad) & (batch.loss_mask == 0)).sum() + batch.loss_mask.sum()
        return real, batch.input_ids.numel(), batch.input_ids.numel()

    def evaluate(self, trainer) -> dict[str, float] | None:
        """``eval_loss`` and ``eval_accuracy`` over the dev targets (teacher-forced, no label
        smoothing) and, with ``dev_decode``, ``dev_rouge1/2/L`` of the first ``dev_decode`` dev
        examples decoded."""
        if not self.dev:
            return None
        sums = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # loss * tokens, right tokens
        count = 0
        chunks = range(0, len(self.dev_rows), EVAL_BATCH_SIZE)
        with Progress("dev", len(chunks), unit="batch", log=trainer.log, leave=False) as progress:
            for start in chunks:
                batch = batch_to(collate_seq2seq(self.dev_rows[start : start + EVAL_BATCH_SIZE]), trainer.device)
                logits = trainer.logits(batch)
                tokens = int(batch.loss_mask.sum())
                targets, weights = loss_targets(batch)
                right = (logits.argmax(-1) == targets).sum()
                loss = seq2seq_loss(logits, targets, weights).double()
                sums += torch.stack([loss * tokens, right.double()])
                count += tokens
                progress.advance()
        loss, right = (sums / max(count, 1)).tolist()
        metrics = {"eval_loss": loss, "eval_accuracy": right}
        if self.generation is not None:
            examples = self.dev[: self.settings.dev_decode]
            with trainer.autocast():
                decoded = evaluate_seq2seq(trainer.model, self.tokenizer, examples, self.settings.layout,
                                           self.generation)
            metrics.update({f"dev_{name}": value for name, value in decoded.metrics.items()})
        return metrics
