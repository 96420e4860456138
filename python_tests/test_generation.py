"""glm_ext.generation: blank filling (GLM_SPEC 5) and the sampling functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import io
import json
import math
import subprocess
import sys
from pathlib import Path

from glm_ext import generation
from glm_ext.checkpoint import load_checkpoint, save_checkpoint
from glm_ext.cli import main as cli_main
from glm_ext.generation import (
    GENERATION_PRESETS,
    GenerationConfig,
    apply_repetition_penalty,
    banned_ngram_tokens,
    encode_context,
    fill_blanks,
    mask_positions,
    sample,
    stream_blanks,
    top_k_filter,
    top_p_filter,
)
from glm_ext.model import GLMConfig, GLMModel, KVCache, pad_vocab_size
from glm_ext.tokenizer import GLMTokenizer
from tokenizer_files import train_sentencepiece, write_bpe_files, write_wordpiece_vocab

TEXTS = [
    'The "while" statement is used for repeated execution as long as an expression is true.',
    'The "if" statement is used for conditional execution.',
    'A "break" statement executed in the first suite terminates the loop without executing the else clause.',
    'The "for" statement is used to iterate over the elements of a sequence (such as a string, tuple or list).',
]


@pytest.fixture(scope="module")
def tokenizer():
    return GLMTokenizer.train(TEXTS * 4, 300)


def random_model(tokenizer, encoding="learned_2d", max_sequence_length=64, seed=0):
    """A float64 model whose every parameter is random (so greedy choices are far from ties)."""
    config = GLMConfig(
        vocab_size=pad_vocab_size(tokenizer.vocab_size), hidden_size=32, num_layers=2, num_heads=4,
        max_sequence_length=max_sequence_length, position_encoding=encoding,
    )
    generator = torch.Generator().manual_seed(seed)
    model = GLMModel(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.3)
    return model


class Spy(nn.Module):
    """Wraps a model: records every forward call's inputs and, through ``force(position, block)``
    (the 2D position of the last input token -> a token id or None), dictates the next token."""

    def __init__(self, model, force=None):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.force = force
        self.calls = []

    def forward(self, input_ids, position_ids, sep, *, kv_cache=None, logits_index=None):
        self.calls.append((input_ids.clone(), position_ids.clone(), sep.clone(), kv_cache))
        logits = self.inner(input_ids, position_ids, sep, kv_cache=kv_cache, logits_index=logits_index)
        if self.force is not None:
            last = logits_index if logits_index is not None else torch.full_like(sep, input_ids.shape[1] - 1)
            for row, index in enumerate(last.tolist()):
                token = self.force(int(position_ids[row, 0, index]), int(position_ids[row, 1, index]))
                if token is not None:
                    logits[row, ..., token] += 1e4
        return logits


def context_ids(tokenizer, *pieces):
    """Ids of text pieces and mask roles (``"mask"``, ``"smask"``, ``"gmask"``), without [CLS]/<eos>."""
    ids = []
    for piece in pieces:
        is_mask = piece in ("mask", "smask", "gmask")
        ids += [getattr(tokenizer.special_ids, piece)] if is_mask else tokenizer.encode(piece)
    return ids


# ---------------------------------------------------------------------------------------------
# Cache and recomputation


@pytest.mark.parametrize("encoding", ["learned_2d", "rotary_2d"])
def test_cached_decoding_gives_the_tokens_of_full_recomputation(tokenizer, encoding):
    model = random_model(tokenizer, encoding)
    ids = context_ids(tokenizer, "The", "mask", " statement is used for", "smask", " execution as long as", "gmask")
    results = [fill_blanks(model, tokenizer, ids, max_new_tokens=5, use_cache=cache) for cache in (True, False)]
    cached, full = results
    assert cached.blank_token_ids == full.blank_token_ids
    assert cached.sequence_ids == full.sequence_ids and cached.position_ids == full.position_ids
    assert len(cached.blanks) == 3 and all(len(b.token_ids) > 1 for b in cached.blanks)
    assert len({b.token_ids for b in cached.blanks}) > 1  # the blanks differ: positions matter


def test_cached_decoding_matches_with_early_ends_and_sampling(tokenizer):
    # The first blank ends at <eop> after 2 tokens, the others run into max_new_tokens, so both the
    # plain path and the carry-over of an unfed last token to the next blank are compared.
    model = random_model(tokenizer, seed=1)
    ids = context_ids(tokenizer, "A", "mask", " statement executed in the", "mask", " terminates the", "mask", ".")
    first = mask_positions([tokenizer.special_ids.cls, *ids], tokenizer.special_ids)[0]
    force = lambda position, block: tokenizer.special_ids.eop if (position, block) == (first, 3) else None  # noqa: E731
    for kwargs in (dict(), dict(temperature=1.0, top_k=50, top_p=0.9, seed=7)):
        cached = fill_blanks(Spy(model, force), tokenizer, ids, max_new_tokens=4, **kwargs)
        full = fill_blanks(Spy(model, force), tokenizer, ids, max_new_tokens=4, use_cache=False, **kwargs)
        assert cached.blank_token_ids == full.blank_token_ids
        assert [b.stop for b in cached.blanks] == ["<eop>", "max_new_tokens", "max_new_tokens"]
        assert len(cached.blanks[0].token_ids) == 2


# ---------------------------------------------------------------------------------------------
# What the model is fed (GLM_SPEC 5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_positions_and_block_positions_follow_the_spec(tokenizer, use_cache):
    ids = context_ids(tokenizer, "The", "mask", " statement is used for", "mask", " execution.")
    context = encode_context(tokenizer, ids)
    n = len(context)
    p1, p2 = mask_positions(context, tokenizer.special_ids)
    lengths = {p1: 3, p2: 1}  # tokens generated per blank before the forced <eop>
    eop = tokenizer.special_ids.eop
    force = lambda position, block: eop if block == lengths.get(position, -9) + 1 else None  # noqa: E731
    spy = Spy(random_model(tokenizer), force)
    result = fill_blanks(spy, tokenizer, ids, max_new_tokens=8, use_cache=use_cache)

    assert [len(b.token_ids) for b in result.blanks] == [3, 1] and {b.stop for b in result.blanks} == {"<eop>"}
    sop = tokenizer.special_ids.sop
    expected_ids = [*context, sop, *result.blanks[0].token_ids, sop, *result.blanks[1].token_ids]
    expected_positions = [*range(n), *[p1] * 4, *[p2] * 2]
    expected_blocks = [*[0] * n, 1, 2, 3, 4, 1, 2]
    assert list(result.sequence_ids) == expected_ids
    assert [list(row) for row in result.position_ids] == [expected_positions, expected_blocks]

    # sep is the context length in every call: the context is bidirectional, the rest causal.
    assert all(call[2].tolist() == [n] for call in spy.calls)
    if use_cache:
        # The context is encoded once (with the first <sop>); then one new token per call.
        fed_ids = torch.cat([call[0] for call in spy.calls], dim=1)[0].tolist()
        fed_positions = torch.cat([call[1] for call in spy.calls], dim=2)[0].tolist()
        assert spy.calls[0][0].shape[1] == n + 1 and all(call[0].shape[1] == 1 for call in spy.calls[1:])
        assert all(call[3] is spy.calls[0][3] for call in spy.calls)  # one cache for the whole context
    else:
        fed_ids, fed_positions = spy.calls[-1][0][0].tolist(), spy.calls[-1][1][0].tolist()
        assert all(call[3] is None for call in spy.calls)
    # Everything but the last blank's last token (after which <eop> came) went through the model.
    assert fed_ids == expected_ids and fed_positions == [expected_positions, expected_blocks]


def test_blank_ends_at_eop_eos_or_max_new_tokens(tokenizer):
    special = tokenizer.special_ids
    ids = context_ids(tokenizer, "The", "mask", " statement", "mask", " is", "mask")
    context = encode_context(tokenizer, ids)
    p1, p2, p3 = mask_positions(context, special)
    ends = {(p1, 2): special.eop, (p2, 4): special.eos}
    result = fill_blanks(Spy(random_model(tokenizer), lambda p, b: ends.get((p, b))), tokenizer, ids, max_new_tokens=5)
    assert [b.stop for b in result.blanks] == ["<eop>", "<eos>", "max_new_tokens"]
    assert [len(b.token_ids) for b in result.blanks] == [1, 3, 5]
    for blank in result.blanks:
        assert special.eop not in blank.token_ids and special.eos not in blank.token_ids
    # A blank ended by max_new_tokens keeps all its tokens in the sequence.
    assert result.sequence_ids[-6:] == (special.sop, *result.blanks[2].token_ids)


def test_min_new_tokens(tokenizer):
    special = tokenizer.special_ids
    always_eop = Spy(random_model(tokenizer), lambda position, block: special.eop)
    assert fill_blanks(always_eop, tokenizer, "The [MASK].", min_new_tokens=0).blank_token_ids == [[]]
    # By default a blank is never empty: <eop> right after <sop> is not drawn (nor <eos>).
    result = fill_blanks(always_eop, tokenizer, "The [MASK].")
    assert len(result.blanks[0].token_ids) == 1 and result.blanks[0].stop == "<eop>"
    assert result.blanks[0].token_ids[0] not in (special.eop, special.eos)
    result = fill_blanks(always_eop, tokenizer, "The [MASK].", min_new_tokens=3, max_new_tokens=4)
    assert len(result.blanks[0].token_ids) == 3
    with pytest.raises(ValueError, match="min_new_tokens"):
        fill_blanks(always_eop, tokenizer, "The [MASK].", min_new_tokens=5, max_new_tokens=4)


def test_blanks_are_filled_in_text_order_into_the_text(tokenizer):
    special = tokenizer.special_ids
    text = 'The [MASK] statement is used for [sMASK] execution as long as an [gMASK]'
    context = encode_context(tokenizer, text)
    assert context[-1] == special.gmask  # ends with a mask: no <eos> (the authors' rule)
    positions = mask_positions(context, special)
    assert [context[p] for p in positions] == [special.mask, special.smask, special.gmask]
    words = dict(zip(positions, (' "while"', " repeated", " expression is true.")))
    order = []

    def force(position, block):
        if block == 1:
            order.append(position)
        answer = tokenizer.encode(words[position]) + [special.eop] if position in words else None
        return None if answer is None else answer[block - 1]

    result = fill_blanks(Spy(random_model(tokenizer), force), tokenizer, text, max_new_tokens=20)
    assert order == positions  # each blank started (from <sop>) in text order
    assert [b.position for b in result.blanks] == positions
    assert [b.mask_token for b in result.blanks] == ["[MASK]", "[sMASK]", "[gMASK]"]
    assert [b.text for b in result.blanks] == list(words.values())
    assert result.text == 'The "while" statement is used for repeated execution as long as an expression is true.'


def test_encode_context(tokenizer):
    special = tokenizer.special_ids
    ids = encode_context(tokenizer, "Use [MASK] here.")
    assert ids[0] == special.cls and ids[-1] == special.eos and ids.count(special.mask) == 1
    # The space before a mask goes to the blank: the text is read as "Use[MASK] here."
    assert ids == [special.cls, *context_ids(tokenizer, "Use", "mask", " here."), special.eos]
    a, b = tokenizer.encode(" here")[0], tokenizer.encode(".")[0]
    assert encode_context(tokenizer, [special.cls, a, special.mask]) == [special.cls, a, special.mask]
    with_eos = [special.cls, a, special.mask, b, special.eos]
    assert encode_context(tokenizer, torch.tensor([a, special.mask, b])) == with_eos
    assert encode_context(tokenizer, [a, special.mask, b], add_eos=False) == [special.cls, a, special.mask, b]
    assert encode_context(tokenizer, [a, special.mask, special.eos]) == [special.cls, a, special.mask, special.eos]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_value_error_naming_the_problem(tokenizer):
    model = random_model(tokenizer, max_sequence_length=16)
    with pytest.raises(ValueError, match="no mask token"):
        fill_blanks(model, tokenizer, "The if.", max_new_tokens=4)
    with pytest.raises(ValueError, match=r"context is \d+ tokens long.*max_sequence_length \(16\)"):
        fill_blanks(model, tokenizer, "The [MASK] " + "statement is used for execution " * 4, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=16)
    with pytest.raises(ValueError, match="temperature"):
        fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        fill_blanks(model, tokenizer, [tokenizer.special_ids.mask, 10_000], max_new_tokens=4)


def test_vocabulary_padding_is_never_generated(tokenizer):
    model = random_model(tokenizer)
    padding = tokenizer.vocab_size  # the first padding row of the word embedding
    force = lambda position, block: padding  # noqa: E731  (the model "wants" a padding id)
    result = fill_blanks(Spy(model, force), tokenizer, "The [MASK].", max_new_tokens=3)
    assert all(t < tokenizer.vocab_size for t in result.blanks[0].token_ids)


# ---------------------------------------------------------------------------------------------
# Sampling functions


def test_top_k_and_top_p_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])  # probabilities 0.087, 0.644, 0.237, 0.032
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [inf, 3.0, 2.0, inf]
    assert top_k_filter(logits, 9).tolist() == logits.tolist()
    assert top_p_filter(logits, 0.5).tolist() == [inf, 3.0, inf, inf]
    assert top_p_filter(logits, 0.8).tolist() == [inf, 3.0, 2.0, inf]
    assert top_p_filter(logits, 0.95).tolist() == [1.0, 3.0, 2.0, inf]
    batch = torch.stack([logits, logits.flip(0)])
    assert top_p_filter(batch, 0.5).tolist() == [[inf, 3.0, inf, inf], [inf, inf, 3.0, inf]]


def test_sample():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    draws = [sample(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*draws) and draws[0].shape == (3,)
    counts = torch.bincount(sample(torch.tensor([0.0, 0.0, -30.0]).expand(4000, 3), 1.0), minlength=3)
    assert counts[2] == 0 and abs(counts[0].item() - 2000) < 200
    for bad in (dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            sample(logits, **{"temperature": 1.0, **bad})


# ---------------------------------------------------------------------------------------------
# Helpers of the tests below


class Bias(nn.Module):
    """Wraps a model: adds ``bias [V]`` to every logit it returns (-inf bans a token)."""

    def __init__(self, model, bias):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.bias = bias

    def forward(self, input_ids, position_ids, sep, *, kv_cache=None, logits_index=None):
        return self.inner(input_ids, position_ids, sep, kv_cache=kv_cache, logits_index=logits_index) + self.bias


def bias(model, values: dict[int, float]) -> torch.Tensor:
    vector = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for token, value in values.items():
        vector[token] = value
    return vector


def only(model, allowed) -> Bias:
    """The model with every token but ``allowed`` banned."""
    vector = torch.full((model.config.vocab_size,), float("-inf"), dtype=torch.float64)
    vector[list(allowed)] = 0.0
    return Bias(model, vector)


def results_in_order(updates):
    return [u.result for u in sorted((u for u in updates if u.result is not None), key=lambda u: u.context)]


# Contexts of different lengths and numbers and kinds of blanks (pieces for context_ids).
BATCH = [
    ("The", "mask", " statement is used for", "smask", " execution."),
    ("A", "gmask"),
    ('The "if" statement is used for', "mask", " execution as long as an", "mask", " is true, and", "mask", "."),
    ("The", "smask"),
]


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)])
def test_batched_decoding_gives_each_context_its_tokens_alone(tokenizer, sampling):
    special = tokenizer.special_ids
    model = random_model(tokenizer, seed=2)
    contexts = [context_ids(tokenizer, *pieces) for pieces in BATCH] + ["The [MASK] statement executes [sMASK]."]
    encoded = [encode_context(tokenizer, c) for c in contexts]
    # Blanks end at <eop>, at <eos> and at max_new_tokens, so rows finish at different steps.
    ends = {(mask_positions(encoded[0], special)[0], 3): special.eop,
            (mask_positions(encoded[2], special)[1], 2): special.eos}
    force = lambda position, block: ends.get((position, block))  # noqa: E731
    alone_spies = [Spy(model, force) for _ in contexts]
    alone = [fill_blanks(spy, tokenizer, c, max_new_tokens=5, **sampling) for spy, c in zip(alone_spies, contexts)]
    spy = Spy(model, force)
    batched = fill_blanks(spy, tokenizer, contexts, max_new_tokens=5, **sampling)
    recomputed = fill_blanks(Spy(model, force), tokenizer, contexts, max_new_tokens=5, use_cache=False, **sampling)

    assert isinstance(batched, list) and len(batched) == len(contexts)
    assert batched == alone and recomputed == alone  # tokens, texts, stops, sequences, positions
    assert {b.stop for r in alone for b in r.blanks} == {"<eop>", "<eos>", "max_new_tokens"}
    # One prefill for the batch (every context with its first <sop>, padded), then one forward pass
    # per step over the rows still decoding: finished contexts leave the batch.
    steps = [len(s.calls) for s in alone_spies]
    assert len(spy.calls) == max(steps)
    assert [call[0].shape[0] for call in spy.calls] == [sum(n > t for n in steps) for t in range(max(steps))]
    assert spy.calls[0][0].shape[1] == max(len(e) for e in encoded) + 1
    assert all(call[3] is spy.calls[0][3] for call in spy.calls)


def test_each_context_samples_from_its_own_seeded_stream(tokenizer):
    model = random_model(tokenizer, seed=3)
    contexts = ["The [MASK] statement.", "A [MASK] is [MASK].", "The [MASK] statement."]
    kwargs = dict(temperature=1.0, max_new_tokens=6)
    one_seed = fill_blanks(model, tokenizer, contexts, seed=5, **kwargs)
    assert one_seed == [fill_blanks(model, tokenizer, c, seed=5, **kwargs) for c in contexts]
    assert one_seed[0] == one_seed[2]  # the same context and seed: the same stream
    seeds = [1, 2, 3]
    per_context = fill_blanks(model, tokenizer, contexts, seed=seeds, **kwargs)
    assert per_context == [fill_blanks(model, tokenizer, c, seed=s, **kwargs) for c, s in zip(contexts, seeds)]
    assert per_context[0] != per_context[2]
    assert fill_blanks(model, tokenizer, contexts[::-1], seed=seeds[::-1], **kwargs)[::-1] == per_context
    assert fill_blanks(model, tokenizer, [], **kwargs) == []


# ---------------------------------------------------------------------------------------------
# Beam search


@pytest.mark.parametrize("min_new_tokens", [0, 1])
def test_beam_search_with_one_beam_is_greedy(tokenizer, min_new_tokens):
    special = tokenizer.special_ids
    model = random_model(tokenizer, seed=4)
    encoded = [encode_context(tokenizer, context_ids(tokenizer, *pieces)) for pieces in BATCH]
    first, second = mask_positions(encoded[2], special)[:2]
    ends = {(first, 1): special.eop, (second, 3): special.eop}  # an empty blank (min 0) and a short one
    force = lambda position, block: ends.get((position, block))  # noqa: E731
    config = GenerationConfig(max_new_tokens=5, min_new_tokens=min_new_tokens)
    greedy = fill_blanks(Spy(model, force), tokenizer, encoded, config)
    updates = generation._decode_contexts(Spy(model, force), tokenizer, encoded, config, [None] * len(encoded), True,
                                 beam_search=True)
    beam = results_in_order(updates)
    assert [r.blank_token_ids for r in beam] == [r.blank_token_ids for r in greedy]
    assert [[b.stop for b in r.blanks] for r in beam] == [[b.stop for b in r.blanks] for r in greedy]
    assert {b.stop for b in greedy[2].blanks} == {"<eop>", "max_new_tokens"}
    assert all(b.score is not None for r in beam for b in r.blanks)


def exhaustive_best(model, tokenizer, context, allowed, *, max_new, min_new, length_penalty):
    """Every filling of the first blank of ``context`` with ``allowed`` tokens (a stop among them),
    each scored as a finished hypothesis: sum of log-probabilities / max(len, 1) ** length_penalty.
    Each prefix is recomputed in full. Returns (score, tokens) of the best."""
    special = tokenizer.special_ids
    n, position = len(context), mask_positions(context, special)[0]
    best = (float("-inf"), None)

    def log_probs(tokens):
        ids = [*context, special.sop, *tokens]
        positions = [[*range(n), *[position] * (len(tokens) + 1)], [*[0] * n, *range(1, len(tokens) + 2)]]
        logits = model(torch.tensor([ids]), torch.tensor([positions]), torch.tensor([n]))[0, -1]
        return torch.log_softmax(logits[list(allowed)], dim=-1).tolist()

    def finish(tokens, total):
        nonlocal best
        score = total / max(len(tokens), 1) ** length_penalty
        if score > best[0]:
            best = (score, tuple(tokens))

    def visit(tokens, total):
        for token, log_prob in zip(allowed, log_probs(tokens)):
            if token in (special.eop, special.eos):
                if len(tokens) >= min_new:
                    finish(tokens, total + log_prob)
            elif len(tokens) + 1 == max_new:
                finish([*tokens, token], total + log_prob)
            else:
                visit([*tokens, token], total + log_prob)

    with torch.no_grad():
        visit([], 0.0)
    return best


@pytest.mark.parametrize("length_penalty", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("min_new_tokens", [0, 1])
def test_beam_search_equals_an_exhaustive_search(tokenizer, length_penalty, min_new_tokens):
    model = random_model(tokenizer, seed=8)
    allowed = (20, 57, 140, tokenizer.special_ids.eop)  # a vocabulary of three tokens and <eop>
    context = encode_context(tokenizer, "The [MASK] statement.")
    # 40 beams keep every hypothesis of 3 steps (9 running, at most 40 finished): nothing is pruned.
    result = fill_blanks(only(model, allowed), tokenizer, context, num_beams=40, length_penalty=length_penalty,
                         max_new_tokens=3, min_new_tokens=min_new_tokens)
    score, tokens = exhaustive_best(model, tokenizer, context, allowed, max_new=3, min_new=min_new_tokens,
                                    length_penalty=length_penalty)
    assert result.blanks[0].token_ids == tokens
    assert result.blanks[0].score == pytest.approx(score, rel=1e-9)


def authors_beam_search(model, tokenizer, context, *, num_beams, length_penalty, max_new, min_new, ngram,
                        early_stopping):
    """THUDM/GLM's seq2seq beam search (tasks/seq2seq/evaluate.py with generation_utils.py's
    BeamSearchScorer, BeamHypotheses, MinLength and NoRepeatNGram processors) for the first blank
    of one context, transcribed step by step; every beam is recomputed in full. glm_ext's three
    additions: <eos> ends a blank as <eop> does, the vocabulary padding is banned, and the length
    in the stopping test is at least 1 (two stops can finish two hypotheses at the first step,
    where the authors' code would divide by zero), and when stops take places among the top
    candidates fewer beams continue (the authors' code raises)."""
    special = tokenizer.special_ids
    ends = (special.eop, special.eos)
    n, position = len(context), mask_positions(context, special)[0]
    beams = [[] for _ in range(num_beams)]
    beam_scores = torch.zeros(num_beams, dtype=torch.float64)
    beam_scores[1:] = -1e9
    hyps, worst = [], 1e9

    def add(tokens, sum_logprobs):
        nonlocal worst
        score = sum_logprobs / max(len(tokens), 1) ** length_penalty
        if len(hyps) < num_beams or score > worst:
            hyps.append((score, list(tokens)))
            if len(hyps) > num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                del hyps[ranked[0][1]]
                worst = ranked[1][0]
            else:
                worst = min(score, worst)

    done = False
    for step in range(max_new):
        logits = []
        for tokens in beams:
            ids = [*context, special.sop, *tokens]
            positions = [[*range(n), *[position] * (step + 1)], [*[0] * n, *range(1, step + 2)]]
            logits.append(model(torch.tensor([ids]), torch.tensor([positions]), torch.tensor([n]))[0, -1])
        logits = torch.stack(logits)
        logits[:, tokenizer.vocab_size :] = float("-inf")
        scores = torch.log_softmax(logits, dim=-1)
        if step < min_new:
            scores[:, list(ends)] = float("-inf")
        if ngram and step + 1 >= ngram:
            for row, tokens in enumerate(beams):
                seen = {}
                for gram in zip(*[tokens[i:] for i in range(ngram)]):
                    seen.setdefault(tuple(gram[:-1]), []).append(gram[-1])
                scores[row, seen.get(tuple(tokens[step + 1 - ngram : step]), [])] = float("-inf")
        scores = (scores + beam_scores[:, None]).view(-1)
        vocab = logits.shape[-1]
        top_scores, top_index = torch.sort(scores, descending=True)
        top_scores, top_index = top_scores[: 2 * num_beams], top_index[: 2 * num_beams]
        new_beams, new_scores = [], []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            beam, token = index // vocab, index % vocab
            if token in ends:
                if rank >= num_beams:
                    continue
                add(beams[beam], score)
            else:
                new_beams.append([*beams[beam], token])
                new_scores.append(score)
            if len(new_beams) == num_beams:
                break
        if len(hyps) >= num_beams:
            done = early_stopping or worst >= top_scores.max().item() / max(step, 1) ** length_penalty
        beams, beam_scores = new_beams, torch.tensor(new_scores, dtype=torch.float64)
        if done or not beams:
            done = True
            break
    if not done:
        for tokens, score in zip(beams, beam_scores.tolist()):
            add(tokens, score)
    return sorted(hyps, key=lambda h: h[0])[-1]


# (model seed, <eop> bias, beams, length penalty, min_new_tokens, no_repeat_ngram_size, early stopping).
# With the first three the outcome hinges on the stopping test: early stopping, or the length in the
# test taken one token longer, give other hypotheses.
@pytest.mark.parametrize("seed, eop_bias, num_beams, length_penalty, min_new, ngram, early_stopping", [
    (0, 1.5, 2, 0.7, 1, 0, False), (0, 1.5, 2, 0.7, 1, 0, True), (0, 1.5, 2, 2.0, 0, 0, False),
    (9, 2.5, 3, 1.0, 2, 2, False), (9, 2.0, 4, 0.7, 0, 1, False),
])
def test_beam_search_follows_the_authors_scorer(tokenizer, seed, eop_bias, num_beams, length_penalty, min_new,
                                                ngram, early_stopping):
    special = tokenizer.special_ids
    inner = random_model(tokenizer, seed=seed)
    # <eop> and <eos> made likely, so hypotheses finish at different lengths and the scorer decides.
    model = Bias(inner, bias(inner, {special.eop: eop_bias, special.eos: eop_bias - 0.5}))
    context = encode_context(tokenizer, "The [MASK] statement.")
    with torch.no_grad():
        score, tokens = authors_beam_search(model, tokenizer, context, num_beams=num_beams,
                                            length_penalty=length_penalty, max_new=6, min_new=min_new,
                                            ngram=ngram, early_stopping=early_stopping)
    result = fill_blanks(model, tokenizer, context, num_beams=num_beams, length_penalty=length_penalty,
                         max_new_tokens=6, min_new_tokens=min_new, no_repeat_ngram_size=ngram,
                         early_stopping=early_stopping)
    assert result.blanks[0].token_ids == tuple(tokens)
    assert result.blanks[0].score == pytest.approx(score, rel=1e-9)


def test_cached_beam_search_equals_recomputed_and_alone(tokenizer):
    special = tokenizer.special_ids
    contexts = [context_ids(tokenizer, *pieces) for pieces in BATCH]
    first = mask_positions(encode_context(tokenizer, contexts[0]), special)[0]
    model = Spy(random_model(tokenizer, seed=10), lambda p, b: special.eop if (p, b) == (first, 3) else None)
    kwargs = dict(num_beams=3, length_penalty=0.7, no_repeat_ngram_size=2, max_new_tokens=5)
    spy = Spy(model)
    cached = fill_blanks(spy, tokenizer, contexts, **kwargs)
    recomputed = fill_blanks(model, tokenizer, contexts, use_cache=False, **kwargs)
    alone = [fill_blanks(model, tokenizer, c, **kwargs) for c in contexts]
    for results in (recomputed, alone):
        assert [r.blank_token_ids for r in results] == [r.blank_token_ids for r in cached]
        assert [[b.stop for b in r.blanks] for r in results] == [[b.stop for b in r.blanks] for r in cached]
        scores = [b.score for r in results for b in r.blanks]
        assert scores == pytest.approx([b.score for r in cached for b in r.blanks], rel=1e-9)
    assert {b.stop for r in cached for b in r.blanks} == {"<eop>", "max_new_tokens"}
    # The beams share the prefill: one row per context, then up to 3 rows each feeding one token.
    assert spy.calls[0][0].shape[0] == len(contexts)
    assert spy.calls[1][0].shape == (3 * len(contexts), 1)


def test_cnn_dailymail_preset_is_the_authors_setting():
    # THUDM/GLM config_tasks/seq_cnndm.sh and GLM_SPEC 5: 5 beams, length penalty 0.7, no repeated
    # 3-grams, 55..160 target tokens; evaluate.py never stops early.
    assert GENERATION_PRESETS["cnn_dailymail"] == GenerationConfig(
        num_beams=5, length_penalty=0.7, no_repeat_ngram_size=3, min_new_tokens=55, max_new_tokens=160,
        early_stopping=False,
    )


# ---------------------------------------------------------------------------------------------
# Constraints and stops


def test_banned_ngram_tokens_and_repetition_penalty_by_hand():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3) == [3, 4]
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 2) == [3]
    assert banned_ngram_tokens([5, 1, 5], 1) == [1, 5]
    assert banned_ngram_tokens([1, 2], 3) == [] and banned_ngram_tokens([1, 2, 3], 4) == []
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert apply_repetition_penalty(scores, [0, 1, 1], 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]


def has_repeated_ngram(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("mode", [dict(), dict(temperature=1.0, seed=3), dict(num_beams=3)])
def test_no_repeat_ngram_size_never_repeats_an_ngram(tokenizer, mode):
    a, b = tokenizer.encode(" is")[0], tokenizer.encode(".")[0]
    cycle = lambda position, block: (a, b)[block % 2]  # noqa: E731  (the model wants "a b a b ...")
    model = random_model(tokenizer, seed=5)
    contexts = ["The [MASK] statement [MASK].", "A [gMASK]"]
    repeating = fill_blanks(Spy(model, cycle), tokenizer, contexts, max_new_tokens=8, **mode)
    assert all(has_repeated_ngram(blank.token_ids, 3) for r in repeating for blank in r.blanks)
    for n in (1, 2, 3):
        results = fill_blanks(Spy(model, cycle), tokenizer, contexts, max_new_tokens=8, no_repeat_ngram_size=n, **mode)
        for blank in (blank for r in results for blank in r.blanks):
            assert not has_repeated_ngram(blank.token_ids, n)
            assert len(blank.token_ids) == 8 or blank.stop != "max_new_tokens"


def test_repetition_penalty_discourages_the_blanks_repeats(tokenizer):
    inner = random_model(tokenizer, seed=6)
    a = tokenizer.encode(" is")[0]
    model = Bias(inner, bias(inner, {a: 30.0}))
    assert fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=4).blanks[0].token_ids == (a,) * 4
    penalised = fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=4, repetition_penalty=100.0)
    assert penalised.blanks[0].token_ids[0] == a and a not in penalised.blanks[0].token_ids[1:]


def test_stop_strings_and_stop_token_ids_end_a_blank(tokenizer):
    words = tokenizer.encode(" is used for repeated execution")
    force = lambda position, block: words[block - 1] if block <= len(words) else None  # noqa: E731
    model = Spy(random_model(tokenizer), force)
    blank = fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=10, stop_strings=["used"]).blanks[0]
    assert blank.stop == "stop_string" and blank.text.endswith("used")
    assert "used" not in tokenizer.decode(blank.token_ids[:-1])
    assert blank.token_ids == tuple(words[: len(blank.token_ids)])
    blank = fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=10, stop_token_ids=[words[2]]).blanks[0]
    assert blank.stop == "stop_token" and blank.token_ids == tuple(words[:2])
    # Before min_new_tokens a stop token is not drawn.
    blank = fill_blanks(model, tokenizer, "The [MASK].", max_new_tokens=4, min_new_tokens=2,
                        stop_token_ids=[words[0]]).blanks[0]
    assert blank.token_ids[0] != words[0] and len(blank.token_ids) >= 2


def test_max_new_tokens_per_blank(tokenizer):
    special = tokenizer.special_ids
    inner = random_model(tokenizer)
    never_ends = Bias(inner, bias(inner, {special.eop: float("-inf"), special.eos: float("-inf")}))
    text = "The [MASK] is [MASK] and [MASK]."
    result = fill_blanks(never_ends, tokenizer, text, max_new_tokens=(2, 5, 3))
    assert [len(b.token_ids) for b in result.blanks] == [2, 5, 3]
    beams = fill_blanks(never_ends, tokenizer, text, max_new_tokens=[2, 5, 3], num_beams=2)
    assert [len(b.token_ids) for b in beams.blanks] == [2, 5, 3]
    with pytest.raises(ValueError, match="max_new_tokens gives limits for 2 blanks, but context 0 has 3"):
        fill_blanks(never_ends, tokenizer, text, max_new_tokens=(2, 5))


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("mode", [dict(), dict(temperature=1.0, seed=4), dict(num_beams=2)])
def test_streaming_yields_exactly_the_final_tokens(tokenizer, mode):
    special = tokenizer.special_ids
    inner = random_model(tokenizer, seed=12)
    model = Bias(inner, bias(inner, {special.eop: 2.5}))
    contexts = [context_ids(tokenizer, *pieces) for pieces in BATCH]
    updates = list(stream_blanks(model, tokenizer, contexts, max_new_tokens=6, **mode))
    results = fill_blanks(model, tokenizer, contexts, max_new_tokens=6, **mode)
    assert results_in_order(updates) == results
    for c, result in enumerate(results):
        assert [u for u in updates if u.context == c and u.result is not None] == [updates[-1]] or \
            updates.index(next(u for u in updates if u.context == c and u.result)) == \
            max(i for i, u in enumerate(updates) if u.context == c)
        for k, blank in enumerate(result.blanks):
            pieces = [u for u in updates if (u.context, u.blank) == (c, k)]
            assert [u.finished for u in pieces] == [None] * (len(pieces) - 1) + [blank]
            assert tuple(t for u in pieces for t in u.token_ids) == blank.token_ids
            assert "".join(u.text for u in pieces) == blank.text
            if "num_beams" not in mode:  # token by token, as decoded
                assert all(len(u.token_ids) == 1 for u in pieces[:-1]) and not pieces[-1].token_ids
    # Blanks arrive in text order within a context.
    for c in range(len(contexts)):
        blanks = [u.blank for u in updates if u.context == c]
        assert blanks == sorted(blanks)


def test_streamed_text_waits_for_whole_characters(tokenizer):
    special = tokenizer.special_ids
    accent = tokenizer.encode("é")
    assert len(accent) == 2  # two byte-level tokens
    answer = [*tokenizer.encode(" caf"), *accent, *tokenizer.encode("!"), special.eop]
    force = lambda position, block: answer[block - 1] if block <= len(answer) else None  # noqa: E731
    updates = list(stream_blanks(Spy(random_model(tokenizer), force), tokenizer, "A [MASK]", max_new_tokens=10))
    texts = [u.text for u in updates]
    assert "".join(texts) == " café!" == updates[-1].finished.text
    assert "\ufffd" not in "".join(texts) and "" in texts  # the first byte of é waits for the second


# ---------------------------------------------------------------------------------------------
# Sampling follows softmax(logits / temperature) (an expectation computed by hand)


class FixedLogits(nn.Module):
    """A model whose next-token logits are always ``values`` at ``tokens`` and -inf elsewhere."""

    def __init__(self, config, tokens, values):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # gives the model a device
        self.logits = torch.full((config.vocab_size,), float("-inf"), dtype=torch.float64)
        self.logits[tokens] = torch.tensor(values, dtype=torch.float64)

    def forward(self, input_ids, position_ids, sep, *, kv_cache=None, logits_index=None):
        assert kv_cache is None
        rows = input_ids.shape[0]
        if logits_index is not None:
            return self.logits.expand(rows, -1).clone()
        return self.logits.expand(rows, input_ids.shape[1], -1).clone()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_softmax_of_logits_divided_by_temperature(tokenizer, temperature):
    tokens, values = [20, 21, 22], [0.0, 1.0, 2.0]
    weights = [math.exp(v / temperature) for v in values]
    expected = [w / sum(weights) for w in weights]
    n = 2000
    model = FixedLogits(random_model(tokenizer).config, tokens, values)
    results = fill_blanks(model, tokenizer, ["The [MASK]."] * n, temperature=temperature, max_new_tokens=1,
                          seed=list(range(n)), use_cache=False)
    drawn = torch.tensor([r.blanks[0].token_ids[0] for r in results])
    direct = sample(torch.tensor(values).expand(n, 3), temperature, generator=torch.Generator().manual_seed(0)) + 20
    for draws in (drawn, direct):
        for token, p in zip(tokens, expected):
            frequency = (draws == token).double().mean().item()
            assert abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / n), (token, frequency, p)


# ---------------------------------------------------------------------------------------------
# Settings, special tokens typed as text


def test_bad_settings_raise_value_errors_naming_them(tokenizer):
    model = random_model(tokenizer)
    cases = [
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2, temperature=0.7), "num_beams > 1 .* deterministic"),
        (dict(num_beams=2, stop_strings=["x"]), "stop_strings cannot be combined with num_beams"),
        (dict(length_penalty=0.7), "length_penalty and early_stopping only apply to beam search"),
        (dict(early_stopping=True), "length_penalty and early_stopping only apply to beam search"),
        (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(max_new_tokens=()), "max_new_tokens must be an integer or a non-empty sequence"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
        (dict(stop_token_ids=[10_000]), "stop_token_ids must be ids of the tokenizer's vocabulary"),
        (dict(temperature=1.0, seed=-1), r"seed must be an integer in \[0, 2\*\*63\), got -1"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            fill_blanks(model, tokenizer, "The [MASK].", **settings)
    with pytest.raises(ValueError, match="seed must be one int or one per context"):
        fill_blanks(model, tokenizer, ["The [MASK].", "A [MASK]"], seed=[1])
    with pytest.raises(ValueError, match="unknown generation preset 'xsum'"):
        fill_blanks(model, tokenizer, "The [MASK].", "xsum")
    with pytest.raises(TypeError, match="unknown generation setting"):
        fill_blanks(model, tokenizer, "The [MASK].", beams=2)
    with pytest.raises(ValueError, match=r"unknown mask spelling '<mask>', '\[mask\]'"):
        fill_blanks(model, tokenizer, "The [mask] is <mask> and [MASK].")
    with pytest.raises(ValueError, match="context 1: the context holds no mask token"):
        fill_blanks(model, tokenizer, ["The [MASK].", "No blank."])


def test_special_token_texts_can_be_read_as_plain_text(tokenizer):
    special = tokenizer.special_ids
    text = "<|endofpiece|> [CLS] runs [MASK]."
    controls = encode_context(tokenizer, text)
    assert special.eop in controls and controls.count(special.cls) == 2
    plain = encode_context(tokenizer, text, special_tokens_as_text=True)
    assert special.eop not in plain and plain.count(special.cls) == 1 and plain.count(special.mask) == 1
    assert tokenizer.decode(plain[1:-1]) == "<|endofpiece|> [CLS] runs[MASK]."
    result = fill_blanks(random_model(tokenizer), tokenizer, text, special_tokens_as_text=True, max_new_tokens=2)
    assert result.context_ids == tuple(plain)


@pytest.mark.parametrize("family", ["wordpiece", "gpt2", "chinese-sp"])
def test_special_token_texts_as_plain_text_in_every_tokenizer_family(tmp_path, family):
    if family == "wordpiece":
        files = [write_wordpiece_vocab(tmp_path)]
    elif family == "gpt2":
        files = list(write_bpe_files(tmp_path, roberta=False)[:2])
    else:
        pytest.importorskip("sentencepiece")
        files = [train_sentencepiece(tmp_path, TEXTS)]
    tokenizer = GLMTokenizer.from_files(family, [str(path) for path in files])
    special = tokenizer.special_ids
    text = "the <|endofpiece|> [CLS] cat [MASK]."
    assert special.eop in encode_context(tokenizer, text)
    plain = encode_context(tokenizer, text, special_tokens_as_text=True)
    assert special.eop not in plain and plain.count(special.cls) == 1 and plain.count(special.mask) == 1


# ---------------------------------------------------------------------------------------------
# The key/value cache with rows of different lengths (glm_ext.model.KVCache)


@pytest.mark.parametrize("encoding", ["learned_2d", "rotary_2d"])
@pytest.mark.parametrize("backend", ["sdpa", "fused", "reference"])
def test_kv_cache_rows_of_different_lengths_match_each_row_alone(tokenizer, encoding, backend):
    model = random_model(tokenizer, encoding)
    model.attention_backend = backend
    generator = torch.Generator().manual_seed(1)
    draw = lambda high: int(torch.randint(high, (), generator=generator))  # noqa: E731
    max_position = model.config.max_sequence_length

    def tokens(n):  # (id, position, block position), random
        return [(draw(tokenizer.vocab_size), draw(max_position + 1), draw(max_position + 1)) for _ in range(n)]

    rows, seps = [[], [], []], [2, 7, 4]
    cache = KVCache(32)

    def step(new):  # feeds new[i] to row i (padded to the longest) and checks each row's last logits
        starts = [len(row) for row in rows]
        width = max(len(t) for t in new)
        padded = [t + [(0, 0, 0)] * (width - len(t)) for t in new]
        ids = torch.tensor([[x[0] for x in t] for t in padded])
        positions = torch.tensor([[[x[1] for x in t], [x[2] for x in t]] for t in padded])
        logits = model(ids, positions, torch.tensor(seps), kv_cache=cache,
                       logits_index=torch.tensor([len(t) - 1 for t in new]))
        cache.trim([start + len(t) for start, t in zip(starts, new)])
        for row, t in zip(rows, new):
            row.extend(t)
        for row, sep, got in zip(rows, seps, logits):
            row_positions = torch.tensor([[[x[1] for x in row], [x[2] for x in row]]])
            alone = model(torch.tensor([[x[0] for x in row]]), row_positions, torch.tensor([sep]))[0, -1]
            torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)
        assert cache.lengths == [len(row) for row in rows]

    with torch.no_grad():
        step([tokens(3), tokens(7), tokens(5)])  # one prefill of rows of different lengths
        step([tokens(1), tokens(1), tokens(1)])
        step([tokens(2), tokens(1), tokens(3)])  # rows feeding different numbers of tokens
        cache.select([2, 0, 0])  # reorder, repeat (a beam expanded) and drop rows
        rows[:] = [rows[2], rows[0], list(rows[0])]
        seps[:] = [seps[2], seps[0], seps[0]]
        step([tokens(1), tokens(2), tokens(1)])  # the repeated rows diverge
        cache.select([1])
        rows[:], seps[:] = [rows[1]], [seps[1]]
        step([tokens(1)])
    with pytest.raises(ValueError, match="trim needs one length"):
        cache.trim([len(rows[0]) + 1])
    with pytest.raises(ValueError, match="select needs row indices"):
        cache.select([1])


# ---------------------------------------------------------------------------------------------
# glm-ext generate


@pytest.fixture(scope="module")
def saved_model(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("generate")
    save_checkpoint(random_model(tokenizer, seed=7), directory / "checkpoint")
    tokenizer.save(directory / "tokenizer.json")
    return str(directory / "checkpoint"), str(directory / "tokenizer.json")


def test_cli_reads_jsonl_and_writes_jsonl(tokenizer, saved_model, tmp_path, capsys):
    checkpoint, tokenizer_file = saved_model
    records = [{"text": "The [MASK] statement is used for [sMASK].", "id": "a"}, {"text": "A [gMASK]"},
               {"text": 'The "if" [MASK].', "id": 3}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", checkpoint, "--tokenizer", tokenizer_file, "--input", str(source), "--output", str(out),
            "--batch-size", "2", "--max-new-tokens", "4"]
    assert cli_main(argv) == 0
    model = load_checkpoint(checkpoint)
    for beams in (False, True):
        written = [json.loads(line) for line in out.read_text().splitlines()]
        expected = fill_blanks(model, tokenizer, [r["text"] for r in records], max_new_tokens=4,
                               **(dict(num_beams=2) if beams else {}))
        assert len(written) == len(records)
        for record, row, result in zip(records, written, expected):
            assert {key: row[key] for key in record} == record  # the input's fields are kept
            assert row["filled"] == result.text
            assert row["blanks"] == [
                {"text": b.text, "token_ids": list(b.token_ids), "stop": b.stop, "mask": b.mask_token,
                 "position": b.position, **({"score": pytest.approx(b.score)} if beams else {})}
                for b in result.blanks
            ]
        if not beams:  # an existing output is replaced only with --overwrite
            before = out.read_text()
            assert cli_main(argv + ["--num-beams", "2"]) == 2 and out.read_text() == before
            assert "exists; pass --overwrite" in capsys.readouterr().err
            assert cli_main(argv + ["--num-beams", "2", "--overwrite"]) == 0


def test_cli_reads_text_lines_from_stdin(tokenizer, saved_model):
    checkpoint, tokenizer_file = saved_model
    run = subprocess.run(
        [sys.executable, "-m", "glm_ext", "generate", checkpoint, "--tokenizer", tokenizer_file, "--output", "-",
         "--max-new-tokens", "3", "--temperature", "0.8", "--seed", "2"],
        input="The [MASK] is.\n\nA [MASK] [sMASK].\n", capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    expected = fill_blanks(load_checkpoint(checkpoint), tokenizer, ["The [MASK] is.", "A [MASK] [sMASK]."],
                           max_new_tokens=3, temperature=0.8, seed=2)
    assert [row["text"] for row in rows] == ["The [MASK] is.", "A [MASK] [sMASK]."]
    assert [row["filled"] for row in rows] == [r.text for r in expected]


@pytest.mark.parametrize("options, message", [
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "1", "--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--top-k", "5"], "--top-k only applies to sampling: add --temperature > 0"),
    (["--seed", "3", "--top-p", "0.5"], "--top-p and --seed only apply to sampling"),
    (["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),
    (["--num-beams", "2", "--temperature", "0.7"], "--num-beams > 1 (beam search) is deterministic"),
    (["--max-new-tokens", "64"], "--max-new-tokens (64) + 1 must not exceed the model's max_sequence_length (64)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_cli_refuses_bad_options_in_one_line(saved_model, capsys, options, message):
    checkpoint, tokenizer_file = saved_model
    status = cli_main(["generate", checkpoint, "--tokenizer", tokenizer_file, *options, "The [MASK]."])
    err = capsys.readouterr().err
    assert status != 0 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_names_the_bad_context(saved_model, capsys, tmp_path):
    checkpoint, tokenizer_file = saved_model
    source = tmp_path / "in.txt"
    source.write_text("The [MASK].\n\nNo blank here.\n")
    assert cli_main(["generate", checkpoint, "--tokenizer", tokenizer_file, "--input", str(source)]) == 1
    assert f"{source} line 3: the context holds no mask token" in capsys.readouterr().err
    assert cli_main(["generate", checkpoint, "--tokenizer", tokenizer_file, "A [mask]."]) == 1
    assert "TEXT argument 1: unknown mask spelling '[mask]'" in capsys.readouterr().err


def test_cli_interactive_prompt_loop(saved_model, monkeypatch, capsys):
    checkpoint, tokenizer_file = saved_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("The [MASK].\nno blank\nA [MASK] [MASK].\n\n"))
    argv = ["generate", checkpoint, "--tokenizer", tokenizer_file, "--interactive", "--max-new-tokens", "3"]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    assert out.count("filled:") == 2 and "no mask token" in err


def test_cli_on_a_terminal_prints_blanks_as_decoded_in_input_order(tokenizer, saved_model, monkeypatch, capsys):
    checkpoint, tokenizer_file = saved_model
    texts = ["The [MASK] is [sMASK].", "A [gMASK]", "The [MASK]."]  # the second finishes first
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli_main(["generate", checkpoint, "--tokenizer", tokenizer_file, *texts, "--max-new-tokens", "3",
                     "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = fill_blanks(load_checkpoint(checkpoint), tokenizer, texts, max_new_tokens=3)
    assert [line for line in lines if line.startswith("  context:")] == [f"  context: {t}" for t in texts]
    assert [line for line in lines if line.startswith("  filled:")] == [
        f"  filled:  {r.text}".replace("\n", "\\n") for r in expected]
    blank_lines = [line.strip() for line in lines if line.strip().startswith("blank ")]
    one_line = lambda text: text.replace("\n", "\\n")  # noqa: E731  (as the CLI prints it)
    assert blank_lines == [f"blank {i}: {one_line(b.text)}  (ended by {b.stop})".strip()
                           for r in expected for i, b in enumerate(r.blanks, 1)]
