"""glm_ext.tasks.masked_word: the demo's measure (one masked word per held-out sentence, exact match),
checked against hand-made examples and slow direct computations."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from glm_ext.model import GLMConfig, GLMModel
from glm_ext.tasks import masked_word
from glm_ext.tasks.masked_word import MaskedSentence
from glm_ext.tokenizer import GLMTokenizer

HAND_MADE = """\
The parser reads every token of the input stream. Short one here.

Call foo(x) to get 3 values back from the function now. The loop
stops when the iterator raises StopIteration.

An example paragraph with code that is left out whole:
    indented code is not prose at all, so it never counts here.

Return the number of items stored in the container, as an integer."""

# The sentences the rule keeps, and their maskable words (4+ lowercase letters),
# read off HAND_MADE by hand.
QUALIFYING = {
    "The parser reads every token of the input stream.": ["parser", "reads", "every", "token", "input", "stream"],
    "The loop stops when the iterator raises StopIteration.": ["loop", "stops", "when", "iterator", "raises"],
    "Return the number of items stored in the container, as an integer.":
        ["number", "items", "stored", "container", "integer"],
}


def test_masked_sentences_follow_the_rule():
    items = masked_word.masked_sentences([HAND_MADE], count=10, seed=3)
    assert len(items) == 3  # fewer qualifying sentences than asked for: all of them
    for item in items:
        assert item.text.count("[MASK]") == 1
        original = item.text.replace("[MASK]", item.answer)
        assert item.answer in QUALIFYING[original]
    assert {i.text.replace("[MASK]", i.answer) for i in items} == set(QUALIFYING)
    assert masked_word.masked_sentences([HAND_MADE], count=10, seed=3) == items  # seeded
    assert len(masked_word.masked_sentences([HAND_MADE], count=2, seed=3)) == 2


def test_punctuation_stays_outside_the_blank():
    sentence = "Return the number of items stored in the container, as an integer."
    masked = {i.text: i.answer for seed in range(40) for i in masked_word.masked_sentences([sentence], 1, seed=seed)}
    assert masked["Return the number of items stored in the [MASK], as an integer."] == "container"
    assert masked["Return the number of items stored in the container, as an [MASK]."] == "integer"
    assert set(masked.values()) == {"number", "items", "stored", "container", "integer"}  # never "Return", "the"


def test_baseline_and_candidates_by_hand():
    counts = masked_word.word_counts(["The cat sat on every mat near every door today.", HAND_MADE])
    # every: 2 (here) + 1 (HAND_MADE); "near", "door", "today": 1; "The", "cat", "sat", "on", "mat": not maskable.
    assert counts["every"] == 3 and counts["near"] == counts["door"] == counts["today"] == 1
    assert "cat" not in counts and "The" not in counts and "StopIteration" not in counts
    assert masked_word.baseline_word(counts) == "every"
    assert masked_word.baseline_word(collections.Counter({"zeta": 2, "beta": 2, "alpha": 1})) == "beta"  # ties: a-z
    with pytest.raises(ValueError, match="no qualifying sentence"):
        masked_word.word_counts(["too short."])

    class OneTokenWords:  # a tokenizer that writes these words as one token, others as two
        words = {"every", "door", "near"}

        def encode(self, text):
            return [1] if text.strip() in self.words else [1, 2]

    assert masked_word.candidate_words(counts, OneTokenWords()) == ["every", "door", "near"]  # by count, then a-z


def test_exact_match_and_predicted_word_by_hand():
    assert masked_word.predicted_word(" repeated") == "repeated"
    assert masked_word.predicted_word(' "while" loop') == "while"
    assert masked_word.predicted_word("\n") == ""
    assert masked_word.predicted_word(" read-only") == "read"
    assert masked_word.exact_match(["while", "File", "file", ""], ["while", "file", "file", "list"]) == 0.5
    with pytest.raises(ValueError, match="as many predictions"):
        masked_word.exact_match([], [])


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = GLMTokenizer.train_wordpiece([HAND_MADE] * 5, 400)
    torch.manual_seed(0)
    config = GLMConfig.preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=64, num_heads=4)
    model = GLMModel(config).eval()
    with torch.no_grad():  # large weights, so that different tokens win in different sentences
        for p in model.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, tokenizer


ITEMS = [
    MaskedSentence("The parser reads every [MASK] of the input stream.", "token"),
    MaskedSentence("The [MASK] stops when the iterator raises StopIteration.", "loop"),
    MaskedSentence("Return the number of items stored in the [MASK], as an integer.", "container"),
    MaskedSentence("The loop [MASK] when the iterator raises.", "stops"),
    MaskedSentence("Return the [MASK].", "number"),
]


def _logits_at_blank(model, tokenizer, item, blank=()):
    """The model's logits for the blank's next token after ``<sop>`` + ``blank``, the whole sequence
    built by hand (GLM_SPEC 5): [CLS] sentence <eos>, then <sop> at the mask's position."""
    special = tokenizer.special_ids
    before, after = item.text.split("[MASK]")
    context = [special.cls, *tokenizer.encode(before), special.mask, *tokenizer.encode(after), special.eos]
    mask = context.index(special.mask)
    ids = [*context, special.sop, *blank]
    positions = [*range(len(context)), *[mask] * (1 + len(blank))]
    blocks = [0] * len(context) + list(range(1, 2 + len(blank)))
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([[positions, blocks]]), torch.tensor([len(context)]))[0, -1]


def test_constrained_fill_is_the_most_probable_candidate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    candidates = masked_word.candidate_words(masked_word.word_counts([HAND_MADE]), tokenizer)
    assert len(candidates) >= 5 and all(len(tokenizer.encode(" " + w)) == 1 for w in candidates)
    seen = set()
    for _ in range(3):  # each round without the previous winners, so that several argmaxes are checked
        expected = []
        for item in ITEMS:  # one candidate at a time, one sentence at a time
            log_probs = torch.log_softmax(_logits_at_blank(model, tokenizer, item).double(), -1)
            scores = [log_probs[tokenizer.encode(w)[0]] for w in candidates]
            expected.append(candidates[max(range(len(candidates)), key=lambda i: scores[i])])
        done = []
        assert masked_word.predict_words(model, tokenizer, ITEMS, candidates, progress=done.append) == expected
        assert sum(done) == len(ITEMS)
        seen |= set(expected)
        candidates = [w for w in candidates if w not in expected]
    assert len(seen) >= 3
    with pytest.raises(ValueError, match="at least one candidate"):
        masked_word.predict_words(model, tokenizer, ITEMS, [])


def test_greedy_fill_is_plain_greedy_decoding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stops = [tokenizer.special_ids.eop, tokenizer.special_ids.eos]
    expected = []
    for item in ITEMS:  # the whole sequence recomputed for each token, argmax over the tokenizer's vocabulary
        blank = []
        while len(blank) < 3:
            logits = _logits_at_blank(model, tokenizer, item, blank)[:tokenizer.vocab_size]
            if not blank:  # glm-ext generate's min_new_tokens=1: a blank is never empty
                logits[stops] = float("-inf")
            token = int(logits.argmax())
            if token in stops:
                break
            blank.append(token)
        match = re.search(r"[A-Za-z]+", tokenizer.decode(blank))
        expected.append(match.group(0) if match else "")
    assert masked_word.greedy_words(model, tokenizer, ITEMS, max_new_tokens=3) == expected
    assert any(expected)
