"""Language-model evaluation (GLM_SPEC 6): perplexity over long texts with overlapping windows,
and LAMBADA-style last-word accuracy, each bidirectional or unidirectional, with the authors'
layouts (THUDM/GLM ``tasks/language_model/{dataset,finetune}.py``).

One layout serves both (:func:`lm_span`): a context, then a continuation whose tokens are scored.

* bidirectional: Part A = ``[CLS]`` + context + mask (+ ``<eos>``); Part B = ``<sop>`` +
  continuation[:-1] at the mask's position;
* unidirectional: Part A = ``[CLS]`` + context[:1] + mask (+ ``<eos>``); Part B = ``<sop>`` +
  (context[1:] + continuation)[:-1], so the context beyond its first token is read causally;
  only the continuation's tokens are scored.

The mask is ``[MASK]`` (``[gMASK]`` for models pretrained with task masks, as the authors' GLM-10B
evaluation). The authors end Part A with ``<eos>`` for LAMBADA and not for perplexity windows;
so does this module.

Perplexity (:func:`document_log_likelihoods`, :func:`perplexity`): windows of ``window`` tokens
start every ``stride`` tokens; window ``k`` covers ``[k*stride, k*stride + window)`` and scores only
the tokens no earlier window scored, with the rest of its window as context. The first token of a
document is context only, as in the authors' code, unless ``score_first_token`` (then window 0
has an empty context; lm-eval's rolling log-likelihood scores every token). Perplexity is
``exp(-total log-likelihood / scored tokens)`` over all documents.

LAMBADA (:func:`lambada`): the last whitespace-separated word of each text is the answer
(encoded with its leading space), the text before it (stripped) the context; a text counts as
right when every token of the word is the argmax. Contexts too long for ``max_length`` lose their
first tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Literal, get_args

from torch import nn

from glm_ext.tasks.records import read_jsonl, read_text
from glm_ext.tasks.rows import ScoredSpan, blank_row, score_spans

__all__ = [
    "MODES",
    "LambadaResult",
    "PerplexityResult",
    "continuation_spans",
    "document_log_likelihoods",
    "document_windows",
    "lambada",
    "lm_span",
    "perplexity",
    "read_texts",
    "split_last_word",
]

Mode = Literal["bidirectional", "unidirectional"]
MODES: tuple[str, ...] = get_args(Mode)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def lm_span(
    context: Sequence[int], continuation: Sequence[int], special_ids, *, mode: Mode, mask_id: int, add_eos: bool
) -> ScoredSpan:
    """The row of a context and a continuation, with the continuation scored (module docstring)."""
    _check_mode(mode)
    if not continuation:
        raise ValueError("the continuation to score is empty")
    prompt, read = (context, ()) if mode == "bidirectional" else (context[:1], context[1:])
    part_a = [special_ids.cls, *prompt, mask_id, *([special_ids.eos] if add_eos else [])]
    answer = (*read, *continuation)
    row = blank_row(part_a, answer, mask_index=len(prompt) + 1, sop_id=special_ids.sop)
    return ScoredSpan(row, len(part_a) + len(read), tuple(continuation))


def _row_overhead(add_eos: bool) -> int:
    """Tokens of a row besides context and continuation: ``[CLS]``, the mask, ``<eos>``."""
    return 2 + int(add_eos)


def continuation_spans(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    special_ids,
    *,
    mode: Mode,
    mask_id: int,
    max_length: int,
    add_eos: bool = True,
) -> list[ScoredSpan]:
    """One span per ``(context, continuation)``; contexts lose their first tokens to fit
    ``max_length``. Raises ValueError for a continuation that cannot fit at all."""
    spans = []
    for context, continuation in pairs:
        room = max_length - _row_overhead(add_eos) - len(continuation)
        if room < 0:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={max_length}")
        context = list(context)[max(0, len(context) - room) :]
        spans.append(lm_span(context, continuation, special_ids, mode=mode, mask_id=mask_id, add_eos=add_eos))
    return spans


def read_texts(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """The texts of a data file: a ``.jsonl`` file gives one text per record (its ``text_field``,
    a non-blank string), any other file is one text. Errors name the file, line and field."""
    if os.fspath(path).endswith(".jsonl"):
        texts = []
        for record in read_jsonl(path):
            text = record.field(text_field, kind=str)
            if not text.strip():
                raise record.error(f"field {text_field!r} is empty")
            texts.append(text)
        return texts
    return [read_text(path)]


# --------------------------------------------------------------------------------------------
# Perplexity


def document_windows(
    num_tokens: int, window: int, stride: int, *, score_first_token: bool = False
) -> list[tuple[int, int, int]]:
    """``(start, first_scored, end)`` of each window over a document of ``num_tokens`` tokens:
    tokens ``[start, first_scored)`` are its context, ``[first_scored, end)`` are scored; every
    token (but the first, unless ``score_first_token``) is scored exactly once."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must lie in [1, window={window}], got {stride}")
    windows = []
    scored_until = 0 if score_first_token else min(1, num_tokens)
    start = 0
    while scored_until < num_tokens:
        end = min(start + window, num_tokens)
        if end > scored_until:
            windows.append((start, scored_until, end))
            scored_until = end
        start += stride
    return windows


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Summed log-likelihood of the scored tokens, their number, and the windows run."""

    log_likelihood: float
    num_tokens: int
    num_windows: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return -self.log_likelihood / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")


def _window_defaults(model: nn.Module, window: int | None, stride: int | None) -> tuple[int, int]:
    """A window fills the model's positions (row = window + [CLS] + mask); stride: half of it."""
    window = window or model.config.max_sequence_length - _row_overhead(False)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    return window, stride or max(1, window // 2)


def document_log_likelihoods(
    model: nn.Module,
    tokenizer,
    documents: Sequence[Sequence[int]],
    *,
    mode: Mode = "bidirectional",
    window: int | None = None,
    stride: int | None = None,
    mask_token: str = "[MASK]",
    score_first_token: bool = False,
    max_tokens: int = 4096,
) -> list[tuple[float, int]]:
    """(log-likelihood, scored tokens) of each tokenised document (module docstring);
    ``window`` defaults to the model's ``max_sequence_length`` - 2, ``stride`` to half of it."""
    _check_mode(mode)
    window, stride = _window_defaults(model, window, stride)
    special, mask_id = tokenizer.special_ids, tokenizer.token_to_id(mask_token)
    spans, owners = [], []
    for d, tokens in enumerate(documents):
        for start, first_scored, end in document_windows(len(tokens), window, stride,
                                                         score_first_token=score_first_token):
            spans.append(lm_span(tokens[start:first_scored], tokens[first_scored:end], special, mode=mode,
                                 mask_id=mask_id, add_eos=False))
            owners.append(d)
    totals = [[0.0, 0] for _ in documents]
    scores = score_spans(model, spans, special.eos, max_tokens=max_tokens)
    for owner, span, (log_prob, _) in zip(owners, spans, scores):
        totals[owner][0] += log_prob
        totals[owner][1] += len(span.tokens)
    return [(ll, n) for ll, n in totals]


def perplexity(model: nn.Module, tokenizer, documents: Sequence[Sequence[int]], **options) -> PerplexityResult:
    """Perplexity over tokenised documents (options as :func:`document_log_likelihoods`)."""
    window, stride = _window_defaults(model, options.get("window"), options.get("stride"))
    per_document = document_log_likelihoods(model, tokenizer, documents, **options)
    windows = sum(len(document_windows(len(d), window, stride,
                                       score_first_token=options.get("score_first_token", False)))
                  for d in documents)
    return PerplexityResult(sum(ll for ll, _ in per_document), sum(n for _, n in per_document), windows)


# --------------------------------------------------------------------------------------------
# LAMBADA


def split_last_word(text: str) -> tuple[str, str]:
    """(context, last word with its leading space), the authors' split: the context is the text
    before the last occurrence of the last word, stripped."""
    words = text.split()
    if not words:
        raise ValueError("the text is empty")
    last = words[-1]
    return text[: text.rfind(last)].strip(), " " + last


@dataclasses.dataclass(frozen=True)
class LambadaResult:
    """Per text whether the last word is the greedy prediction, and its log-probability."""

    correct: tuple[bool, ...]
    log_probs: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        """Percentage of texts whose last word is predicted exactly."""
        return 100.0 * sum(self.correct) / len(self.correct) if self.correct else float("nan")


def lambada(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    mode: Mode = "bidirectional",
    mask_token: str = "[MASK]",
    max_length: int | None = None,
    max_tokens: int = 4096,
) -> LambadaResult:
    """Last-word accuracy over ``texts`` (module docstring); ``max_length`` defaults to the
    model's ``max_sequence_length``."""
    pairs = []
    for text in texts:
        context, word = split_last_word(text)
        pairs.append((tokenizer.encode(context), tokenizer.encode(word)))
    spans = continuation_spans(pairs, tokenizer.special_ids, mode=mode, mask_id=tokenizer.token_to_id(mask_token),
                               max_length=max_length or model.config.max_sequence_length, add_eos=True)
    scores = score_spans(model, spans, tokenizer.special_ids.eos, max_tokens=max_tokens)
    return LambadaResult(tuple(greedy for _, greedy in scores), tuple(lp for lp, _ in scores))
