"""Classification as cloze (GLM_SPEC 6, 6.1): a pattern puts one blank into the input, each
candidate answer (a label's verbalizer, a COPA choice, a ReCoRD entity) is scored by the model's
log-probability of its tokens decoded in that blank, and the best-scoring candidate wins.

Pipeline: :class:`ClozeExample` (pattern parts with one :data:`BLANK`, candidate texts) ->
:func:`encode_cloze` (token ids, cut to ``max_length``) -> :func:`build_cloze_batch` (rows and
picks, :mod:`glm_ext.tasks.rows`) -> model -> :func:`candidate_scores` -> :func:`cloze_loss`
(finetuning) or the task's decision (evaluation, :func:`score_cloze`).

The authors' layouts (THUDM/GLM ``tasks/superglue/pvp.py``, ``model/downstream.py``):

* Part A = ``[CLS]`` + the pattern's tokens (each part encoded on its own, the blank as
  ``[MASK]``) + ``<eos>``.
* Single-token candidates: one row per example, Part B = ``<sop>`` at the mask's position, block
  position 1; a candidate's score is the log-softmax at ``<sop>`` read at its token (the authors
  read the raw logit there, which differs by a per-example constant: same decisions, same
  cross-entropy over the candidates).
* Multi-token candidates: one row per candidate, Part B = ``<sop>`` + answer[:-1] where the answer
  is the candidate's tokens followed by ``<eop>``; the score sums the log-probabilities of all of
  them (``<eop>`` included) and is divided by ``len(answer) ** length_penalty``.
* Truncation: while the longest row is over ``max_length``, one token goes from the end of the
  last non-empty shortenable part of the segment (``parts_a`` / ``parts_b``) holding more
  shortenable tokens. Unlike the authors, who cut per candidate, Part A is cut once for the
  longest candidate, so every candidate is read in the same context (equal whenever nothing is
  cut).

Sharing Part A between candidates. Part B tokens of different candidates must see Part A but
not each other, which GLM's mixed mask (one prefix length per row) cannot express in one packed
row. :func:`score_encoded` therefore has two layouts, with the same scores:

* the authors' one row per candidate, many examples per batch (what finetuning trains on);
* Part A of many examples encoded in one pass, then per example one pass of its candidates'
  Part B rows over that example's cached keys and values (:class:`SharedContextCache`). A
  candidate pass cannot mix examples: Part A padding before Part B would be visible to Part B.

``benchmarks/bench_cloze.py`` measures both: the per-example passes cost more than one batched
pass when candidates are few (COPA-like: 1.3x slower), and far less when many candidates share a
long context (ReCoRD-like: 13.5x fewer tokens, 14x faster on the CPU). By default each multi-token
example whose separate rows would run at least ``SHARE_CONTEXT_RATIO`` times the tokens shares
its Part A.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glm_ext.model import KVCache
from glm_ext.tasks.records import Record, read_jsonl
from glm_ext.tasks.rows import (
    GroupScores,
    Row,
    ScoringBatch,
    ScoringBatchBuilder,
    blank_row,
    chunk_by_tokens,
    evaluating,
    group_scores,
    model_device,
    pick_log_probs,
    score_batch,
)

__all__ = [
    "BLANK",
    "CandidateScores",
    "best_choice",
    "ClozeBatch",
    "ClozeEvaluation",
    "ClozeExample",
    "ClozeResult",
    "ClozeTask",
    "EncodedCloze",
    "SharedContextCache",
    "Text",
    "build_cloze_batch",
    "candidate_scores",
    "cloze_forward",
    "cloze_loss",
    "encode_cloze",
    "evaluate_cloze",
    "score_cloze",
    "score_encoded",
]


class _Blank:
    """The blank of a pattern (encoded as ``[MASK]``); one instance, :data:`BLANK`."""

    def __repr__(self) -> str:
        return "BLANK"

    def __reduce__(self) -> str:
        return "BLANK"  # unpickles (e.g. in DataLoader workers) as the module's BLANK


BLANK = _Blank()


@dataclasses.dataclass(frozen=True)
class Text:
    """A piece of pattern text; ``shortenable`` pieces (the inputs) may be cut to fit."""

    text: str
    shortenable: bool = False


Part = Text | _Blank


@dataclasses.dataclass(frozen=True)
class ClozeExample:
    """One example: the pattern filled with its inputs (``parts_a`` + ``parts_b``, exactly one
    :data:`BLANK` in all), the candidate texts, the value predicted for each candidate
    (``choices``), the gold ``label`` value (None when unlabelled), the index of the correct
    candidate for training (``target``), task data for the metrics (``meta``) and where it
    came from (``source``, ``FILE:LINE``)."""

    parts_a: tuple[Part, ...]
    candidates: tuple[str, ...]
    choices: tuple[Any, ...]
    label: Any = None
    target: int | None = None
    parts_b: tuple[Part, ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<example>"

    def __post_init__(self) -> None:
        blanks = sum(part is BLANK for part in (*self.parts_a, *self.parts_b))
        if blanks != 1:
            raise ValueError(f"{self.source}: a cloze pattern needs exactly one blank ([MASK]), got {blanks}")
        if not self.candidates:
            raise ValueError(f"{self.source}: a cloze example needs at least one candidate answer")
        if len(self.choices) != len(self.candidates):
            raise ValueError(f"{self.source}: {len(self.choices)} choices for {len(self.candidates)} candidates")
        if self.target is not None and not 0 <= self.target < len(self.candidates):
            raise ValueError(f"{self.source}: target {self.target} is not a candidate index")


@dataclasses.dataclass(frozen=True)
class EncodedCloze:
    """An example as token ids: ``part_a`` (``[CLS]`` ... ``<eos>``), the index of its mask
    token, each candidate's answer ids (multi-token: with ``<eop>``), and whether the candidates
    are scored as one ``<sop>`` step (``multi_token=False``) or one row each."""

    part_a: tuple[int, ...]
    mask_index: int
    answers: tuple[tuple[int, ...], ...]
    multi_token: bool
    target: int | None
    truncated: bool

    @property
    def row_length(self) -> int:
        return len(self.part_a) + (max(len(a) for a in self.answers) if self.multi_token else 1)

    @property
    def num_rows(self) -> int:
        return len(self.answers) if self.multi_token else 1


def encode_cloze(
    tokenizer, example: ClozeExample, *, max_length: int, multi_token: bool | None = None
) -> EncodedCloze:
    """Token ids of an example (module docstring). ``multi_token=None`` decides per example:
    one ``<sop>`` step when every candidate is exactly one token, one row per candidate
    otherwise. Raises ValueError (naming ``example.source``) when a single-token candidate is
    not one ordinary token or when the pattern cannot be cut to ``max_length``."""
    special = tokenizer.special_ids
    candidate_ids = [tokenizer.encode(text) for text in example.candidates]
    if multi_token is None:
        multi_token = any(len(ids) != 1 for ids in candidate_ids)
    if multi_token:
        answers = [(*ids, special.eop) for ids in candidate_ids]
    else:
        specials = set(dataclasses.astuple(special))
        for text, ids in zip(example.candidates, candidate_ids):
            if len(ids) != 1 or ids[0] in specials:
                raise ValueError(
                    f"{example.source}: the verbalizer {text!r} is {len(ids)} tokens {ids}; a single-token "
                    "task needs exactly one ordinary token per verbalizer"
                )
        answers = [tuple(ids) for ids in candidate_ids]
    segments = [
        [[special.mask] if part is BLANK else tokenizer.encode(part.text) for part in parts]
        for parts in (example.parts_a, example.parts_b)
    ]
    shortenable = [[part is not BLANK and part.shortenable for part in parts]
                   for parts in (example.parts_a, example.parts_b)]
    answer_room = max(len(a) for a in answers) if multi_token else 1
    excess = 2 + sum(len(ids) for seg in segments for ids in seg) + answer_room - max_length
    truncated = excess > 0
    for _ in range(max(excess, 0)):
        _remove_one_token(segments, shortenable, example.source, max_length)
    tokens = [special.cls]
    mask_index = -1
    for segment, parts in zip(segments, (example.parts_a, example.parts_b)):
        for ids, part in zip(segment, parts):
            if part is BLANK:
                mask_index = len(tokens)
            tokens.extend(ids)
    tokens.append(special.eos)
    return EncodedCloze(tuple(tokens), mask_index, tuple(answers), multi_token, example.target, truncated)


def _remove_one_token(segments, shortenable, source: str, max_length: int) -> None:
    """The authors' cut: from the segment with more shortenable tokens (``parts_b`` on a tie),
    the last token of its last non-empty shortenable part."""
    lengths = [sum(len(ids) for ids, s in zip(seg, flags) if s) for seg, flags in zip(segments, shortenable)]
    order = (0, 1) if lengths[0] > lengths[1] else (1, 0)
    for which in order:
        candidates = [i for i, (ids, s) in enumerate(zip(segments[which], shortenable[which])) if s and ids]
        if candidates:
            segments[which][candidates[-1]] = segments[which][candidates[-1]][:-1]
            return
    raise ValueError(f"{source}: the pattern does not fit max_length={max_length} even with its inputs cut away")


@dataclasses.dataclass(frozen=True)
class ClozeBatch:
    """The rows and picks of several encoded examples (:class:`ScoringBatch`, one group per
    candidate, example-major), with ``group_example`` / ``group_candidate`` ``[G]`` locating each
    group in the ``[E, C]`` score matrix, ``num_candidates [E]`` and ``targets [E]`` (-1 where
    unknown)."""

    scoring: ScoringBatch
    group_example: torch.Tensor
    group_candidate: torch.Tensor
    num_candidates: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> ClozeBatch:
        return ClozeBatch(self.scoring.to(device), *(t.to(device) for t in (
            self.group_example, self.group_candidate, self.num_candidates, self.targets)))


def build_cloze_batch(
    encoded: Sequence[EncodedCloze], special_ids, *, after_part_a: bool = False
) -> ClozeBatch:
    """The authors' rows for the examples (module docstring): single-token examples one row with
    a pick per candidate at ``<sop>``, multi-token examples one row per candidate.
    ``after_part_a``: the multi-token rows hold Part B only (for a pass after Part A is cached,
    :class:`SharedContextCache`)."""
    builder = ScoringBatchBuilder()
    group_example, group_candidate = [], []
    for e, example in enumerate(encoded):
        if example.multi_token:
            start = len(example.part_a) if after_part_a else 0
            for c, answer in enumerate(example.answers):
                group = builder.new_group()
                row = builder.add_row(blank_row(example.part_a, answer, mask_index=example.mask_index,
                                                sop_id=special_ids.sop).tail(start))
                builder.pick_answer(row, len(example.part_a) - start, answer, group)
                group_example.append(e)
                group_candidate.append(c)
        else:
            row = builder.add_row(blank_row(example.part_a, example.answers[0], mask_index=example.mask_index,
                                            sop_id=special_ids.sop))
            for c, answer in enumerate(example.answers):
                builder.pick(row, len(example.part_a), answer[0], builder.new_group())
                group_example.append(e)
                group_candidate.append(c)
    return ClozeBatch(
        scoring=builder.build(special_ids.eos),  # the authors pad rows with <eos>
        group_example=torch.tensor(group_example, dtype=torch.int64),
        group_candidate=torch.tensor(group_candidate, dtype=torch.int64),
        num_candidates=torch.tensor([len(x.answers) for x in encoded], dtype=torch.int64),
        targets=torch.tensor([-1 if x.target is None else x.target for x in encoded], dtype=torch.int64),
    )


@dataclasses.dataclass(frozen=True)
class CandidateScores:
    """``scores [E, C]`` (-inf past an example's candidates) and ``greedy [E, C]`` (every token
    of the candidate is the argmax)."""

    scores: torch.Tensor
    greedy: torch.Tensor


def candidate_scores(
    sums: GroupScores | tuple[torch.Tensor, torch.Tensor], batch: ClozeBatch, length_penalty: float = 0.0
) -> CandidateScores:
    """The ``[E, C]`` score matrix from per-group sums: a :class:`GroupScores`, or, for
    finetuning, ``(log_probs, is_argmax)`` of :func:`~glm_ext.tasks.rows.pick_log_probs`
    (differentiable). Scores are divided by ``num_tokens ** length_penalty``."""
    if not isinstance(sums, GroupScores):
        sums = group_scores(*sums, batch.scoring)
    scores = sums.log_prob
    if length_penalty:
        scores = scores / sums.num_tokens.to(scores.dtype) ** length_penalty
    shape = (len(batch.num_candidates), int(batch.num_candidates.max()))
    matrix = scores.new_full(shape, float("-inf")).index_put((batch.group_example, batch.group_candidate), scores)
    greedy = torch.zeros(shape, dtype=torch.bool, device=scores.device)
    greedy[batch.group_example, batch.group_candidate] = sums.greedy
    return CandidateScores(matrix, greedy)


def cloze_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' cloze finetuning loss: cross-entropy of ``targets [E]`` over the candidate
    scores ``[E, C]`` (absent candidates are -inf), in float32."""
    if (targets < 0).any():
        raise ValueError("cloze_loss needs the target candidate of every example (a labelled file)")
    return F.cross_entropy(scores.float(), targets)


def cloze_forward(model: nn.Module, batch: ClozeBatch, length_penalty: float = 0.0) -> CandidateScores:
    """Candidate scores of a batch, differentiable (the finetuning step: ``cloze_loss(
    cloze_forward(model, batch).scores, batch.targets)``)."""
    logits = model(*batch.scoring.model_inputs())
    return candidate_scores(pick_log_probs(logits, batch.scoring), batch, length_penalty)


class SharedContextCache(KVCache):
    """Part A of several examples encoded in one (right-padded) pass, then each example's keys
    and values shared by all its candidate rows, without a copy per candidate.

    A :class:`~glm_ext.model.KVCache` for ``GLMModel.forward``: the first pass (the Part As,
    ``sep`` = each real length, so no real token sees the padding) is stored; :meth:`select`
    then picks one example, and a pass of its candidates' Part B rows sees that example's real
    Part A (its padding cut off) expanded over the rows. Examples cannot share a candidate pass:
    Part A padding before Part B would be visible to Part B under the mixed mask.
    """

    def __init__(self) -> None:
        super().__init__(max_length=1)
        self._context: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._row: int | None = None
        self._row_length = 0

    def check_room(self, batch_size: int, num_tokens: int) -> None:
        if self._context and self._row is None:
            raise ValueError("SharedContextCache: select() an example before a candidate pass")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._row is None:
            self._context.append((k, v))
            return k, v
        rows = k.shape[0]
        context = [t[self._row : self._row + 1, : self._row_length].expand(rows, -1, -1, -1)
                   for t in self._context[layer]]
        return torch.cat([context[0], k], 1), torch.cat([context[1], v], 1)

    def advance(self, num_tokens: int) -> None:
        self.lengths = [self.length + num_tokens]

    def select(self, row: int, length: int) -> None:
        """The next pass continues the Part A of context row ``row`` (its first ``length`` tokens)."""
        self._row, self._row_length, self.lengths = row, length, [length]


#: See :func:`_shares_context` and benchmarks/bench_cloze.py.
SHARE_CONTEXT_RATIO = 3


def _shares_context(example: EncodedCloze, share_context: bool | None) -> bool:
    """Whether an example's candidates are scored over one encoding of its Part A: always / never
    when ``share_context`` says so, else (None) for multi-token examples whose one-row-per-candidate
    layout runs at least ``SHARE_CONTEXT_RATIO`` times the tokens (benchmarks/bench_cloze.py)."""
    if not example.multi_token:
        return False
    if share_context is not None:
        return share_context
    answer = max(len(a) for a in example.answers)
    rows_tokens = len(example.answers) * (len(example.part_a) + answer)
    shared_tokens = len(example.part_a) + len(example.answers) * answer
    return rows_tokens >= SHARE_CONTEXT_RATIO * shared_tokens


@dataclasses.dataclass(frozen=True)
class ClozeResult:
    """One example scored: per candidate the score and whether it is the greedy decoding;
    ``truncated``: its inputs were cut to fit ``max_length``."""

    scores: tuple[float, ...]
    greedy: tuple[bool, ...]
    truncated: bool = False

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=self.scores.__getitem__)


def score_cloze(
    model: nn.Module,
    tokenizer,
    examples: Sequence[ClozeExample],
    *,
    max_length: int | None = None,
    multi_token: bool | None = None,
    length_penalty: float = 0.0,
    max_tokens: int = 4096,
    share_context: bool | None = None,
) -> list[ClozeResult]:
    """Scores every candidate of every example (evaluation; the model's mode is restored).

    ``max_length`` (default: the model's ``max_sequence_length``) bounds each row (see
    :func:`encode_cloze` for ``multi_token``); the rest is :func:`score_encoded`'s."""
    max_length = max_length or model.config.max_sequence_length
    encoded = [encode_cloze(tokenizer, x, max_length=max_length, multi_token=multi_token) for x in examples]
    return score_encoded(model, encoded, tokenizer.special_ids, length_penalty=length_penalty,
                         max_tokens=max_tokens, share_context=share_context)


def score_encoded(
    model: nn.Module,
    encoded: Sequence[EncodedCloze],
    special_ids,
    *,
    length_penalty: float = 0.0,
    max_tokens: int = 4096,
    share_context: bool | None = None,
) -> list[ClozeResult]:
    """Scores encoded examples. ``max_tokens`` bounds a batch (rows x padded length; examples are
    sorted by length and an example's rows stay together). ``share_context``: encode Part A once
    per example and share it across the candidates (True), use the authors' one row per candidate
    (False), or decide per example by token count (None, :func:`_shares_context`); the scores
    are the same."""
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].row_length)
    shared = [i for i in order if _shares_context(encoded[i], share_context)]
    separate = [i for i in order if not _shares_context(encoded[i], share_context)]
    results: list[ClozeResult | None] = [None] * len(encoded)

    def store(index: int, scored: CandidateScores, row: int) -> None:
        n = len(encoded[index].answers)
        results[index] = ClozeResult(tuple(scored.scores[row, :n].tolist()), tuple(scored.greedy[row, :n].tolist()),
                                     encoded[index].truncated)

    with evaluating(model):
        sizes = [(encoded[i].num_rows, encoded[i].row_length) for i in separate]
        for chunk in chunk_by_tokens(sizes, max_tokens):
            indices = [separate[i] for i in chunk]
            batch = build_cloze_batch([encoded[i] for i in indices], special_ids)
            scored = candidate_scores(score_batch(model, batch.scoring), batch, length_penalty)
            for row, index in enumerate(indices):
                store(index, scored, row)
        for chunk in chunk_by_tokens([(1, len(encoded[i].part_a)) for i in shared], max_tokens):
            indices = [shared[i] for i in chunk]
            cache = SharedContextCache()
            context = ScoringBatchBuilder()
            for index in indices:
                x = encoded[index]
                context.add_row(Row(x.part_a, tuple(range(len(x.part_a))), (0,) * len(x.part_a), len(x.part_a)))
            model(*context.build(special_ids.eos).to(model_device(model)).model_inputs(), kv_cache=cache)
            for row, index in enumerate(indices):
                batch = build_cloze_batch([encoded[index]], special_ids, after_part_a=True)
                cache.select(row, len(encoded[index].part_a))
                store(index, candidate_scores(score_batch(model, batch.scoring, kv_cache=cache), batch,
                                              length_penalty), 0)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Tasks: records -> examples -> predictions -> metrics


def best_choice(example: ClozeExample, result: ClozeResult) -> Any:
    """The default decision: the value of the best-scoring candidate."""
    return example.choices[result.best]


@dataclasses.dataclass(frozen=True)
class ClozeTask:
    """A cloze task: ``examples(record)`` turns one JSON record into examples (MultiRC: one per
    answer), ``decide(example, result)`` picks the predicted label value, ``metrics(examples,
    predictions)`` scores the labelled examples. ``multi_token`` and ``length_penalty`` as in
    :func:`score_cloze` (the authors' settings per task)."""

    name: str
    examples: Callable[[Record], list[ClozeExample]]
    metrics: Callable[[Sequence[ClozeExample], Sequence[Any]], dict[str, float]]
    multi_token: bool | None = None
    length_penalty: float = 0.0
    decide: Callable[[ClozeExample, ClozeResult], Any] = best_choice

    def read(self, path: str | os.PathLike) -> list[ClozeExample]:
        """The examples of a JSON-lines file (errors name the file, line and field)."""
        return [example for record in read_jsonl(path) for example in self.examples(record)]


@dataclasses.dataclass(frozen=True)
class ClozeEvaluation:
    """Metrics over the labelled examples (empty when none is labelled) and every prediction."""

    task: str
    num_examples: int
    num_labelled: int
    metrics: dict[str, float]
    examples: tuple[ClozeExample, ...]
    results: tuple[ClozeResult, ...]
    predictions: tuple[Any, ...]

    @property
    def num_truncated(self) -> int:
        """Examples whose inputs were cut to fit (the authors count them too)."""
        return sum(result.truncated for result in self.results)


def evaluate_cloze(
    model: nn.Module,
    tokenizer,
    task: ClozeTask,
    examples: Sequence[ClozeExample],
    *,
    max_length: int | None = None,
    length_penalty: float | None = None,
    max_tokens: int = 4096,
    share_context: bool | None = None,
) -> ClozeEvaluation:
    """Scores the examples (:func:`score_cloze`; ``length_penalty`` None: the task's), decides
    each prediction, and computes the task's metrics over the labelled examples."""
    penalty = task.length_penalty if length_penalty is None else length_penalty
    results = score_cloze(model, tokenizer, examples, max_length=max_length, multi_token=task.multi_token,
                          length_penalty=penalty, max_tokens=max_tokens, share_context=share_context)
    predictions = [task.decide(x, r) for x, r in zip(examples, results)]
    labelled = [i for i, x in enumerate(examples) if x.label is not None]
    metrics = task.metrics([examples[i] for i in labelled], [predictions[i] for i in labelled]) if labelled else {}
    return ClozeEvaluation(task.name, len(examples), len(labelled), metrics, tuple(examples), tuple(results),
                           tuple(predictions))
