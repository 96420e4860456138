"""One masked word per held-out sentence, scored by exact match: the demo's measure of what a GLM
has learnt (``glm-ext demo``).

The rule (fixed before looking at any result, and the same for every model):

* **sentences**: the held-out documents are cut into paragraphs (blank lines; paragraphs with an
  indented line, code or lists, are left out) and sentences (after ``.``, ``!`` or ``?`` followed by
  whitespace and a capital letter); a sentence qualifies when it is plain prose: ``MIN_WORDS`` to
  ``MAX_WORDS`` words, starting with a capital letter, ending with a full stop, every word letters
  only (apostrophes and hyphens inside, one trailing ``,``, ``;``, ``:`` or ``.``), so no code,
  markup or numbers;
* **masked word**: in each sentence one word of ``MIN_LETTERS`` or more lowercase letters (so never
  the capitalised first word), drawn uniformly at random (seeded); its letters become ``[MASK]``
  (punctuation stays);
* **items**: ``count`` qualifying sentences drawn at random (seeded) from all of them;
* **exact match**: the predicted word equals the masked word, letter for letter and case;
* **baseline**: always answering the most frequent maskable word of the training documents'
  qualifying sentences (ties: the alphabetically first).

Two predictions, both read from the model's distribution over the blank's first token (GLM_SPEC 5:
the sentence encoded once, bidirectionally, ``<sop>`` at the mask's position):

* :func:`greedy_words`, the plain fill: what ``glm-ext generate`` gives (greedy decoding of the
  blank until ``<eop>``, :func:`glm_ext.generation.fill_blanks`); the predicted word is the fill's
  first run of letters (none: no word, a miss);
* :func:`predict_words`, the fill constrained to the candidates: the training documents' maskable
  words that the tokenizer writes as one token (:func:`candidate_words`), the same list for every
  item; the prediction is the candidate whose token is most probable at ``<sop>`` (GLM's
  single-token cloze scoring, :func:`glm_ext.tasks.cloze.score_cloze`), i.e. the greedy choice of
  the first token restricted to those words. An answer outside the list cannot be matched.

With a word-level tokenizer (:meth:`glm_ext.tokenizer.GLMTokenizer.train_wordpiece`) the two differ
only where the greedy token is not a candidate (punctuation, a short word, a word piece).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from glm_ext.generation import fill_blanks
from glm_ext.tasks.cloze import BLANK, ClozeExample, Text, score_cloze

__all__ = [
    "MASK",
    "MaskedSentence",
    "baseline_word",
    "candidate_words",
    "exact_match",
    "greedy_words",
    "masked_sentences",
    "predict_words",
    "predicted_word",
    "word_counts",
]

MIN_WORDS, MAX_WORDS = 8, 30
MIN_LETTERS = 4
MASK = "[MASK]"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*[,;:.]?")
_LOWER_WORD = re.compile(rf"([a-z]{{{MIN_LETTERS},}})([,;:.]?)")
_LETTERS = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class MaskedSentence:
    """One item: ``text`` holds one ``[MASK]`` where ``answer`` stood."""

    text: str
    answer: str


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
    return [i for i, word in enumerate(words) if _LOWER_WORD.fullmatch(word)]


def _qualifying(documents: Iterable[str]) -> Iterable[list[str]]:
    for document in documents:
        for sentence in _sentences(document):
            words = _prose_words(sentence)
            if words:
                yield words


def masked_sentences(documents: Iterable[str], count: int, *, seed: int = 0) -> list[MaskedSentence]:
    """``count`` items from the qualifying sentences of ``documents`` (all of them when fewer)."""
    candidates = [words for words in _qualifying(documents) if _maskable(words)]
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(count, len(candidates)))
    items = []
    for words in chosen:
        index = rng.choice(_maskable(words))
        word, punctuation = _LOWER_WORD.fullmatch(words[index]).groups()
        text = " ".join([*words[:index], MASK + punctuation, *words[index + 1:]])
        items.append(MaskedSentence(text, word))
    return items


def word_counts(documents: Iterable[str]) -> collections.Counter[str]:
    """How often each maskable word occurs in the qualifying sentences of ``documents``."""
    counts: collections.Counter[str] = collections.Counter()
    for words in _qualifying(documents):
        counts.update(_LOWER_WORD.fullmatch(words[i]).group(1) for i in _maskable(words))
    if not counts:
        raise ValueError("the documents hold no qualifying sentence")
    return counts


def baseline_word(counts: collections.Counter[str]) -> str:
    """The most frequent word of ``counts`` (ties: the alphabetically first)."""
    return min(counts, key=lambda word: (-counts[word], word))


def candidate_words(counts: collections.Counter[str], tokenizer) -> list[str]:
    """The words of ``counts`` that ``tokenizer`` writes as one token (after a space), most
    frequent first (ties alphabetically)."""
    words = [word for word in counts if len(tokenizer.encode(" " + word)) == 1]
    return sorted(words, key=lambda word: (-counts[word], word))


def _example(item: MaskedSentence, candidates: Sequence[str]) -> ClozeExample:
    before, after = item.text.split(MASK)
    # A byte-level BPE puts a word's leading space into the word's token, so in training a blank
    # in running text holds " word": the space goes into the candidates, not into Part A.
    return ClozeExample(parts_a=(Text(before.removesuffix(" ")), BLANK, Text(after)),
                        candidates=tuple(" " + word for word in candidates), choices=tuple(candidates))


def _in_chunks(items: Sequence[MaskedSentence], predict, progress: Callable[[int], None] | None,
               size: int = 32) -> list[str]:
    predictions: list[str] = []
    for first in range(0, len(items), size):
        chunk = items[first:first + size]
        predictions += predict(chunk)
        if progress is not None:
            progress(len(chunk))
    return predictions


def predict_words(
    model: nn.Module,
    tokenizer,
    items: Sequence[MaskedSentence],
    candidates: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The fill constrained to ``candidates`` (one token each; module docstring) of each item;
    ``progress(n)`` after each batch of ``n`` items."""
    if not candidates:
        raise ValueError("expected at least one candidate word")

    def predict(chunk):
        results = score_cloze(model, tokenizer, [_example(item, candidates) for item in chunk], multi_token=False)
        return [candidates[result.best] for result in results]

    return _in_chunks(items, predict, progress)


def predicted_word(fill: str) -> str:
    """The first run of letters of a blank's fill ('' when it has none)."""
    match = _LETTERS.search(fill)
    return match.group(0) if match else ""


def greedy_words(
    model: nn.Module,
    tokenizer,
    items: Sequence[MaskedSentence],
    *,
    max_new_tokens: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The plain greedy fill's word (module docstring) of each item; ``progress`` as for
    :func:`predict_words`."""

    def predict(chunk):
        fills = fill_blanks(model, tokenizer, [item.text for item in chunk], max_new_tokens=max_new_tokens)
        return [predicted_word(fill.blanks[0].text) for fill in fills]

    return _in_chunks(items, predict, progress)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The share of ``predictions`` equal to their ``answers``."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"expected as many predictions as answers (at least one), got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)
