"""Sequence-to-sequence layouts (GLM_SPEC 6.1), the finetuning loss and the evaluation: the source in
Part A with a mask token, the target generated in Part B, the loss on Part B only, optional label
smoothing (THUDM/GLM ``tasks/seq2seq/{dataset,finetune,evaluate}.py``). The data files are read by
:mod:`glm_ext.tasks.seq2seq_data`, finetuning runs through the trainer (:mod:`glm_ext.tasks.finetune`),
and :func:`evaluate_seq2seq` decodes with beam search (:mod:`glm_ext.generation`) and scores ROUGE.

Sources, each padded with ``[pad]`` to ``source_length`` (the padding stays in Part A: ``sep`` is
the padded length, as in the authors' finetuning):

* :func:`summarization_source` (CNN/DailyMail, XSum, Gigaword): ``[CLS]`` + mask + " Content:" +
  " " + article, the article cut to fit;
* :func:`question_generation_source` (SQuAD): ``[CLS]`` + context + " Question:" + mask +
  " Answer: " + answer, a long context cut to a window centred on the answer's first occurrence;
* :func:`extraction_source` (SQuAD answers): ``[CLS]`` + " " + question + mask + "." + " " +
  context, the context cut to fit.

The mask is ``[MASK]``, or ``[sMASK]`` for models pretrained with task masks (the authors' choice).
:func:`training_row` appends Part B = ``<sop>`` + target[:-1] where the target is " " + text's
tokens + ``<eop>``, cut and padded (loss mask 0) to ``target_length``, at the mask's position with
block positions 1, 2, ...; :func:`inference_row` appends ``<sop>`` alone. :class:`Seq2SeqLayout`
holds a task's lengths and mask token and builds both from a :class:`Seq2SeqExample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glm_ext.model import lm_loss
from glm_ext.tasks.metrics import rouge
from glm_ext.tasks.rows import Row, blank_row
from glm_ext.tasks.seq2seq_data import SEQ2SEQ_TASKS, Seq2SeqExample

__all__ = [
    "MASK_TOKENS",
    "TASK_DEFAULTS",
    "Seq2SeqBatch",
    "Seq2SeqEvaluation",
    "Seq2SeqLayout",
    "Seq2SeqRow",
    "collate_seq2seq",
    "evaluate_seq2seq",
    "extraction_source",
    "inference_row",
    "question_generation_source",
    "seq2seq_loss",
    "summarization_source",
    "training_row",
]


def _pad_source(tokens: list[int], source_length: int, pad_id: int) -> list[int]:
    if len(tokens) > source_length:
        raise ValueError(f"the source is {len(tokens)} tokens, longer than source_length={source_length}")
    return tokens + [pad_id] * (source_length - len(tokens))


def summarization_source(tokenizer, article: str, *, source_length: int, mask_token: str = "[MASK]") -> list[int]:
    """``[CLS]`` mask " Content:" " " + article, cut and padded to ``source_length``."""
    special = tokenizer.special_ids
    prompt = [special.cls, tokenizer.token_to_id(mask_token), *tokenizer.encode(" Content:")]
    room = source_length - len(prompt)
    if room < 0:
        raise ValueError(f"source_length={source_length} leaves no room for the prompt ({len(prompt)} tokens)")
    return _pad_source(prompt + tokenizer.encode(" " + article)[:room], source_length, special.pad)


def question_generation_source(
    tokenizer, context: str, answer: str, *, source_length: int, mask_token: str = "[MASK]"
) -> list[int]:
    """``[CLS]`` context " Question:" mask " Answer: " + answer, padded to ``source_length``; a long
    context keeps a window centred on the answer's first occurrence (its start if absent)."""
    special = tokenizer.special_ids
    source = tokenizer.encode(context.rstrip() + " Question:")
    answer_ids = tokenizer.encode(" Answer: " + answer)
    room = source_length - len(answer_ids) - 2
    if room < 0:
        raise ValueError(f"source_length={source_length} leaves no room for the answer ({len(answer_ids)} tokens)")
    if len(source) > room:
        pattern = tokenizer.encode(" " + answer)
        found = [i for i in range(len(source)) if pattern and source[i : i + len(pattern)] == pattern]
        start = max(found[0] - room // 2, 0) if found else 0
        source = source[start : start + room]
    tokens = [special.cls, *source, tokenizer.token_to_id(mask_token), *answer_ids]
    return _pad_source(tokens, source_length, special.pad)


def extraction_source(
    tokenizer, question: str, context: str, *, source_length: int, mask_token: str = "[MASK]"
) -> list[int]:
    """``[CLS]`` " " + question, mask, ".", " " + context, the context cut, padded to ``source_length``."""
    special = tokenizer.special_ids
    question_ids = tokenizer.encode(" " + question.strip())
    period = tokenizer.encode(".")
    room = source_length - len(question_ids) - 2 - len(period)
    if room <= 0:
        raise ValueError(f"source_length={source_length} leaves no room for the context after the question")
    tokens = [special.cls, *question_ids, tokenizer.token_to_id(mask_token), *period,
              *tokenizer.encode(" " + context.rstrip())[:room]]
    return _pad_source(tokens, source_length, special.pad)


def _mask_index(source: Sequence[int], special_ids) -> int:
    masks = (special_ids.mask, special_ids.smask, special_ids.gmask)
    for index, token in enumerate(source):
        if token in masks:
            return index
    raise ValueError("the source holds no mask token ([MASK], [sMASK] or [gMASK])")


@dataclasses.dataclass(frozen=True)
class Seq2SeqRow:
    """A training row: the input row, the target of every index, and the loss mask (1 on the
    target's real tokens in Part B, 0 elsewhere)."""

    row: Row
    targets: tuple[int, ...]
    loss_mask: tuple[int, ...]


def training_row(source: Sequence[int], target_text_ids: Sequence[int], special_ids, *,
                 target_length: int) -> Seq2SeqRow:
    """Source (Part A, holding a mask) + Part B for teacher forcing (module docstring);
    ``target_text_ids`` are the target's tokens (encoded with their leading space)."""
    if target_length < 1:
        raise ValueError(f"target_length must be positive, got {target_length}")
    target = [*target_text_ids, special_ids.eop][:target_length]
    real = len(target)
    target += [special_ids.pad] * (target_length - real)
    row = blank_row(source, target, mask_index=_mask_index(source, special_ids), sop_id=special_ids.sop)
    n = len(source)
    return Seq2SeqRow(row, (0,) * n + tuple(target), (0,) * n + (1,) * real + (0,) * (target_length - real))


def inference_row(source: Sequence[int], special_ids) -> Row:
    """Source + ``<sop>`` at the mask's position, block position 1: where decoding starts."""
    return blank_row(source, [special_ids.sop], mask_index=_mask_index(source, special_ids), sop_id=special_ids.sop)


@dataclasses.dataclass(frozen=True)
class Seq2SeqBatch:
    """Training rows of one width: ``input_ids [B, L]``, ``position_ids [B, 2, L]``, ``sep [B]``,
    ``targets [B, L]``, ``loss_mask [B, L]``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor


def collate_seq2seq(rows: Sequence[Seq2SeqRow]) -> Seq2SeqBatch:
    """Stacks training rows of equal length (fixed source and target lengths make them so)."""
    lengths = {len(r.row) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"seq2seq rows must share one length (fixed source/target lengths), got {sorted(lengths)}")
    return Seq2SeqBatch(
        input_ids=torch.tensor([r.row.ids for r in rows]),
        position_ids=torch.tensor([[r.row.positions, r.row.blocks] for r in rows]),
        sep=torch.tensor([r.row.sep for r in rows]),
        targets=torch.tensor([r.targets for r in rows]),
        loss_mask=torch.tensor([r.loss_mask for r in rows]),
    )


def seq2seq_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                 label_smoothing: float = 0.0, *, normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """The authors' seq2seq loss: per token ``(1 - e) * cross_entropy + e * mean over the
    vocabulary of -log_softmax`` (``e = label_smoothing``), averaged over the loss mask
    (:func:`glm_ext.model.lm_loss` when ``e = 0``), in float32 (float64 for float64 logits).
    ``logits [..., V]``, ``targets`` and ``loss_mask [...]``; ``normalizer`` replaces the loss
    mask's sum as the divisor (a training step's share, as in ``lm_loss``)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    loss = lm_loss(logits, targets, loss_mask, normalizer=normalizer)
    if not label_smoothing:
        return loss
    dtype = torch.promote_types(logits.dtype, torch.float32)
    uniform = -F.log_softmax(logits.to(dtype), dim=-1).mean(dim=-1).reshape(-1)
    mask = loss_mask.reshape(-1).to(dtype)
    divisor = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (1 - label_smoothing) * loss + label_smoothing * (uniform * mask).sum() / divisor


# --------------------------------------------------------------------------------------------
# A task's layout: examples -> rows


#: The authors' settings of each task (THUDM/GLM ``config_tasks/seq_{cnndm,xsum,gigaword,squad_generation}.sh``):
#: source and target lengths, and the beam search of the evaluation (GenerationConfig fields; at most
#: ``target_length`` new tokens). ``summarization`` (any other corpus) takes CNN/DailyMail's, but for the
#: shortest target, one token.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn_dm": {"source_length": 608, "target_length": 160, "decoding": {
        "num_beams": 5, "length_penalty": 0.7, "no_repeat_ngram_size": 3, "min_new_tokens": 55}},
    "xsum": {"source_length": 608, "target_length": 60, "decoding": {
        "num_beams": 6, "length_penalty": 1.0, "no_repeat_ngram_size": 3, "min_new_tokens": 10}},
    "gigaword": {"source_length": 192, "target_length": 32, "decoding": {
        "num_beams": 5, "length_penalty": 0.6, "no_repeat_ngram_size": 3, "min_new_tokens": 0}},
    "squad_generation": {"source_length": 464, "target_length": 48, "decoding": {
        "num_beams": 5, "length_penalty": 0.7, "min_new_tokens": 0}},
}
TASK_DEFAULTS["summarization"] = {**TASK_DEFAULTS["cnn_dm"],
                                  "decoding": {**TASK_DEFAULTS["cnn_dm"]["decoding"], "min_new_tokens": 1}}

#: The mask tokens a source may hold: ``[sMASK]`` for models pretrained with task masks (the
#: authors' choice for summarisation), ``[gMASK]`` for GLM-10B-style generation.
MASK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclasses.dataclass(frozen=True)
class Seq2SeqLayout:
    """How a task's examples become rows: ``task`` (a key of
    :data:`~glm_ext.tasks.seq2seq_data.SEQ2SEQ_TASKS`: summarisation or question generation),
    the fixed ``source_length`` and ``target_length`` (the authors' ``--src-seq-length`` and
    ``--tgt-seq-length``) and the ``mask_token``."""

    task: str
    source_length: int
    target_length: int
    mask_token: str = "[MASK]"

    @classmethod
    def for_task(cls, task: str, *, source_length: int | None = None, target_length: int | None = None,
                 mask_token: str = "[MASK]") -> Seq2SeqLayout:
        """The layout of ``task`` with the authors' lengths (:data:`TASK_DEFAULTS`) where none is given."""
        if task not in TASK_DEFAULTS:
            raise ValueError(f"unknown seq2seq task {task!r}; choose one of {', '.join(SEQ2SEQ_TASKS)}")
        defaults = TASK_DEFAULTS[task]
        return cls(task, source_length or defaults["source_length"], target_length or defaults["target_length"],
                   mask_token)

    def decoding(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The authors' beam search for this task (GenerationConfig fields, at most ``target_length``
        tokens, the task's ``min_new_tokens`` capped there) with ``overrides``; with ``num_beams=1``
        among them, without the beam-only settings they do not give."""
        overrides = dict(overrides or {})
        settings = {**TASK_DEFAULTS[self.task]["decoding"], "max_new_tokens": self.target_length, **overrides}
        if "min_new_tokens" not in overrides:
            settings["min_new_tokens"] = min(settings["min_new_tokens"], settings["max_new_tokens"])
        if settings["num_beams"] == 1:
            for name in ("length_penalty", "early_stopping"):
                if name not in overrides:
                    settings.pop(name, None)
        return settings

    def __post_init__(self) -> None:
        if self.task not in SEQ2SEQ_TASKS:
            raise ValueError(f"unknown seq2seq task {self.task!r}; choose one of {', '.join(SEQ2SEQ_TASKS)}")
        if self.mask_token not in MASK_TOKENS:
            raise ValueError(f"mask_token must be one of {', '.join(MASK_TOKENS)}, got {self.mask_token!r}")
        for name in ("source_length", "target_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    def check_model(self, max_sequence_length: int) -> None:
        """ValueError unless the rows fit the model's positions."""
        if self.source_length > max_sequence_length or self.target_length + 1 > max_sequence_length:
            raise ValueError(
                f"source_length {self.source_length} and target_length {self.target_length} need positions up to "
                f"{max(self.source_length - 1, self.target_length)}, but the model's max_sequence_length is "
                f"{max_sequence_length}; choose shorter ones (--source-length, --target-length)")

    def source(self, tokenizer, example: Seq2SeqExample) -> list[int]:
        """Part A of an example, padded to ``source_length`` (errors name the example)."""
        try:
            if SEQ2SEQ_TASKS[self.task] == "question_generation":
                if example.answer is None:
                    raise ValueError("question generation needs the answer")
                return question_generation_source(tokenizer, example.source, example.answer,
                                                  source_length=self.source_length, mask_token=self.mask_token)
            return summarization_source(tokenizer, example.source, source_length=self.source_length,
                                        mask_token=self.mask_token)
        except ValueError as exc:
            raise ValueError(f"{example.where}: {exc}") from None

    def training_row(self, tokenizer, example: Seq2SeqExample) -> Seq2SeqRow:
        """The teacher-forced row of a labelled example."""
        if example.target is None:
            raise ValueError(f"{example.where}: a training example needs its target")
        return training_row(self.source(tokenizer, example), tokenizer.encode(" " + example.target),
                            tokenizer.special_ids, target_length=self.target_length)


# --------------------------------------------------------------------------------------------
# Evaluation: beam search and ROUGE


@dataclasses.dataclass(frozen=True)
class Seq2SeqEvaluation:
    """The decoded ``predictions`` (texts, in example order) and the ``metrics`` over the examples
    with a target: ``rouge1``, ``rouge2``, ``rougeL`` (percentages; empty when none has one)."""

    predictions: tuple[str, ...]
    metrics: dict[str, float]
    num_labelled: int


def evaluate_seq2seq(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Seq2SeqExample],
    layout: Seq2SeqLayout,
    generation: Any = None,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Seq2SeqEvaluation:
    """Decodes every example's target in its blank (:func:`glm_ext.generation.fill_blanks` over
    ``batch_size`` sources at a time, the padded source as Part A, as in training; ``generation``:
    a :class:`~glm_ext.generation.GenerationConfig` or a preset name, default the task's beam
    search, :meth:`Seq2SeqLayout.decoding`) and scores ROUGE against the targets. ``progress(n)`` is called
    after each batch with the examples done."""
    from glm_ext.generation import GenerationConfig, fill_blanks

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generation = generation if generation is not None else GenerationConfig(**layout.decoding())
    layout.check_model(model.config.max_sequence_length)
    sources = [layout.source(tokenizer, example) for example in examples]
    predictions: list[str] = []
    for start in range(0, len(sources), batch_size):
        filled = fill_blanks(model, tokenizer, sources[start : start + batch_size], generation, add_eos=False)
        predictions += [tokenizer.decode(result.blanks[0].token_ids).strip() for result in filled]
        if progress is not None:
            progress(len(predictions))
    labelled = [i for i, example in enumerate(examples) if example.target is not None]
    metrics = rouge([predictions[i] for i in labelled], [examples[i].target for i in labelled]) if labelled else {}
    return Seq2SeqEvaluation(tuple(predictions), metrics, len(labelled))
