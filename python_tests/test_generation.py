"""glm_ext.generation: blank filling (GLM_SPEC 5) and the sampling functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glm_ext.generation import encode_context, fill_blanks, mask_positions, sample, top_k_filter, top_p_filter
from glm_ext.model import GLMConfig, GLMModel, pad_vocab_size
from glm_ext.tokenizer import GLMTokenizer

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
