"""Exact-match blank filling on held-out sentences: the demo's measure of what a GLM has learnt.

The rule (fixed before looking at any result, and the same for every model):

* **sentences**: the held-out documents are cut into paragraphs (blank lines; paragraphs with an
  indented line, code or lists, are left out) and sentences (after ``.``, ``!`` or ``?`` followed by
  whitespace and a capital letter); a sentence qualifies when it is
  plain prose: ``MIN_WORDS`` to ``MAX_WORDS`` words, starting with a capital letter, ending with a full
  stop, every word letters only (apostrophes and hyphens inside, one trailing ``,``, ``;``, ``:`` or
  ``.``), so no code, markup or numbers;
* **masked word**: in each sentence one word of ``MIN_LETTERS`` or more lowercase letters, not the
  first word, drawn uniformly at random (seeded); its letters become ``[MASK]`` (punctuation stays);
* **items**: ``count`` qualifying sentences drawn at random (seeded) from all of them;
* **prediction**: the model fills the blank by greedy decoding restricted to what the blank holds,
  one lowercase word (:func:`fill_word`): the first token starts a word (a space, then
  ``MIN_LETTERS`` or more lowercase letters), the next ones continue it (lowercase letters) until
  ``<eop>``; the predicted word is the fill's letters;
* **exact match**: the predicted word equals the masked word, letter for letter and case;
* **baseline**: always answering the most frequent qualifying word of the *training* documents
  (counted with the same word rule).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
import re
from collections.abc import Callable, Iterable, Sequence

import torch

from glm_ext.generation import encode_context, mask_positions

__all__ = [
    "Cloze",
    "ClozeScore",
    "cloze_items",
    "exact_match",
    "fill_word",
    "most_frequent_word",
    "predicted_word",
    "score",
]

MIN_WORDS, MAX_WORDS = 8, 30
MIN_LETTERS = 4
MASK = "[MASK]"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*[,;:.]?")
_LOWER_WORD = re.compile(rf"([a-z]{{{MIN_LETTERS},}})([,;:.]?)")
_LETTERS = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class Cloze:
    """One item: ``text`` holds one ``[MASK]`` where ``answer`` stood."""

    text: str
    answer: str


@dataclasses.dataclass(frozen=True)
class ClozeScore:
    """Exact match of the model and of the most-frequent-word baseline over ``items``."""

    items: tuple[Cloze, ...]
    predictions: tuple[str, ...]
    baseline_word: str

    @property
    def exact_match(self) -> float:
        return exact_match(self.predictions, [item.answer for item in self.items])

    @property
    def baseline(self) -> float:
        return exact_match([self.baseline_word] * len(self.items), [item.answer for item in self.items])


def _sentences(document: str) -> Iterable[str]:
    for paragraph in document.split("\n\n"):
        lines = paragraph.split("\n")
        if not any(line[:1].isspace() for line in lines):  # an indented line: code or a list
            yield from _SENTENCE_END.split(" ".join(paragraph.split()))


def _prose_words(sentence: str) -> list[str] | None:
    """The words of a qualifying sentence (see the module docstring), else None."""
    words = sentence.split(" ")
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence[0].isupper() or not sentence.endswith("."):
        return None
    return words if all(_PROSE_WORD.fullmatch(word) for word in words) else None


def _maskable(words: Sequence[str]) -> list[int]:
    return [i for i, word in enumerate(words) if i > 0 and _LOWER_WORD.fullmatch(word)]


def cloze_items(documents: Iterable[str], count: int, *, seed: int = 0) -> list[Cloze]:
    """``count`` items from the qualifying sentences of ``documents`` (all of them when fewer)."""
    candidates = []
    for document in documents:
        for sentence in _sentences(document):
            words = _prose_words(sentence)
            if words and _maskable(words):
                candidates.append(words)
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(count, len(candidates)))
    items = []
    for words in chosen:
        index = rng.choice(_maskable(words))
        word, punctuation = _LOWER_WORD.fullmatch(words[index]).groups()
        text = " ".join([*words[:index], MASK + punctuation, *words[index + 1:]])
        items.append(Cloze(text, word))
    return items


def most_frequent_word(documents: Iterable[str]) -> str:
    """The most frequent maskable word of the qualifying sentences of ``documents``."""
    counts: collections.Counter[str] = collections.Counter()
    for document in documents:
        for sentence in _sentences(document):
            words = _prose_words(sentence)
            if words:
                counts.update(_LOWER_WORD.fullmatch(words[i]).group(1) for i in _maskable(words))
    if not counts:
        raise ValueError("the documents hold no qualifying sentence")
    return counts.most_common(1)[0][0]


def predicted_word(fill: str) -> str:
    """The first run of letters of a blank's fill ('' when it has none)."""
    match = _LETTERS.search(fill)
    return match.group(0) if match else ""


@functools.cache
def _word_tokens(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over the model's vocabulary: tokens that start a word of ``MIN_LETTERS`` or
    more lowercase letters (a space, then the letters), and tokens that continue one (letters only)."""
    starts = torch.zeros(vocab_size, dtype=torch.bool)
    continues = torch.zeros(vocab_size, dtype=torch.bool)
    for token in range(tokenizer.vocab_size):
        text = tokenizer.decode([token])
        starts[token] = re.fullmatch(rf" [a-z]{{{MIN_LETTERS},}}", text) is not None
        continues[token] = re.fullmatch(r"[a-z]+", text) is not None
    return starts, continues


@torch.no_grad()
def fill_word(model, tokenizer, text: str, *, max_new_tokens: int = 6) -> str:
    """Fills the one blank of ``text`` with one lowercase word by greedy decoding (GLM_SPEC 5: the
    context encoded once, bidirectionally; the blank decoded from ``<sop>`` at its mask's position
    with block positions 1, 2, ...), restricted as the module docstring says. Returns the word.

    The whole sequence is recomputed for each token (contexts are one sentence); ``fill_blanks``
    has no way to restrict the tokens it may draw."""
    special = tokenizer.special_ids
    context = encode_context(tokenizer, text)
    (position,) = mask_positions(context, special)
    device = next(model.parameters()).device
    starts, continues = (mask.to(device) for mask in _word_tokens(tokenizer, model.config.vocab_size))
    ids, positions, blocks = [*context, special.sop], [*range(len(context)), position], [0] * len(context) + [1]
    sep = torch.tensor([len(context)], device=device)
    word: list[int] = []
    while len(word) < max_new_tokens:
        logits = model(torch.tensor([ids], device=device), torch.tensor([[positions, blocks]], device=device), sep)
        allowed = continues.clone() if word else starts.clone()
        allowed[special.eop] = bool(word)
        if not allowed.any():  # a vocabulary without such word tokens
            break
        token = int(logits[0, -1].masked_fill(~allowed, float("-inf")).argmax())
        if token == special.eop:
            break
        word.append(token)
        ids.append(token)
        positions.append(position)
        blocks.append(len(word) + 1)
    return tokenizer.decode(word)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The share of ``predictions`` equal to their ``answers``."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"expected as many predictions as answers (at least one), got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def score(items: Sequence[Cloze], fill: Callable[[str], str], baseline_word: str,
          progress: Callable[[], None] | None = None) -> ClozeScore:
    """Fills each item's blank with ``fill(text) -> fill text`` and scores the predicted words."""
    predictions = []
    for item in items:
        predictions.append(predicted_word(fill(item.text)))
        if progress is not None:
            progress()
    return ClozeScore(tuple(items), tuple(predictions), baseline_word)
