"""User-defined cloze tasks over any JSON-lines file with some text and a label.

A pattern is either

* a string such as ``"{text} All in all, it was [MASK]."``: ``{field}`` is replaced by the
  record's field (``{a.b}`` for nested ones; ``{{`` and ``}}`` are literal braces) and may be cut
  to fit; the rest is fixed text; ``[MASK]`` marks the blank, exactly once. A single space right
  before ``[MASK]`` belongs to the blank: it moves into every verbalizer that does not start with
  whitespace already, as GPT-2-style tokenizers write a word with its leading space (" great");
* or a Python callable ``pattern(record: dict)`` returning such a filled string (nothing of it is
  cut; one ``[MASK]``) or a sequence of :class:`~glm_ext.tasks.cloze.Text` parts and one
  :data:`~glm_ext.tasks.cloze.BLANK` (``Text(..., shortenable=True)`` parts may be cut). With
  the CLI: ``--pattern-function package.module:function``.

The verbalizer maps each label to its text. Labels are compared as strings (JSON ``true`` and
``false`` read as ``"true"``/``"false"``, numbers as their decimal text); a record without the
label field is unlabelled. Metrics: accuracy and macro-F1 over the labelled records.
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from glm_ext.tasks.cloze import BLANK, ClozeExample, ClozeTask, Text
from glm_ext.tasks.metrics import accuracy, macro_f1
from glm_ext.tasks.records import Record

__all__ = ["custom_task", "load_callable", "parse_verbalizer"]

MASK_TEXT = "[MASK]"


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    raise TypeError(f"a label must be a string, number or boolean, got {type(value).__name__}")


def parse_verbalizer(items: Sequence[str]) -> dict[str, str]:
    """``["positive=great", "negative=terrible"]`` -> a label -> text map (CLI ``--verbalizer``)."""
    verbalizer: dict[str, str] = {}
    for item in items:
        label, sep, text = item.partition("=")
        if not sep or not label:
            raise ValueError(f"--verbalizer expects LABEL=TEXT, got {item!r}")
        if label in verbalizer:
            raise ValueError(f"--verbalizer gives label {label!r} twice")
        verbalizer[label] = text
    return verbalizer


def load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function (CLI ``--pattern-function``)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--pattern-function expects MODULE:FUNCTION, got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load the pattern function {spec!r}: {exc}") from None
    if not callable(function):
        raise ValueError(f"{spec!r} is not callable")
    return function


def _template_parts(pattern: str) -> list[tuple[str, str]]:
    """A pattern string as ``(kind, value)`` pieces: ``("text", ...)``, ``("field", name)``,
    ``("blank", "")``; raises ValueError for a malformed pattern."""
    pieces: list[tuple[str, str]] = []
    for literal, field, _, _ in string.Formatter().parse(pattern.replace(MASK_TEXT, "\0")):
        for i, chunk in enumerate(literal.split("\0")):
            if i:
                pieces.append(("blank", ""))
            if chunk:
                pieces.append(("text", chunk))
        if field is not None:
            if not field:
                raise ValueError(f"pattern {pattern!r} holds an empty {{}} field")
            pieces.append(("field", field))
    blanks = sum(kind == "blank" for kind, _ in pieces)
    if blanks != 1:
        raise ValueError(f"pattern {pattern!r} must hold [MASK] exactly once, found it {blanks} times")
    return pieces


def _split_filled(text: str, where: str) -> list[Text | Any]:
    count = text.count(MASK_TEXT)
    if count != 1:
        raise ValueError(f"{where}: the pattern function's text must hold [MASK] exactly once, got {count}")
    before, after = text.split(MASK_TEXT)
    return [Text(before), BLANK, Text(after)]


def _blank_takes_space(parts: list) -> tuple[list, bool]:
    """Moves a single space before the blank out of the text (see the module docstring)."""
    index = next(i for i, p in enumerate(parts) if p is BLANK)
    if index and isinstance(parts[index - 1], Text) and parts[index - 1].text.endswith(" ") \
            and not parts[index - 1].text.endswith("  "):
        previous = parts[index - 1]
        parts = [*parts[: index - 1], Text(previous.text[:-1], previous.shortenable), *parts[index:]]
        return parts, True
    return parts, False


def custom_task(
    pattern: str | Callable[[dict], Any],
    verbalizer: Mapping[str, str],
    *,
    label_field: str = "label",
    name: str = "custom",
) -> ClozeTask:
    """A cloze task from a pattern (string or callable, module docstring) and a verbalizer."""
    if not verbalizer:
        raise ValueError("the verbalizer must map at least one label to a text")
    labels = tuple(verbalizer)
    template = _template_parts(pattern) if isinstance(pattern, str) else None
    if template is None and not callable(pattern):
        raise TypeError(f"pattern must be a string or a callable, got {type(pattern).__name__}")

    def parts_of(record: Record) -> list:
        if template is not None:
            parts: list = []
            for kind, value in template:
                if kind == "blank":
                    parts.append(BLANK)
                elif kind == "text":
                    parts.append(Text(value))
                else:
                    field = record.field(*value.split("."), kind=(str, int, float))
                    parts.append(Text(str(field), shortenable=True))
            return parts
        filled = pattern(dict(record.data))
        if isinstance(filled, str):
            return _split_filled(filled, record.where)
        if not isinstance(filled, Sequence) or not all(p is BLANK or isinstance(p, Text) for p in filled):
            raise ValueError(f"{record.where}: the pattern function must return a string or a list of Text/BLANK")
        return list(filled)

    def examples(record: Record) -> list[ClozeExample]:
        parts, spaced = _blank_takes_space(parts_of(record))
        texts = [(" " + t if spaced and not t[:1].isspace() else t) for t in verbalizer.values()]
        label = None
        if record.has(label_field):
            try:
                label = _label_text(record.field(label_field))
            except TypeError as exc:
                raise record.error(f"field {label_field!r}: {exc}") from None
            if label not in verbalizer:
                raise record.error(f"field {label_field!r} is {label!r}, which the verbalizer lacks "
                                   f"(it has {', '.join(map(repr, labels))})")
        return [ClozeExample(parts_a=tuple(parts), candidates=tuple(texts), choices=labels, label=label,
                             target=None if label is None else labels.index(label), source=record.where)]

    def metrics(examples: Sequence[ClozeExample], predictions: Sequence[Any]) -> dict[str, float]:
        gold = [x.label for x in examples]
        return {"accuracy": accuracy(predictions, gold), "f1_macro": macro_f1(predictions, gold)}

    return ClozeTask(name, examples, metrics)
