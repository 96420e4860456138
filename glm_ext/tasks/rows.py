"""Model input rows for scoring and finetuning (GLM_SPEC 6, 6.1), and the log-probabilities read
from them. Every task of :mod:`glm_ext.tasks` (cloze, language modelling, seq2seq, the lm-eval
adapter) builds its inputs here and scores through :func:`score_batch`.

A *row* is one sequence the model reads: Part A (bidirectional; it holds the mask token of the
blank), then Part B, the blank decoded causally. :func:`blank_row` is the authors' layout::

    tokens     A_0 .. A_(n-1)      | <sop> a_1 .. a_(k-1)
    position   0   .. n-1          | m     m   ..  m        (m: index of the blank's mask in A)
    block      0   .. 0            | 1     2   ..  k
    sep = n

and answer token ``a_i`` (1-based) is predicted by the logits at index ``n + i - 1``.

A *pick* ``(row, index, token, group)`` asks for the log-probability of ``token`` as the next token
at ``index`` of ``row``; the log-probabilities of the picks of one *group* are summed (a group is a
candidate answer of a cloze example, a window of a text, a continuation of an lm-eval request).
:class:`ScoringBatchBuilder` collects rows and picks and pads the rows into a :class:`ScoringBatch`
(right padding at position 0, block position 0, which no real token attends to); phase-2
finetuning runs the same batches with gradients (:func:`pick_log_probs` is differentiable).

Log-probabilities are a log-softmax over the model's whole (padded) vocabulary in float32 (or the
logits' dtype when wider), as the authors compute them; "greedy" means the token is the argmax of its logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "GroupScores",
    "Row",
    "ScoredSpan",
    "ScoringBatch",
    "ScoringBatchBuilder",
    "blank_row",
    "chunk_by_tokens",
    "evaluating",
    "group_scores",
    "model_device",
    "pick_log_probs",
    "score_batch",
    "score_spans",
]


@dataclasses.dataclass(frozen=True)
class Row:
    """One input row: token ids, positions, block positions (all of one length) and ``sep``."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    blocks: tuple[int, ...]
    sep: int

    def __len__(self) -> int:
        return len(self.ids)

    def tail(self, start: int) -> Row:
        """The tokens from ``start`` on, ``sep`` unchanged: what a pass after ``start`` cached
        tokens feeds the model (``GLMModel(..., kv_cache=...)``)."""
        return Row(self.ids[start:], self.positions[start:], self.blocks[start:], self.sep)


def blank_row(part_a: Sequence[int], answer: Sequence[int], *, mask_index: int, sop_id: int) -> Row:
    """The authors' row for a blank (module docstring): ``part_a`` (holding the mask token at
    ``mask_index``), then ``<sop>`` + ``answer[:-1]``. Answer token ``i`` (0-based) is then the
    target at index ``len(part_a) + i``. ``answer`` must not be empty (its tokens fix Part B's
    length; a single-token score needs any one token)."""
    if not answer:
        raise ValueError("answer must hold at least one token (Part B is <sop> + answer[:-1])")
    if not 0 <= mask_index < len(part_a):
        raise ValueError(f"mask_index {mask_index} lies outside Part A (length {len(part_a)})")
    n, k = len(part_a), len(answer)
    return Row(
        ids=(*part_a, sop_id, *answer[:-1]),
        positions=(*range(n), *([mask_index] * k)),
        blocks=(*([0] * n), *range(1, k + 1)),
        sep=n,
    )


@dataclasses.dataclass(frozen=True)
class ScoringBatch:
    """Padded rows (``input_ids [R, L]``, ``position_ids [R, 2, L]``, ``sep [R]``) and the picks
    (``pick_row``, ``pick_index``, ``pick_token``, ``pick_group``, each ``[N]``) into
    ``num_groups`` groups."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    pick_row: torch.Tensor
    pick_index: torch.Tensor
    pick_token: torch.Tensor
    pick_group: torch.Tensor
    num_groups: int

    def to(self, device: torch.device | str) -> ScoringBatch:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)}
        )

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.position_ids, self.sep


class ScoringBatchBuilder:
    """Collects rows and picks; :meth:`build` pads them into a :class:`ScoringBatch`."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.picks: list[tuple[int, int, int, int]] = []
        self.num_groups = 0

    def new_group(self) -> int:
        self.num_groups += 1
        return self.num_groups - 1

    def add_row(self, row: Row) -> int:
        self.rows.append(row)
        return len(self.rows) - 1

    def pick(self, row: int, index: int, token: int, group: int) -> None:
        if not 0 <= index < len(self.rows[row]):
            raise ValueError(f"pick index {index} lies outside row {row} (length {len(self.rows[row])})")
        self.picks.append((row, index, token, group))

    def pick_answer(self, row: int, start: int, answer: Sequence[int], group: int) -> None:
        """Picks ``answer[i]`` at index ``start + i`` of ``row`` (a blank's answer starts at ``sep``)."""
        for i, token in enumerate(answer):
            self.pick(row, start + i, token, group)

    def build(self, pad_id: int) -> ScoringBatch:
        if not self.rows:
            raise ValueError("a scoring batch needs at least one row")
        length = max(len(row) for row in self.rows)
        input_ids = torch.full((len(self.rows), length), pad_id, dtype=torch.int64)
        position_ids = torch.zeros((len(self.rows), 2, length), dtype=torch.int64)
        for r, row in enumerate(self.rows):
            input_ids[r, : len(row)] = torch.tensor(row.ids)
            position_ids[r, 0, : len(row)] = torch.tensor(row.positions)
            position_ids[r, 1, : len(row)] = torch.tensor(row.blocks)
        picks = torch.tensor(self.picks, dtype=torch.int64).reshape(-1, 4)
        return ScoringBatch(
            input_ids=input_ids,
            position_ids=position_ids,
            sep=torch.tensor([row.sep for row in self.rows], dtype=torch.int64),
            pick_row=picks[:, 0],
            pick_index=picks[:, 1],
            pick_token=picks[:, 2],
            pick_group=picks[:, 3],
            num_groups=self.num_groups,
        )


@dataclasses.dataclass(frozen=True)
class GroupScores:
    """Per group: the summed log-probability (float64), the number of picked tokens, and whether
    every picked token is the argmax of its logits."""

    log_prob: torch.Tensor
    num_tokens: torch.Tensor
    greedy: torch.Tensor


def pick_log_probs(logits: torch.Tensor, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities ``[N]`` in float32 or wider, is-argmax ``[N]``) of the picks, from
    ``logits [R, L, V]``.

    The log-softmax runs only at the distinct (row, index) pairs that are picked. Differentiable
    in ``logits`` (the finetuning losses use it)."""
    flat = batch.pick_row * logits.shape[1] + batch.pick_index
    places, which = torch.unique(flat, return_inverse=True)
    rows = logits.reshape(-1, logits.shape[-1])[places]
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    log_probs = torch.log_softmax(rows, dim=-1)[which, batch.pick_token]
    is_argmax = rows.argmax(dim=-1)[which] == batch.pick_token
    return log_probs, is_argmax


def group_scores(log_probs: torch.Tensor, is_argmax: torch.Tensor, batch: ScoringBatch) -> GroupScores:
    """Sums the picks of each group (see :class:`GroupScores`)."""
    groups = batch.pick_group
    total = torch.zeros(batch.num_groups, dtype=torch.float64, device=log_probs.device)
    total.index_add_(0, groups, log_probs.double())
    counts = torch.bincount(groups, minlength=batch.num_groups)
    misses = torch.bincount(groups, weights=(~is_argmax).double(), minlength=batch.num_groups)
    return GroupScores(total, counts, misses == 0)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def score_batch(model: nn.Module, batch: ScoringBatch, *, kv_cache=None) -> GroupScores:
    """Runs the model over the batch's rows (on the model's device; after the tokens in
    ``kv_cache`` if given) and sums the picks per group. Call it under :func:`evaluating`."""
    batch = batch.to(model_device(model))
    logits = model(*batch.model_inputs(), kv_cache=kv_cache)
    scores = group_scores(*pick_log_probs(logits, batch), batch)
    return GroupScores(*(t.cpu() for t in dataclasses.astuple(scores)))


def chunk_by_tokens(sizes: Sequence[tuple[int, int]], max_tokens: int) -> list[list[int]]:
    """Indices of items, grouped into consecutive chunks whose padded batch (all their rows, each
    as long as the longest) holds at most ``max_tokens`` tokens; an item over the budget on its
    own gets a chunk of its own. ``sizes[i]`` = (rows of item i, length of its longest row).
    Sort the items by length first to keep padding low."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    chunks: list[list[int]] = []
    current: list[int] = []
    rows = longest = 0
    for index, (item_rows, item_length) in enumerate(sizes):
        grown_rows, grown_longest = rows + item_rows, max(longest, item_length)
        if current and grown_rows * grown_longest > max_tokens:
            chunks.append(current)
            current, grown_rows, grown_longest = [], item_rows, item_length
        current.append(index)
        rows, longest = grown_rows, grown_longest
    if current:
        chunks.append(current)
    return chunks


@dataclasses.dataclass(frozen=True)
class ScoredSpan:
    """A row and the tokens scored in it: ``tokens[i]`` is the target at index ``start + i``."""

    row: Row
    start: int
    tokens: tuple[int, ...]


def score_spans(
    model: nn.Module,
    spans: Sequence[ScoredSpan],
    pad_id: int,
    *,
    max_tokens: int = 4096,
) -> list[tuple[float, bool]]:
    """(summed log-probability, every token greedy) of each span, in order: the rows sorted by
    length, batched within ``max_tokens``, run under :func:`evaluating`."""
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].row))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(spans)
    with evaluating(model):
        for chunk in chunk_by_tokens([(1, len(spans[i].row)) for i in order], max_tokens):
            builder = ScoringBatchBuilder()
            for position in chunk:
                span = spans[order[position]]
                builder.pick_answer(builder.add_row(span.row), span.start, span.tokens, builder.new_group())
            scores = score_batch(model, builder.build(pad_id))
            for group, position in enumerate(chunk):
                results[order[position]] = (float(scores.log_prob[group]), bool(scores.greedy[group]))
    return results
