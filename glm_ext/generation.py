"""Blank filling with a GLM (GLM_SPEC section 5): decoding settings, sampling and scoring functions,
:func:`fill_blanks` and :func:`stream_blanks`.

The decoding follows the authors' ``generate_samples.py`` (THUDM/GLM, the ``block_lm`` branch):

* the context is ``[CLS]`` + text, and ``<eos>`` is appended unless the context ends with a mask
  token (the authors' rule: a context that does not end in a blank is a whole document);
* the context is encoded once, fully bidirectional (``sep = len(context)``);
* blanks are filled in text order. A blank whose mask token sits at index ``p`` is decoded from
  ``<sop>`` with position ``p`` and block position 1, its ``i``-th generated token is fed with
  position ``p`` and block position ``i + 1``; it ends at ``<eop>`` or ``<eos>`` (neither is fed
  to the model nor kept) or after ``max_new_tokens`` tokens;
* every later blank continues the same sequence: its tokens come after ``<sop>`` and the tokens of
  all earlier blanks (in Part B, so they see them causally, as in the authors' code, where the
  filled tokens and their cached keys stay in place for the next blank).

**Batches.** A list of contexts is decoded together: one forward pass encodes every context (rows
padded to the longest), then each step runs one forward pass over the rows still decoding, each
feeding only its own new tokens (the key/value cache holds each row's own length); a context whose
blanks are all filled leaves the batch. Each context gets the tokens it gets alone: sampling draws
from a random generator of its own (seeded with ``seed``, or with its entry of a list of seeds).

**Beam search** (``num_beams > 1``) scores as the authors' seq2seq evaluation
(``tasks/seq2seq/evaluate.py`` with their ``BeamSearchScorer``): the beams of a blank start from its
``<sop>`` (expanded from one row, sharing its cache); each step ranks the top ``2 * num_beams``
continuations by their sum of log-probabilities; one that ends the blank (ranked within the top
``num_beams``) becomes a finished hypothesis scored ``sum / max(len, 1) ** length_penalty`` (``len``
without the end token), the others continue, ``num_beams`` at most. The blank is done when
``num_beams`` hypotheses are finished and, unless ``early_stopping``, the best running sum divided
by the current length ** length_penalty does not beat the worst of them (the authors' test); at
``max_new_tokens`` the running beams are finished too. The best hypothesis fills the blank, and the
next blank starts from it (its tokens are fed once more to one row's cache).

**Constraints** act on each blank's own tokens: ``min_new_tokens`` (no stop is drawn before),
``no_repeat_ngram_size`` (no n-gram occurs twice in a blank), ``repetition_penalty`` (CTRL's: the
score of a token already in the blank is divided by the penalty when positive, multiplied when
negative). Sampling applies them to the logits before temperature, top-k and top-p; beam search
to the log-probabilities (the authors' order). Extra ``stop_token_ids`` end a blank as ``<eop>``
does; a blank also ends once its text contains one of ``stop_strings`` (its tokens kept).

Deliberate differences from the authors' code. By default a blank holds at least one token
(``min_new_tokens=1``: pretraining spans are never empty, so a weak model's immediate ``<eop>`` is
never a right answer). When a blank stops at ``max_new_tokens``, the authors' cached decoding never
feeds its last token to the model, so the next blank does not see it; here it is fed with the next
blank's ``<sop>``, so decoding with the key/value cache and recomputing everything give the same
tokens in every case. Ids of the model's vocabulary padding are never produced (nor scored).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from glm_ext.model import KVCache

__all__ = [
    "GENERATION_PRESETS",
    "Blank",
    "BlankUpdate",
    "FillResult",
    "GenerationConfig",
    "apply_repetition_penalty",
    "banned_ngram_tokens",
    "encode_context",
    "fill_blanks",
    "logits_to_probs",
    "mask_positions",
    "prepare_context",
    "sample",
    "stream_blanks",
    "top_k_filter",
    "top_p_filter",
]

MASK_ROLES = ("mask", "smask", "gmask")

#: Looks like a mask token (``[mask]``, ``[MASK1]``, ``<mask>``): refused unless it is one of the real
#: spellings, so that a mistyped blank is not silently read as text.
_MASK_LOOKALIKE = re.compile(r"\[[^\[\]\s]*mask[^\[\]\s]*\]|<[^<>\s]*mask[^<>\s]*>", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Settings


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How blanks are decoded (see the module docstring for each setting's exact meaning).

    ``max_new_tokens``: per blank, one int for every blank or a sequence (the ``i``-th entry for the
    ``i``-th blank of each context). ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` restrict
    sampling (the argmax lies within both, so greedy decoding is the same with or without them;
    the CLI refuses them without a temperature, where they are a likely mistake).
    ``num_beams > 1`` is beam search (deterministic: refuses temperature, ``top_k``, ``top_p`` and
    ``stop_strings``); ``length_penalty`` and ``early_stopping`` are refused without it. Invalid or
    contradictory settings raise ValueError naming the setting.
    """

    max_new_tokens: int | tuple[int, ...] = 32
    min_new_tokens: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "stop_strings", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (list, range)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.max_new_tokens, tuple):
            if not self.max_new_tokens:
                raise ValueError("max_new_tokens must be an integer or a non-empty sequence of integers, got ()")
            for limit in self.max_new_tokens:
                _check_int("max_new_tokens", limit, 1)
        else:
            _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > min(self.limits):
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        _check_float("temperature", self.temperature, minimum=0.0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, positive=True)
            if self.top_p > 1:
                raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        _check_float("repetition_penalty", self.repetition_penalty, positive=True)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {self.stop_strings!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0)
        _check_int("num_beams", self.num_beams, 1)
        _check_float("length_penalty", self.length_penalty)
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping must be a bool, got {self.early_stopping!r}")
        if self.num_beams > 1:
            if self.temperature > 0 or self.top_k is not None or self.top_p is not None:
                raise ValueError("num_beams > 1 (beam search) is deterministic: drop temperature, top_k and top_p")
            if self.stop_strings:
                raise ValueError("stop_strings cannot be combined with num_beams > 1 (beam search)")
        elif self.length_penalty != 1.0 or self.early_stopping:
            raise ValueError("length_penalty and early_stopping only apply to beam search: set num_beams > 1")

    @property
    def limits(self) -> tuple[int, ...]:
        """``max_new_tokens`` as a tuple."""
        return self.max_new_tokens if isinstance(self.max_new_tokens, tuple) else (self.max_new_tokens,)

    def limit(self, blank: int) -> int:
        """The largest number of tokens of the ``blank``-th blank of a context (0-based)."""
        limits = self.limits
        return limits[0] if len(limits) == 1 else limits[blank]


#: Decoding settings of the authors' finetuning scripts. ``cnn_dailymail``: THUDM/GLM
#: ``config_tasks/seq_cnndm.sh`` (``--num-beams 5 --length-penalty 0.7 --no-repeat-ngram-size 3
#: --min-tgt-length 55 --tgt-seq-length 160 --select-topk``; no early stopping in
#: ``tasks/seq2seq/evaluate.py``), GLM_SPEC section 5.
GENERATION_PRESETS: dict[str, GenerationConfig] = {
    "cnn_dailymail": GenerationConfig(
        num_beams=5, length_penalty=0.7, no_repeat_ngram_size=3, min_new_tokens=55, max_new_tokens=160
    ),
}


# --------------------------------------------------------------------------------------------
# Sampling and scoring: small functions over a vector (or batch) of logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` with every entry below the ``k``-th largest (of the last dim) set to -inf."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probabilities sum to
    at least ``p`` (the most likely token always stays); the others become -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # Drop a token when the tokens before it already reach p (so the one crossing p is kept).
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def logits_to_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dim (float32 or wider), restricted to the
    ``top_k`` most likely tokens and then to the ``top_p`` nucleus. ``temperature`` must be > 0."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("logits_to_probs needs temperature > 0 (temperature 0 is the argmax)")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id(s) from ``logits [..., V]``: greedy (argmax) when ``temperature`` is 0,
    else a draw from :func:`logits_to_probs`. Returns an int64 tensor of shape ``[...]``."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1, generator=generator).reshape(probs.shape[:-1])


def apply_repetition_penalty(scores: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, in place on ``scores [V]``: the score of each token of
    ``previous`` is divided by ``penalty`` when positive and multiplied by it otherwise (a penalty
    above 1 makes repeats less likely). Returns ``scores``."""
    if previous and penalty != 1.0:
        index = torch.tensor(sorted(set(previous)), dtype=torch.int64, device=scores.device)
        picked = scores.index_select(-1, index)
        scores.index_copy_(-1, index, torch.where(picked > 0, picked / penalty, picked * penalty))
    return scores


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would repeat an ``n``-gram of ``tokens`` if appended to them (fairseq's and
    the authors' ``NoRepeatNGramLogitsProcessor``): those that followed an earlier occurrence of the
    last ``n - 1`` tokens (for ``n = 1``: every token seen)."""
    if n < 1 or len(tokens) + 1 < n:
        return []
    tail = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return sorted({tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == tail})


# --------------------------------------------------------------------------------------------
# The context


def _mask_spellings(tokenizer) -> dict[str, int]:
    return {tokenizer.decode([getattr(tokenizer.special_ids, role)]): getattr(tokenizer.special_ids, role)
            for role in MASK_ROLES}


def encode_context(
    tokenizer,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    add_eos: bool = True,
    special_tokens_as_text: bool = False,
) -> list[int]:
    """The context as the model reads it: ``[CLS]`` (prepended if missing), the text, and ``<eos>``
    when ``add_eos`` and the context ends neither with a mask token nor with ``<eos>``.

    Text: a single space right before a mask token is dropped, because a byte-level BPE puts a
    word's leading space into the word's token, so in training a blank in running text starts
    with a space-prefixed token ("for [MASK] execution" is read as "for[MASK] execution" and the
    blank is filled with " repeated"). With ``special_tokens_as_text`` the texts of the other
    special tokens (``[CLS]``, ``<|endofpiece|>``, ...) typed in the text are plain text, not
    control tokens; the mask spellings ``[MASK]``, ``[sMASK]``, ``[gMASK]`` always mark blanks, and
    anything else that looks like one (``[mask]``, ``<mask>``) is refused (ValueError). Pass ids to
    control the encoding exactly.
    """
    special = tokenizer.special_ids
    if isinstance(text_or_ids, str):
        spellings = _mask_spellings(tokenizer)
        unknown = sorted({m for m in _MASK_LOOKALIKE.findall(text_or_ids) if m not in spellings})
        if unknown:
            raise ValueError(
                f"unknown mask spelling {', '.join(map(repr, unknown))} in the context: blanks are written "
                f"{', '.join(spellings)}"
            )
        masks = "|".join(re.escape(spelling) for spelling in spellings)
        pieces = re.split(f"({masks})", re.sub(f" (?={masks})", "", text_or_ids))
        ids = []
        for i, piece in enumerate(pieces):  # odd pieces are the mask tokens
            ids += [spellings[piece]] if i % 2 else tokenizer.encode(
                piece, special_tokens_as_text=special_tokens_as_text)
    elif isinstance(text_or_ids, torch.Tensor):
        ids = text_or_ids.reshape(-1).tolist()
    else:
        ids = [int(i) for i in text_or_ids]
    if not ids or ids[0] != special.cls:
        ids = [special.cls, *ids]
    masks = {getattr(special, role) for role in MASK_ROLES}
    if add_eos and ids[-1] not in masks and ids[-1] != special.eos:
        ids.append(special.eos)
    return ids


def mask_positions(ids: Sequence[int], special_ids) -> list[int]:
    """Indices of the mask tokens (``[MASK]``, ``[sMASK]``, ``[gMASK]``) in ``ids``, in text order."""
    masks = {getattr(special_ids, role) for role in MASK_ROLES}
    return [i for i, token in enumerate(ids) if token in masks]


def prepare_context(
    tokenizer,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    max_sequence_length: int,
    add_eos: bool = True,
    special_tokens_as_text: bool = False,
) -> list[int]:
    """:func:`encode_context`, checked: raises ValueError for a context without a mask token, one
    longer than ``max_sequence_length`` (the model's positions), or ids outside the vocabulary."""
    context = encode_context(tokenizer, text_or_ids, add_eos=add_eos, special_tokens_as_text=special_tokens_as_text)
    bad = [i for i in context if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ValueError(
            f"the context holds ids outside the tokenizer's vocabulary of {tokenizer.vocab_size}: {bad[:5]}"
        )
    if len(context) > max_sequence_length:
        raise ValueError(
            f"the context is {len(context)} tokens long ([CLS] and <eos> included), longer than the "
            f"model's max_sequence_length ({max_sequence_length})"
        )
    if not mask_positions(context, tokenizer.special_ids):
        raise ValueError("the context holds no mask token ([MASK], [sMASK] or [gMASK]): there is no blank to fill")
    return context


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Blank:
    """One filled blank. ``position``: index of its mask token in ``FillResult.context_ids``;
    ``token_ids``: the generated tokens (without ``<sop>`` and the end token); ``stop``: what ended
    it: ``"<eop>"``, ``"<eos>"``, ``"stop_token"`` (one of ``stop_token_ids``), ``"stop_string"``,
    ``"max_new_tokens"`` or ``"no_allowed_token"`` (the constraints left no token to draw);
    ``score``: the beam-search score of the chosen hypothesis (None without beam search)."""

    position: int
    mask_token: str
    token_ids: tuple[int, ...]
    text: str
    stop: str
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class FillResult:
    """The filled context. ``text``: the context (without ``[CLS]`` and a final ``<eos>``) with
    each mask token replaced by its blank's tokens. ``sequence_ids`` and ``position_ids``
    (``[2, L]``: positions, block positions) are the whole sequence decoded, context then each
    blank's ``<sop>`` and tokens, as the model saw it."""

    context_ids: tuple[int, ...]
    blanks: tuple[Blank, ...]
    text: str
    sequence_ids: tuple[int, ...]
    position_ids: tuple[tuple[int, ...], tuple[int, ...]]

    @property
    def blank_token_ids(self) -> list[list[int]]:
        return [list(blank.token_ids) for blank in self.blanks]


@dataclasses.dataclass(frozen=True)
class BlankUpdate:
    """A piece of a blank as it is decoded (what :func:`stream_blanks` yields).

    ``context``: the index of the context in the call's list (0 for a single context); ``blank``:
    the blank's index in text order. ``token_ids`` / ``text``: the tokens decoded since the
    previous update of this blank, and the text they complete (held back while a character is
    incomplete, so that the texts of a blank's updates join up to its final text). Beam search
    knows a blank's tokens only once it is done: it sends one update per blank. ``finished`` is set
    on a blank's last update, ``result`` on a context's last update.
    """

    context: int
    blank: int
    token_ids: tuple[int, ...]
    text: str
    finished: Blank | None = None
    result: FillResult | None = None


# --------------------------------------------------------------------------------------------
# Decoding state: a batch row, the text of a growing blank, and the two searches


class _Row:
    """One batch row: a sequence as the model reads it (ids and 2D positions, ``sep`` its context's
    length), how many of its leading tokens the cache holds (``fed``), and which row of its
    context's previous step it continues (``source``: its cache row is that one's)."""

    __slots__ = ("ids", "positions", "blocks", "sep", "fed", "source")

    def __init__(self, ids: list[int], positions: list[int], blocks: list[int], sep: int, fed: int = 0,
                 source: int = 0) -> None:
        self.ids, self.positions, self.blocks = ids, positions, blocks
        self.sep, self.fed, self.source = sep, fed, source

    def append(self, token: int, position: int, block: int) -> None:
        self.ids.append(token)
        self.positions.append(position)
        self.blocks.append(block)

    def child(self, source: int) -> _Row:
        """A copy that continues this row (its row ``source`` in the previous step)."""
        return _Row(list(self.ids), list(self.positions), list(self.blocks), self.sep, self.fed, source)


class _TextStream:
    """Hands out the text of a growing blank in pieces that join up to its final text: a trailing
    incomplete byte-level character (decoded as U+FFFD) is held back until its bytes arrive."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def piece(self, tokens: Sequence[int]) -> str:
        ready = self.tokenizer.decode(list(tokens)).rstrip("\ufffd")
        if not ready.startswith(self.sent):
            return ""
        piece, self.sent = ready[len(self.sent) :], ready
        return piece

    def rest(self, final_text: str) -> str:
        return final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every context of one call shares: the settings and the tokenizer's ids."""

    config: GenerationConfig
    tokenizer: Any
    stops: dict[int, str]  # token id -> the Blank.stop it gives
    mask_names: dict[int, str]  # mask token id -> its spelling


def _constrain(scores: torch.Tensor, tokens: Sequence[int], setup: _Setup) -> None:
    """Applies the constraints on a blank's tokens so far to one row of scores ``[V]``, in place."""
    config = setup.config
    if len(tokens) < config.min_new_tokens:
        scores[list(setup.stops)] = float("-inf")
    apply_repetition_penalty(scores, tokens, config.repetition_penalty)
    if config.no_repeat_ngram_size:
        banned = banned_ngram_tokens(tokens, config.no_repeat_ngram_size)
        if banned:
            scores[banned] = float("-inf")


class _ContextSearch:
    """Fills the blanks of one context in text order: the bookkeeping both searches share.

    ``rows``: the batch rows this context decodes at the next step (empty once it is done).
    """

    def __init__(self, index: int, context: list[int], setup: _Setup) -> None:
        self.index = index
        self.context = context
        self.blanks_at = mask_positions(context, setup.tokenizer.special_ids)
        self.setup = setup
        self.filled: list[Blank] = []
        self.text = _TextStream(setup.tokenizer)
        self.streamed = 0  # tokens of the current blank already sent in updates
        sop = setup.tokenizer.special_ids.sop
        first = _Row(list(context), list(range(len(context))), [0] * len(context), len(context))
        first.append(sop, self.blanks_at[0], 1)
        self.rows = [first]

    @property
    def position(self) -> int:
        """Index of the current blank's mask token."""
        return self.blanks_at[len(self.filled)]

    @property
    def limit(self) -> int:
        return self.setup.config.limit(len(self.filled))

    def _update(self, tokens: Sequence[int]) -> BlankUpdate:
        new = tuple(tokens[self.streamed :])
        self.streamed = len(tokens)
        return BlankUpdate(self.index, len(self.filled), new, self.text.piece(tokens))

    def _finish_blank(self, tokens: Sequence[int], stop: str, score: float | None = None) -> BlankUpdate:
        """Records the current blank; the caller then starts the next one unless the context is done."""
        tokenizer = self.setup.tokenizer
        blank = Blank(self.position, self.setup.mask_names[self.context[self.position]], tuple(tokens),
                      tokenizer.decode(list(tokens)), stop, score)
        update = BlankUpdate(self.index, len(self.filled), tuple(tokens[self.streamed :]),
                             self.text.rest(blank.text), finished=blank)
        self.filled.append(blank)
        self.text, self.streamed = _TextStream(tokenizer), 0
        if len(self.filled) == len(self.blanks_at):
            self.rows = []
            update = dataclasses.replace(update, result=self.result())
        return update

    def result(self) -> FillResult:
        ids, positions = list(self.context), list(range(len(self.context)))
        blocks = [0] * len(self.context)
        for blank in self.filled:
            ids += [self.setup.tokenizer.special_ids.sop, *blank.token_ids]
            positions += [blank.position] * (len(blank.token_ids) + 1)
            blocks += range(1, len(blank.token_ids) + 2)
        return FillResult(
            context_ids=tuple(self.context),
            blanks=tuple(self.filled),
            text=_filled_text(self.setup.tokenizer, self.context, self.filled),
            sequence_ids=tuple(ids),
            position_ids=(tuple(positions), tuple(blocks)),
        )


class _TokenSearch(_ContextSearch):
    """Greedy or sampled decoding of one context, on one batch row, drawing from ``generator``."""

    def __init__(self, index: int, context: list[int], setup: _Setup, generator: torch.Generator | None) -> None:
        super().__init__(index, context, setup)
        self.generator = generator
        self.tokens: list[int] = []  # of the current blank

    def constrain(self, scores: torch.Tensor) -> None:
        _constrain(scores[0], self.tokens, self.setup)

    def advance(self, token: int | None) -> list[BlankUpdate]:
        """Takes the drawn token (None: the constraints allowed none)."""
        if token is None:
            return [self._end_blank("no_allowed_token")]
        if token in self.setup.stops:  # not kept; the last kept token was fed already
            return [self._end_blank(self.setup.stops[token])]
        self.tokens.append(token)
        self.rows[0].append(token, self.position, len(self.tokens) + 1)
        updates = [self._update(self.tokens)]
        config = self.setup.config
        if len(self.tokens) == self.limit:
            updates.append(self._end_blank("max_new_tokens"))
        elif config.stop_strings and len(self.tokens) >= config.min_new_tokens:
            text = self.setup.tokenizer.decode(self.tokens)
            if any(stop in text for stop in config.stop_strings):
                updates.append(self._end_blank("stop_string"))
        return updates

    def _end_blank(self, stop: str) -> BlankUpdate:
        update = self._finish_blank(self.tokens, stop)
        self.tokens = []
        if self.rows:  # the next blank continues the row (a last token not yet fed goes with its <sop>)
            self.rows[0].append(self.setup.tokenizer.special_ids.sop, self.position, 1)
        return update


class _FinishedHypotheses:
    """The best ``size`` finished hypotheses of one blank, scored as the authors'
    ``BeamHypotheses``: ``sum of log-probabilities / max(len, 1) ** length_penalty``."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool) -> None:
        self.size, self.length_penalty, self.early_stopping = size, length_penalty, early_stopping
        self.items: list[tuple[float, tuple[int, ...], str]] = []  # (score, tokens, stop), in order of arrival

    def add(self, tokens: Sequence[int], sum_logprobs: float, stop: str) -> None:
        score = sum_logprobs / max(len(tokens), 1) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tuple(tokens), stop))
            if len(self.items) > self.size:  # drop the worst (the earliest of equals)
                del self.items[min(range(len(self.items)), key=lambda i: (self.items[i][0], i))]

    @property
    def worst(self) -> float:
        return min(score for score, _, _ in self.items)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """Whether no running beam (best sum ``best_sum_logprobs`` after ``length`` tokens) is
        expected to beat the worst finished one (the authors' test)."""
        if len(self.items) < self.size:
            return False
        if self.early_stopping:
            return True
        return self.worst >= best_sum_logprobs / max(length, 1) ** self.length_penalty

    def best(self) -> tuple[float, tuple[int, ...], str] | None:
        """The best hypothesis (the latest of equals, as the authors' stable sort and pop)."""
        if not self.items:
            return None
        return self.items[max(range(len(self.items)), key=lambda i: (self.items[i][0], i))]


class _BeamSearch(_ContextSearch):
    """Beam search over the blanks of one context (see the module docstring); ``rows`` are the
    running beams of the current blank (one row, ending in its ``<sop>``, before its first step)."""

    def __init__(self, index: int, context: list[int], setup: _Setup) -> None:
        super().__init__(index, context, setup)
        self._start_blank()

    def _start_blank(self) -> None:
        config = self.setup.config
        self.beam_tokens: list[list[int]] = [[]]
        self.beam_scores: list[float] = [0.0]
        self.finished = _FinishedHypotheses(config.num_beams, config.length_penalty, config.early_stopping)
        self.prefix_length = len(self.rows[0].ids)  # tokens before the blank's first one

    def constrain(self, scores: torch.Tensor) -> None:
        for row_scores, tokens in zip(scores, self.beam_tokens):
            _constrain(row_scores, tokens, self.setup)

    def advance(self, scores: torch.Tensor) -> list[BlankUpdate]:
        """Takes the constrained log-probabilities ``[beams, V]`` of the next token."""
        num_beams, vocab = self.setup.config.num_beams, scores.shape[-1]
        totals = scores + torch.tensor(self.beam_scores, dtype=scores.dtype, device=scores.device)[:, None]
        top = torch.topk(totals.reshape(-1), min(2 * num_beams, totals.numel()))
        top_totals, top_indices = top.values.tolist(), top.indices.tolist()
        length = len(self.beam_tokens[0])  # tokens of every beam before this step
        rows, tokens, sums = [], [], []
        for rank, (total, index) in enumerate(zip(top_totals, top_indices)):
            if total == float("-inf"):
                break
            beam, token = divmod(index, vocab)
            if token in self.setup.stops:
                if rank < num_beams:
                    self.finished.add(self.beam_tokens[beam], total, self.setup.stops[token])
                continue
            row = self.rows[beam].child(source=beam)
            row.append(token, self.position, length + 2)
            rows.append(row)
            tokens.append([*self.beam_tokens[beam], token])
            sums.append(total)
            if len(rows) == num_beams:
                break
        done = not rows or self.finished.is_done(top_totals[0], length)
        if not done and length + 1 == self.limit:
            for beam_tokens, total in zip(tokens, sums):
                self.finished.add(beam_tokens, total, "max_new_tokens")
            done = True
        if not done:
            self.rows, self.beam_tokens, self.beam_scores = rows, tokens, sums
            return []
        best = self.finished.best()
        score, chosen, stop = best if best is not None else (None, (), "no_allowed_token")
        source = max(range(len(self.rows)), key=lambda r: _common_prefix(self.beam_tokens[r], chosen))
        update = self._finish_blank(chosen, stop, score)
        if self.rows:  # the next blank starts from the chosen hypothesis, on the cache of one beam
            row = self.rows[source].child(source=source)
            del row.ids[self.prefix_length :], row.positions[self.prefix_length :], row.blocks[self.prefix_length :]
            row.fed = min(row.fed, self.prefix_length + _common_prefix(self.beam_tokens[source], chosen))
            for i, token in enumerate(chosen):
                row.append(token, self.filled[-1].position, i + 2)
            row.append(self.setup.tokenizer.special_ids.sop, self.position, 1)
            self.rows = [row]
            self._start_blank()
        return [update]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# The batch: one forward pass per step over every row still decoding


class _ModelRunner:
    """Runs the model over the rows' new tokens, one forward pass per step for the whole batch,
    and returns each row's next-token logits ``[rows, V]``.

    With the cache a row feeds only the tokens its cache lacks (rows padded to the longest feed),
    its cache row continuing the row it derives from (``select``: finished rows leave, beams follow
    their parents) and trimmed to the tokens it holds (``row.fed``: padding fed earlier goes).
    Without, every row is fed whole at every step (the recomputation baseline; same tokens).
    """

    def __init__(self, model, *, use_cache: bool, capacity: int, pad_id: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = KVCache(capacity) if use_cache else None
        self.pad_id = pad_id

    def logits(self, rows: Sequence[_Row], sources: Sequence[int]) -> torch.Tensor:
        cache = self.cache
        if cache is not None and cache.lengths:
            cache.select(sources)
            fed = [row.fed for row in rows]
            if fed != cache.lengths:
                cache.trim(fed)
        starts = [row.fed if cache is not None else 0 for row in rows]
        counts = [len(row.ids) - start for row, start in zip(rows, starts)]
        width = max(counts)
        pad = [[0] * (width - n) for n in counts]
        ids = [row.ids[s:] + [self.pad_id] * len(p) for row, s, p in zip(rows, starts, pad)]
        positions = [[row.positions[s:] + p, row.blocks[s:] + p] for row, s, p in zip(rows, starts, pad)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        logits = self.model(
            as_tensor(ids), as_tensor(positions), as_tensor([row.sep for row in rows]),
            kv_cache=cache, logits_index=as_tensor([n - 1 for n in counts]),
        )
        if cache is not None:  # the padding a row was fed is trimmed off at the next step
            for row in rows:
                row.fed = len(row.ids)
        return logits


def _choose_tokens(scores: torch.Tensor, config: GenerationConfig, generators: Sequence[torch.Generator | None]):
    """The next token of each row of constrained ``scores [rows, V]`` (None where every token is
    banned): argmax at temperature 0, else a draw from each row's own generator."""
    allowed = torch.isfinite(scores.amax(dim=-1)).tolist()
    if config.temperature == 0:
        chosen = scores.argmax(dim=-1).tolist()
    else:
        probs = logits_to_probs(scores, config.temperature, config.top_k, config.top_p)
        nothing = torch.zeros(1, dtype=torch.int64, device=scores.device)
        draws = [torch.multinomial(probs[i : i + 1], 1, generator=generator).view(1) if ok else nothing
                 for i, (generator, ok) in enumerate(zip(generators, allowed))]
        chosen = torch.cat(draws).tolist()
    return [token if ok else None for token, ok in zip(chosen, allowed)]


def _decode_steps(searches: list[_ContextSearch], runner: _ModelRunner, setup: _Setup) -> Iterator[BlankUpdate]:
    beams = isinstance(searches[0], _BeamSearch)
    vocab_size = setup.tokenizer.vocab_size
    active = [search for search in searches if search.rows]
    sources: list[int] = []
    while active:
        logits = runner.logits([row for search in active for row in search.rows], sources)
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores[:, vocab_size:] = float("-inf")  # vocabulary padding rows are not tokens
        if beams:
            scores = torch.log_softmax(scores, dim=-1)
        spans, start = [], 0
        for search in active:
            spans.append((start, start + len(search.rows)))
            search.constrain(scores[start : start + len(search.rows)])
            start += len(search.rows)
        if beams:
            updates = [search.advance(scores[lo:hi]) for search, (lo, hi) in zip(active, spans)]
        else:
            tokens = _choose_tokens(scores, setup.config, [search.generator for search in active])
            updates = [search.advance(token) for search, token in zip(active, tokens)]
        sources = [lo + row.source for search, (lo, _) in zip(active, spans) for row in search.rows]
        active = [search for search in active if search.rows]
        for search_updates in updates:
            yield from search_updates


# --------------------------------------------------------------------------------------------
# Entry points


def _as_contexts(text_or_ids) -> tuple[list, bool]:
    """(contexts, whether a list of contexts was given)."""
    if isinstance(text_or_ids, str):
        return [text_or_ids], False
    if isinstance(text_or_ids, torch.Tensor):
        if text_or_ids.dim() > 1:
            raise TypeError("a tensor context must be 1-D (token ids); pass a list of contexts for a batch")
        return [text_or_ids], False
    if not isinstance(text_or_ids, Sequence):
        raise TypeError(f"contexts must be a str, token ids or a list of them, got {type(text_or_ids).__name__}")
    items = list(text_or_ids)
    if items and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return [items], False
    return items, True


def _resolve_config(config: GenerationConfig | str | None, settings: dict[str, Any]) -> GenerationConfig:
    if isinstance(config, str):
        if config not in GENERATION_PRESETS:
            raise ValueError(f"unknown generation preset {config!r}; choose one of {', '.join(GENERATION_PRESETS)}")
        config = GENERATION_PRESETS[config]
    config = config or GenerationConfig()
    fields = {field.name for field in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(
            f"unknown generation setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **settings)


def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int | None]:
    seeds = [seed] * count if seed is None or isinstance(seed, int) else list(seed)
    if len(seeds) != count:
        raise ValueError(f"seed must be one int or one per context ({count}), got {len(seeds)} seeds")
    for value in seeds:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return seeds


def stream_blanks(
    model,
    tokenizer,
    text_or_ids,
    config: GenerationConfig | str | None = None,
    *,
    seed: int | Sequence[int] | None = None,
    use_cache: bool = True,
    add_eos: bool = True,
    special_tokens_as_text: bool = False,
    **settings: Any,
) -> Iterator[BlankUpdate]:
    """Fills the blanks of one or many contexts like :func:`fill_blanks`, yielding each blank's
    tokens and text as they are decoded (:class:`BlankUpdate`; the last update of each context
    carries its :class:`FillResult`). Arguments are checked before the first update."""
    contexts, _ = _as_contexts(text_or_ids)
    config = _resolve_config(config, settings)
    model_config = model.config
    longest = max(config.limits)
    if longest + 1 > model_config.max_sequence_length:
        raise ValueError(
            f"max_new_tokens ({longest}) + 1 must not exceed the model's max_sequence_length "
            f"({model_config.max_sequence_length}): block positions run up to max_new_tokens + 1"
        )
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {model_config.vocab_size}"
        )
    bad_stops = [token for token in config.stop_token_ids if token >= tokenizer.vocab_size]
    if bad_stops:
        raise ValueError(
            f"stop_token_ids must be ids of the tokenizer's vocabulary of {tokenizer.vocab_size}, got {bad_stops}"
        )
    seeds = _seeds(seed, len(contexts))
    encoded = []
    for i, item in enumerate(contexts):
        try:
            encoded.append(prepare_context(tokenizer, item, max_sequence_length=model_config.max_sequence_length,
                                           add_eos=add_eos, special_tokens_as_text=special_tokens_as_text))
        except ValueError as exc:
            raise ValueError(f"context {i}: {exc}" if len(contexts) > 1 else str(exc)) from None
        blanks = len(mask_positions(encoded[-1], tokenizer.special_ids))
        if len(config.limits) > 1 and blanks > len(config.limits):
            raise ValueError(
                f"max_new_tokens gives limits for {len(config.limits)} blanks, but context {i} has {blanks}"
            )
    return _decode_contexts(model, tokenizer, encoded, config, seeds, use_cache)


def _decode_contexts(model, tokenizer, contexts: list[list[int]], config: GenerationConfig,
                     seeds: list[int | None], use_cache: bool, *, beam_search: bool | None = None
                     ) -> Iterator[BlankUpdate]:
    """Decodes checked contexts. ``beam_search`` (default: ``num_beams > 1``) forces the search;
    beam search with one beam gives the greedy tokens, which the tests check this way."""
    if not contexts:
        return
    special = tokenizer.special_ids
    stops = {token: "stop_token" for token in config.stop_token_ids}
    stops.update({special.eop: "<eop>", special.eos: "<eos>"})
    setup = _Setup(config, tokenizer, stops, {v: k for k, v in _mask_spellings(tokenizer).items()})
    device = next(model.parameters()).device
    searches: list[_ContextSearch] = []
    for i, (context, seed) in enumerate(zip(contexts, seeds)):
        if beam_search if beam_search is not None else config.num_beams > 1:
            searches.append(_BeamSearch(i, context, setup))
        else:
            sampled = config.temperature > 0 and seed is not None
            generator = torch.Generator(device=device).manual_seed(seed) if sampled else None
            searches.append(_TokenSearch(i, context, setup, generator))
    # Every row fits: its context, each blank's <sop> and tokens, and the padding of one step.
    longest = max(config.limits)
    capacity = max(len(c) + sum(config.limit(b) + 1 for b in range(len(s.blanks_at)))
                   for c, s in zip(contexts, searches)) + longest + 1
    runner = _ModelRunner(model, use_cache=use_cache, capacity=capacity, pad_id=special.pad)
    training = model.training
    model.eval()  # no dropout: decoding is deterministic (cache == recomputation, batch == alone)
    try:
        with torch.no_grad():
            yield from _decode_steps(searches, runner, setup)
    finally:
        model.train(training)


def fill_blanks(
    model,
    tokenizer,
    text_or_ids,
    config: GenerationConfig | str | None = None,
    *,
    seed: int | Sequence[int] | None = None,
    use_cache: bool = True,
    add_eos: bool = True,
    special_tokens_as_text: bool = False,
    **settings: Any,
) -> FillResult | list[FillResult]:
    """Fill every mask token (``[MASK]``, ``[sMASK]``, ``[gMASK]``) of a context (GLM_SPEC 5), or
    of each context of a list (decoded together; then a list of results, in order).

    A context is text (encoded by :func:`encode_context`; ``special_tokens_as_text`` as there) or
    token ids. ``config``: a :class:`GenerationConfig` or the name of one of
    :data:`GENERATION_PRESETS`; keyword ``settings`` (``max_new_tokens=...``, ``temperature=...``,
    any field of :class:`GenerationConfig`) override its fields. ``seed`` (an int for every context,
    or one per context) makes sampling repeatable: each context draws from its own generator, so
    its tokens do not depend on the other contexts of the batch. ``use_cache=False`` recomputes the
    whole sequence for every token (same tokens, slower). The model runs in eval mode (its mode is
    restored afterwards) on its device in its dtype (wrap the call in ``torch.autocast`` for mixed
    precision). Raises ValueError for a
    context without a mask token, longer than the model's ``max_sequence_length`` or with an
    unknown mask spelling (naming the context of a list), and for bad settings (naming them).
    """
    contexts, batch = _as_contexts(text_or_ids)
    results: list[FillResult | None] = [None] * len(contexts)
    for update in stream_blanks(model, tokenizer, text_or_ids, config, seed=seed, use_cache=use_cache,
                                add_eos=add_eos, special_tokens_as_text=special_tokens_as_text, **settings):
        if update.result is not None:
            results[update.context] = update.result
    return results if batch else results[0]


def _filled_text(tokenizer, context: Sequence[int], blanks: Sequence[Blank]) -> str:
    """The context's text with each mask token replaced by its blank (decoded in one piece, so
    byte-level tokens that split a character still join up)."""
    special = tokenizer.special_ids
    body = list(context)
    fills = {blank.position: blank.token_ids for blank in blanks}
    ids: list[int] = []
    for index, token in enumerate(body):
        if index == 0 and token == special.cls:
            continue
        if index == len(body) - 1 and token == special.eos:
            continue
        ids.extend(fills.get(index, (token,)))
    return tokenizer.decode(ids)
