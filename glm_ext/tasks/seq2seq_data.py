"""Seq2seq data files: the layouts of the authors' ``tasks/seq2seq/dataset.py`` (THUDM/GLM), read
as they are, and JSON lines.

:func:`read_seq2seq` returns :class:`Seq2SeqExample` s (source, target, and for question
generation the answer) from a file whose kind its name tells:

==========================  =====================================================================
file                        content
==========================  =====================================================================
``NAME.jsonl``              one JSON object per line: ``source`` and ``target`` (summarisation);
                            ``context``, ``answer`` and ``question`` (``squad_generation``); the
                            target / question may be missing (then the example has no reference)
``NAME.source``             one source per line, with ``NAME.target`` beside it (the same number of
                            lines): CNN/DailyMail's and Gigaword's ``{train,val,test}.source/.target``
``NAME.json`` of SQuAD      ``{"data": [{"paragraphs": [{"context", "qas": [{"question",
                            "answers": [{"text"}]}]}]}]}`` (``squad_generation``): one example per
                            distinct answer of a question, the question its target
``XSum-TRAINING-DEV-``      XSum's split file (``{"train": [ids], "validation": [...], "test":
``TEST-SPLIT-90-5-5.json``  [...]}``) beside the ``ID.summary`` files: the ``split`` named by the
                            caller; the source is the ``[SN]RESTBODY[SN]`` section, the target the
                            ``[SN]FIRST-SENTENCE[SN]`` one (each section's lines joined by spaces)
==========================  =====================================================================

Texts are cleaned as the authors do per task (:data:`SEQ2SEQ_TASKS`): ``cnn_dm`` and ``gigaword``
get the punctuation standardisation (curly quotes and en dashes to ASCII) and undo their corpora's
tokenisation (``-LRB-`` -> ``(`` and so on; CNN/DailyMail's ``<S_SEP>`` sentence separator becomes
``[SEP]`` in targets and goes from sources; Gigaword's ``UNK`` becomes ``[UNK]``); lines are
stripped. ``summarization`` (any other corpus) and ``xsum`` take the texts as they are.

Errors (ValueError, FileNotFoundError) name the file and, where there is one, the line and field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from glm_ext.tasks.records import Record, read_jsonl
from glm_ext.tasks.superglue import standardize

__all__ = ["SEQ2SEQ_TASKS", "XSUM_SPLITS", "Seq2SeqExample", "read_seq2seq"]

#: Task -> its source layout (:mod:`glm_ext.tasks.seq2seq`).
SEQ2SEQ_TASKS = {
    "summarization": "summarization", "cnn_dm": "summarization", "gigaword": "summarization",
    "xsum": "summarization", "squad_generation": "question_generation",
}
#: The split names of XSum's split file.
XSUM_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Seq2SeqExample:
    """One example: the ``source`` text (the article; for question generation the context), the
    ``target`` (None when the file has no reference), the ``answer`` a generated question asks for
    (question generation only) and where it came from (``FILE:LINE``)."""

    source: str
    target: str | None
    answer: str | None = None
    where: str = "<example>"


_CNNDM_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CNNDM_SPACING = {"''": '"', "``": '"', "`": "'", " n't": "n't", " 's": "'s", " 'd": "'d", " 'll": "'ll"}
_GIGAWORD_ESCAPES = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
                     "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _cnn_dm(text: str, is_target: bool) -> str:
    text = text.replace("<S_SEP>", "[SEP]" if is_target else "")
    for plain, escaped in _CNNDM_BRACKETS.items():
        text = text.replace(escaped, plain)
    for tokenized, plain in _CNNDM_SPACING.items():
        text = text.replace(tokenized, plain)
    return text


def _gigaword(text: str, is_target: bool) -> str:
    text = text.replace("UNK", "[UNK]").replace("<unk>", "[UNK]")
    for plain, escaped in _GIGAWORD_ESCAPES.items():
        text = text.replace(escaped, plain)
    return text


def _cleaner(task: str) -> Callable[[str, bool], str]:
    """The authors' cleaning of ``task``'s texts: ``(text, is_target) -> text``."""
    if task == "cnn_dm":
        return lambda text, is_target: _cnn_dm(standardize(text.strip()), is_target)
    if task == "gigaword":
        return lambda text, is_target: _gigaword(standardize(text.strip()), is_target)
    return lambda text, is_target: text


def read_seq2seq(path: str | os.PathLike, task: str = "summarization", *, split: str = "test") -> list[Seq2SeqExample]:
    """The examples of a seq2seq data file (module docstring) for ``task`` (a key of
    :data:`SEQ2SEQ_TASKS`); ``split`` picks the part of an XSum split file."""
    if task not in SEQ2SEQ_TASKS:
        raise ValueError(f"unknown seq2seq task {task!r}; choose one of {', '.join(SEQ2SEQ_TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    question_generation = SEQ2SEQ_TASKS[task] == "question_generation"
    if path.suffix == ".jsonl":
        examples = [_jsonl_example(record, question_generation) for record in read_jsonl(path)]
    elif path.suffix == ".source":
        if question_generation:
            raise ValueError(f"{path}: squad_generation reads SQuAD's .json files or .jsonl, not .source/.target lines")
        examples = _line_pairs(path)
    elif path.suffix == ".json":
        examples = _json_file(path, task, split)
    else:
        raise ValueError(f"{path}: a seq2seq data file is .jsonl, .source (with .target beside it) or .json "
                         "(SQuAD or XSum's split file)")
    if not examples:
        raise ValueError(f"data file {str(path)!r} holds no examples")
    clean = _cleaner(task)
    return [dataclasses.replace(x, source=clean(x.source, False),
                                target=None if x.target is None else clean(x.target, True)) for x in examples]


def _jsonl_example(record: Record, question_generation: bool) -> Seq2SeqExample:
    source_field, target_field = ("context", "question") if question_generation else ("source", "target")
    source = record.field(source_field, kind=str)
    if not source.strip():
        raise record.error(f"field {source_field!r} is empty")
    target = record.field(target_field, kind=str) if record.has(target_field) else None
    answer = record.field("answer", kind=str) if question_generation else None
    return Seq2SeqExample(source, target, answer, record.where)


def _line_pairs(path: Path) -> list[Seq2SeqExample]:
    target_path = path.with_suffix(".target")
    if not target_path.is_file():
        raise FileNotFoundError(f"{path} needs its targets in {target_path}, which does not exist")
    sources = path.read_text(encoding="utf-8").splitlines()
    targets = target_path.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise ValueError(f"{path} has {len(sources)} lines but {target_path} has {len(targets)}: each source line "
                         "needs the target on the same line")
    return [Seq2SeqExample(source.strip(), target.strip(), None, f"{path}:{line}")
            for line, (source, target) in enumerate(zip(sources, targets), 1)]


def _json_file(path: Path, task: str, split: str) -> list[Seq2SeqExample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if task == "squad_generation":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{path}: a SQuAD file holds an object with a 'data' list")
        return _squad(data["data"], path)
    if task == "xsum":
        if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in XSUM_SPLITS):
            raise ValueError(f"{path}: XSum's split file holds an object with the lists {', '.join(XSUM_SPLITS)}")
        if split not in XSUM_SPLITS:
            raise ValueError(f"split must be one of {', '.join(XSUM_SPLITS)}, got {split!r}")
        return [_xsum_summary(path.parent / f"{name}.summary") for name in data[split]]
    raise ValueError(f"{path}: a .json file is SQuAD's (--task squad_generation) or XSum's split file (--task xsum)")


def _squad(articles: list, path: Path) -> list[Seq2SeqExample]:
    """One example per distinct answer of each question (the authors' ``SQuADGenerationProcessor``)."""
    record = Record({"data": articles}, str(path), 1)
    examples = []
    for a in range(len(articles)):
        for p, _ in enumerate(record.field("data", a, "paragraphs", kind=list)):
            context = record.field("data", a, "paragraphs", p, "context", kind=str)
            for q, _ in enumerate(record.field("data", a, "paragraphs", p, "qas", kind=list)):
                question = record.field("data", a, "paragraphs", p, "qas", q, "question", kind=str)
                answers = record.field("data", a, "paragraphs", p, "qas", q, "answers", kind=list)
                texts = sorted({record.field("data", a, "paragraphs", p, "qas", q, "answers", i, "text", kind=str)
                                for i in range(len(answers))})
                where = f"{path}: data.{a}.paragraphs.{p}.qas.{q}"
                examples += [Seq2SeqExample(context, question, answer, where) for answer in texts]
    return examples


def _xsum_summary(path: Path) -> Seq2SeqExample:
    """An XSum ``ID.summary`` file: ``[SN]NAME[SN]`` lines open sections of text lines."""
    if not path.is_file():
        raise FileNotFoundError(f"XSum summary file {path} does not exist")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("[SN]") and line.endswith("[SN]") and len(line) > 8:
            current = sections.setdefault(line[4:-4], [])
        elif line and current is not None:
            current.append(line)
    missing = [name for name in ("RESTBODY", "FIRST-SENTENCE") if name not in sections]
    if missing:
        raise ValueError(f"{path}: no [SN]{missing[0]}[SN] section")
    return Seq2SeqExample(" ".join(sections["RESTBODY"]), " ".join(sections["FIRST-SENTENCE"]), None, str(path))
