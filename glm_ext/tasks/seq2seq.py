"""Sequence-to-sequence layouts (GLM_SPEC 6.1) and the finetuning loss: the source in Part A with a
mask token, the target generated in Part B, the loss on Part B only, optional label smoothing
(THUDM/GLM ``tasks/seq2seq/{dataset,finetune}.py``). Phase 1 of the tasks work: the layouts and the
loss; reading the datasets, finetuning through the trainer and beam-search evaluation build on it.

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
block positions 1, 2, ...; :func:`inference_row` appends ``<sop>`` alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from glm_ext.model import lm_loss
from glm_ext.tasks.rows import Row, blank_row

__all__ = [
    "Seq2SeqBatch",
    "Seq2SeqRow",
    "collate_seq2seq",
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
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """The authors' seq2seq loss: per token ``(1 - e) * cross_entropy + e * mean over the
    vocabulary of -log_softmax`` (``e = label_smoothing``), averaged over the loss mask
    (:func:`glm_ext.model.lm_loss` when ``e = 0``), in float32. ``logits [..., V]``, ``targets``
    and ``loss_mask [...]``."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    loss = lm_loss(logits, targets, loss_mask)
    if not label_smoothing:
        return loss
    uniform = -F.log_softmax(logits.float(), dim=-1).mean(dim=-1).reshape(-1)
    mask = loss_mask.reshape(-1).float()
    return (1 - label_smoothing) * loss + label_smoothing * (uniform * mask).sum() / mask.sum().clamp(min=1.0)
