"""The authors' evaluation metrics (THUDM/GLM ``tasks/eval_utils.py``, ``tasks/superglue/evaluate.py``),
all reported as percentages (0..100).

* :func:`accuracy`; :func:`f1` (binary, the positive label given) and :func:`macro_f1` (mean over
  the labels seen in the gold or predicted values), with scikit-learn's conventions: a label
  never predicted nor present scores F1 0.
* :func:`multirc_exact_match`: the share of questions whose answers are all labelled right.
* :func:`squad_exact_match` / :func:`squad_f1` against several ground truths (the best one
  counts), after SQuAD's normalisation: lower case, accents removed (the authors use
  ``unidecode``; here Unicode decomposition, the same for accented Latin letters), punctuation
  and the articles a/an/the dropped, whitespace collapsed. Used by ReCoRD.
* :func:`rouge`: ROUGE-1, ROUGE-2 and ROUGE-L F-measures with the ``rouge-score`` package, as the
  authors' seq2seq evaluation (``tasks/seq2seq/evaluate.py``) calls it: Porter stemming, ROUGE-L
  over sentences ("rougeLsum", each text split into sentences at ``[SEP]`` and line breaks). The
  authors' CNN/DailyMail post-processing of predictions (re-tokenising, dropping sentences of four
  words or fewer and near-duplicates) is not applied.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

__all__ = [
    "accuracy", "f1", "macro_f1", "multirc_exact_match", "normalize_answer", "rouge", "squad_exact_match", "squad_f1",
]

#: Our names of the ROUGE scores -> rouge-score's.
ROUGE_TYPES = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeLsum"}


def _check_lengths(predictions: Sequence[Any], labels: Sequence[Any]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("a metric needs at least one labelled example")


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    _check_lengths(predictions, labels)
    return 100.0 * sum(p == g for p, g in zip(predictions, labels)) / len(labels)


def _f1_of(label: Any, predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    true_positive = sum(p == label and g == label for p, g in zip(predictions, labels))
    predicted = sum(p == label for p in predictions)
    actual = sum(g == label for g in labels)
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / predicted, true_positive / actual
    return 2 * precision * recall / (precision + recall)


def f1(predictions: Sequence[Any], labels: Sequence[Any], positive: Any = 1) -> float:
    """F1 of the ``positive`` label."""
    _check_lengths(predictions, labels)
    return 100.0 * _f1_of(positive, predictions, labels)


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of the per-label F1 over every label in ``labels`` or ``predictions``."""
    _check_lengths(predictions, labels)
    present = sorted(set(labels) | set(predictions), key=repr)
    return 100.0 * sum(_f1_of(label, predictions, labels) for label in present) / len(present)


def multirc_exact_match(predictions: Sequence[Any], labels: Sequence[Any], questions: Sequence[Hashable]) -> float:
    """Percentage of questions (``questions[i]`` names the question of answer ``i``) whose answers
    are all predicted right."""
    _check_lengths(predictions, labels)
    right: dict[Hashable, bool] = defaultdict(lambda: True)
    for prediction, label, question in zip(predictions, labels, questions):
        right[question] &= prediction == label
    return 100.0 * sum(right.values()) / len(right)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (module docstring)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, truth: str) -> float:
    predicted, actual = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(predicted) & Counter(actual)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(actual)
    return 2 * precision * recall / (precision + recall)


def _best_over_truths(metric, predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> float:
    _check_lengths(predictions, truths)
    total = sum(max((metric(p, t) for t in ts), default=0.0) for p, ts in zip(predictions, truths))
    return 100.0 * total / len(predictions)


def squad_exact_match(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the best exact match (after normalisation) against its ground truths."""
    return _best_over_truths(lambda p, t: float(normalize_answer(p) == normalize_answer(t)), predictions, truths)


def squad_f1(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the best token-level F1 against its ground truths."""
    return _best_over_truths(_token_f1, predictions, truths)


def _sentences(text: str) -> str:
    """The sentences of a text (split at ``[SEP]`` and line breaks), one a line (rougeLsum's input)."""
    pieces = [piece.strip() for line in text.split("[SEP]") for piece in line.splitlines()]
    return "\n".join(piece for piece in pieces if piece)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``rouge1``, ``rouge2``, ``rougeL``: the mean F-measure over the examples (module docstring)."""
    _check_lengths(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from exc
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(_sentences(reference), _sentences(prediction))
        for name, kind in ROUGE_TYPES.items():
            totals[name] += scores[kind].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
