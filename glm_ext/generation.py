"""Blank filling with a GLM (GLM_SPEC section 5): sampling functions and :func:`fill_blanks`.

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

Two deliberate differences. By default a blank holds at least one token (``min_new_tokens=1``:
pretraining spans are never empty, so a weak model's immediate ``<eop>`` is never a right answer).
And when a blank stops at ``max_new_tokens``, the authors' cached decoding never feeds its last
token to the model, so the next blank does not see it; here it is fed with the next blank's
``<sop>``, so decoding with the key/value cache and recomputing everything give the same tokens in
every case.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch

from glm_ext.model import KVCache

__all__ = [
    "Blank",
    "FillResult",
    "encode_context",
    "fill_blanks",
    "mask_positions",
    "sample",
    "top_k_filter",
    "top_p_filter",
]

MASK_ROLES = ("mask", "smask", "gmask")


# --------------------------------------------------------------------------------------------
# Sampling: small functions over a vector (or batch) of logits


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
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id(s) from ``logits [..., V]``: greedy (argmax) when ``temperature`` is 0,
    else a draw from ``softmax(logits / temperature)`` restricted by ``top_k`` and ``top_p``.
    Returns an int64 tensor of shape ``[...]``."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1, generator=generator).reshape(probs.shape[:-1])


# --------------------------------------------------------------------------------------------
# The context


def encode_context(tokenizer, text_or_ids: str | Sequence[int] | torch.Tensor, *, add_eos: bool = True) -> list[int]:
    """The context as the model reads it: ``[CLS]`` (prepended if missing), the text, and ``<eos>``
    when ``add_eos`` and the context ends neither with a mask token nor with ``<eos>``.

    Text: a single space right before a mask token is dropped, because a byte-level BPE puts a
    word's leading space into the word's token, so in training a blank in running text starts
    with a space-prefixed token ("for [MASK] execution" is read as "for[MASK] execution" and the
    blank is filled with " repeated"). Pass ids to control the encoding exactly.
    """
    special = tokenizer.special_ids
    if isinstance(text_or_ids, str):
        masks = "|".join(re.escape(tokenizer.decode([getattr(special, role)])) for role in MASK_ROLES)
        ids = tokenizer.encode(re.sub(f" (?={masks})", "", text_or_ids))
    else:
        ids = torch.as_tensor(text_or_ids).reshape(-1).tolist() if isinstance(text_or_ids, torch.Tensor) \
            else [int(i) for i in text_or_ids]
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


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Blank:
    """One filled blank. ``position``: index of its mask token in ``FillResult.context_ids``;
    ``token_ids``: the generated tokens (without ``<sop>`` and the end token); ``stop``:
    ``"<eop>"``, ``"<eos>"`` or ``"max_new_tokens"``."""

    position: int
    mask_token: str
    token_ids: tuple[int, ...]
    text: str
    stop: str


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


# --------------------------------------------------------------------------------------------
# Decoding


class _Decoder:
    """The sequence being decoded and the model's view of it.

    Tokens are appended with their 2D positions; :meth:`next_logits` runs the model over what it
    has not seen yet (with the cache: only the new tokens; without: everything again) and returns
    the logits after the last token. ``sep`` is the context length throughout.
    """

    def __init__(self, model, context: Sequence[int], *, device: torch.device, use_cache: bool, capacity: int):
        self.model = model
        self.device = device
        self.ids = list(context)
        self.positions = list(range(len(context)))
        self.blocks = [0] * len(context)
        self.sep = torch.tensor([len(context)], dtype=torch.int64, device=device)
        self.cache = KVCache(capacity) if use_cache else None
        self.fed = 0  # tokens already in the cache

    def append(self, token: int, position: int, block: int) -> None:
        self.ids.append(token)
        self.positions.append(position)
        self.blocks.append(block)

    def next_logits(self) -> torch.Tensor:
        start = self.fed if self.cache is not None else 0
        ids = torch.tensor([self.ids[start:]], dtype=torch.int64, device=self.device)
        positions = torch.tensor([[self.positions[start:], self.blocks[start:]]], dtype=torch.int64, device=self.device)
        logits = self.model(ids, positions, self.sep, kv_cache=self.cache)
        if self.cache is not None:
            self.fed = len(self.ids)
        return logits[0, -1]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def fill_blanks(
    model,
    tokenizer,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int = 32,
    min_new_tokens: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    add_eos: bool = True,
) -> FillResult:
    """Fill every mask token (``[MASK]``, ``[sMASK]``, ``[gMASK]``) of a context (GLM_SPEC 5).

    ``text_or_ids``: text (encoded by :func:`encode_context`) or token ids. Decoding is greedy
    when ``temperature`` is 0, else sampled (``top_k``, ``top_p``; ``seed`` makes it repeatable).
    Each blank gets at most ``max_new_tokens`` tokens and at least ``min_new_tokens``: until then
    ``<eop>`` and ``<eos>`` are not drawn (a pretraining span is never empty, so an empty blank is
    never right; ``min_new_tokens=0`` lets a blank end at once, as the authors' code does).
    ``use_cache=False`` recomputes the whole sequence for every token (same tokens, slower). Ids of
    the model's vocabulary padding (at or above ``tokenizer.vocab_size``) are never produced. The
    model is used as it is (device, dtype; wrap the call in ``torch.autocast`` for mixed precision).
    Raises ValueError for a context without a mask token or longer than the model's
    ``max_sequence_length``, and for bad arguments.
    """
    config = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must lie in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if max_new_tokens + 1 > config.max_sequence_length:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) + 1 must not exceed the model's max_sequence_length "
            f"({config.max_sequence_length}): block positions run up to max_new_tokens + 1"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {config.vocab_size}"
        )
    _check_sampling(temperature, top_k, top_p)
    context = encode_context(tokenizer, text_or_ids, add_eos=add_eos)
    special = tokenizer.special_ids
    bad = [i for i in context if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ValueError(
            f"the context holds ids outside the tokenizer's vocabulary of {tokenizer.vocab_size}: {bad[:5]}"
        )
    if len(context) > config.max_sequence_length:
        raise ValueError(
            f"the context is {len(context)} tokens long ([CLS] and <eos> included), longer than the "
            f"model's max_sequence_length ({config.max_sequence_length})"
        )
    blanks_at = mask_positions(context, special)
    if not blanks_at:
        raise ValueError("the context holds no mask token ([MASK], [sMASK] or [gMASK]): there is no blank to fill")

    device = _model_device(model)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    decoder = _Decoder(model, context, device=device, use_cache=use_cache,
                       capacity=len(context) + len(blanks_at) * (max_new_tokens + 1))
    stops = {special.eop: "<eop>", special.eos: "<eos>"}
    names = {getattr(special, role): tokenizer.decode([getattr(special, role)]) for role in MASK_ROLES}

    blanks = []
    for position in blanks_at:
        decoder.append(special.sop, position, 1)
        generated: list[int] = []
        stop = "max_new_tokens"
        while len(generated) < max_new_tokens:
            logits = decoder.next_logits()
            logits[tokenizer.vocab_size :] = float("-inf")  # vocabulary padding rows are not tokens
            if len(generated) < min_new_tokens:
                logits[list(stops)] = float("-inf")
            token = int(sample(logits, temperature, top_k, top_p, generator))
            if token in stops:
                stop = stops[token]
                break
            generated.append(token)
            decoder.append(token, position, len(generated) + 1)
        blanks.append(Blank(position, names[context[position]], tuple(generated), tokenizer.decode(generated), stop))

    return FillResult(
        context_ids=tuple(context),
        blanks=tuple(blanks),
        text=_filled_text(tokenizer, context, blanks),
        sequence_ids=tuple(decoder.ids),
        position_ids=(tuple(decoder.positions), tuple(decoder.blocks)),
    )


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
