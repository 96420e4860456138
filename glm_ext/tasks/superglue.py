"""SuperGLUE as cloze tasks, with the authors' patterns, verbalizers and metrics (THUDM/GLM
``tasks/superglue/{dataset,pvp,finetune}.py``), reading SuperGLUE's own JSON-lines files.

=========  ===========================================================  ========  =================
task       record fields                                                patterns  metrics
=========  ===========================================================  ========  =================
boolq      passage, question, label (bool)                              0-5 (4)   accuracy
cb         premise, hypothesis, label (entailment/contradiction/neutral) 0-4 (3)  accuracy, f1_macro
copa       premise, choice1, choice2, question (cause/effect), label    0-1 (0)   accuracy
rte        premise, hypothesis, label (entailment/not_entailment)       0-4 (0)   accuracy
wic        sentence1, sentence2, word, label (bool)                     0-2 (1)   accuracy
wsc        text, target.{span1_text, span2_text, span2_index}, label    0-2 (2)   accuracy
multirc    passage.text, passage.questions[].{question, idx,            0-4 (0)   f1a, em, accuracy
           answers[].{text, label}}
record     passage.{text, entities[].{start, end}}, qas[].{query        0         em, f1
           (with @placeholder), idx, answers[].text}
=========  ===========================================================  ========  =================

The default pattern (in brackets) is the one of the authors' finetuning scripts
(``config_tasks/task_*.sh``). ``label`` may be absent (test files): such examples get predictions
but no metrics. Texts get the authors' punctuation standardisation (curly quotes and en dashes to
ASCII) where they apply it. COPA, WSC and ReCoRD score multi-token candidates (with ``<eop>``),
the others one verbalizer token each. WSC: with a ``candidates`` list (the authors' WSC-negative
files) the record is a choice between ``span1_text`` and the candidates, length-normalised, and it
is predicted ``True`` when ``span1_text`` wins; without one (SuperGLUE's own files) it is predicted
``True`` when ``span1_text`` is the greedy decoding of the blank (the authors' generative check).
ReCoRD: one example per query, its candidates every entity of the passage, ``@highlight`` lines
turned into ``- `` items, EM/F1 of the chosen entity against the answers. MultiRC: one example
per answer; EM is per question.

Training files (``ClozeTask.read(path, training=True)``) give the examples the authors finetune on
(``tasks/superglue/dataset.py``): COPA adds each record mirrored (the two choices swapped, the
label flipped); ReCoRD gives one example per distinct answer of a query, its candidates that answer
and at most ``RECORD_TRAIN_NEGATIVES`` other entities (drawn at random, seeded by the record's
line, when there are more); WSC keeps only the records labelled True (the right referent is
``span1_text``), splits a longer ``candidates`` list into examples of ``WSC_TRAIN_CANDIDATES``
(the last one topped up from the start of the list) and trains with the authors' "mix" loss.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from glm_ext.tasks.cloze import BLANK, ClozeExample, ClozeResult, ClozeTask, Text
from glm_ext.tasks.metrics import accuracy, f1, macro_f1, multirc_exact_match, squad_exact_match, squad_f1
from glm_ext.tasks.records import Record

__all__ = [
    "DEFAULT_PATTERNS", "RECORD_TRAIN_NEGATIVES", "SUPERGLUE_TASKS", "WSC_TRAIN_CANDIDATES", "boolq", "cb", "copa", "multirc", "record", "rte", "superglue_task", "wic",
    "wsc",
]

#: The pattern of the authors' finetuning scripts (THUDM/GLM ``config_tasks/task_*.sh``).
DEFAULT_PATTERNS = {"boolq": 4, "cb": 3, "copa": 0, "rte": 0, "wic": 1, "wsc": 2, "multirc": 0, "record": 0}
#: The authors' training examples: ReCoRD's wrong entities per answer, WSC's wrong candidates per example.
RECORD_TRAIN_NEGATIVES = 9
WSC_TRAIN_CANDIDATES = 9

_STANDARD_PUNCTUATION = {"\u201c": '"', "\u201d": '"', "\u2019": "'", "\u2018": "'", "\u2013": "-"}


def standardize(text: str) -> str:
    """The authors' punctuation standardisation."""
    for fancy, plain in _STANDARD_PUNCTUATION.items():
        text = text.replace(fancy, plain)
    return text


def _strip_final_punctuation(text: str) -> str:
    return text.rstrip(string.punctuation)


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _short(text: str) -> Text:
    return Text(text, shortenable=True)


def _label(record: Record, key: str, convert: Callable[[Any], Any], allowed: Sequence[Any]) -> Any:
    """The record's label (None when absent), converted and checked against ``allowed``."""
    if not record.has(key):
        return None
    value = convert(record.field(key))
    if value not in allowed:
        raise record.error(f"field {key!r} must be one of {list(allowed)}, got {record.data[key]!r}")
    return value


def _bool_name(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else value


def _example(record: Record, parts_a, labels: Sequence[Any], verbalizers: Sequence[str], label: Any,
             parts_b=(), **meta) -> ClozeExample:
    return ClozeExample(
        parts_a=tuple(parts_a), parts_b=tuple(parts_b), candidates=tuple(verbalizers), choices=tuple(labels),
        label=label, target=None if label is None else list(labels).index(label), meta=meta, source=record.where,
    )


def _accuracy_metrics(examples: Sequence[ClozeExample], predictions: Sequence[Any]) -> dict[str, float]:
    return {"accuracy": accuracy(predictions, [x.label for x in examples])}


def _check_pattern(task: str, pattern_id: int, count: int) -> None:
    if not isinstance(pattern_id, int) or not 0 <= pattern_id < count:
        raise ValueError(f"{task} has patterns 0..{count - 1}, got pattern_id={pattern_id!r}")


# --------------------------------------------------------------------------------------------
# BoolQ


def boolq(pattern_id: int = DEFAULT_PATTERNS["boolq"]) -> ClozeTask:
    _check_pattern("boolq", pattern_id, 6)
    labels = ("false", "true")
    verbalizers = (" No", " Yes") if pattern_id % 2 == 0 else (" false", " true")

    def examples(record: Record) -> list[ClozeExample]:
        passage = standardize(record.field("passage", kind=str))
        question = standardize(record.field("question", kind=str))
        if pattern_id < 2:
            parts = [_short(passage), Text(" Question:"), _short(" " + question), Text("? Answer:"), BLANK, Text(".")]
        elif pattern_id < 4:
            parts = [_short(passage), Text(" Based on the previous passage,"), _short(" " + question), Text("?"),
                     BLANK, Text(".")]
        else:
            parts = [Text("Based on the following passage"), _short(" " + question), Text("?"), BLANK, Text("."),
                     _short(" " + passage)]
        label = _label(record, "label", _bool_name, labels)
        return [_example(record, parts, labels, verbalizers, label)]

    return ClozeTask("boolq", examples, _accuracy_metrics)


# --------------------------------------------------------------------------------------------
# RTE and CB (one pattern family; CB adds a third label)


def _entailment_parts(record: Record, pattern_id: int, cb: bool):
    premise = standardize(record.field("premise", kind=str))
    hypothesis = standardize(record.field("hypothesis", kind=str))
    stripped = _strip_final_punctuation(hypothesis)
    if pattern_id == 0:
        return [Text('"'), _short(stripped), Text('" ?')], [BLANK, Text(","), Text(' "'), _short(premise), Text('"')]
    if pattern_id == 1:
        return [_short(stripped), Text("?")], [BLANK, Text(","), _short(" " + premise)]
    if pattern_id == 2:
        return [Text('"'), _short(stripped), Text('" ?')], [BLANK, Text('. "'), _short(premise), Text('"')]
    if pattern_id == 3:
        return [_short(stripped), Text("?")], [BLANK, Text("."), _short(" " + premise)]
    question = " true, false or neither?" if cb else " True or False?"
    return [_short(premise), Text(" question:"), _short(" " + (hypothesis if cb else stripped)), Text(question),
            Text(" answer:"), BLANK], []


def rte(pattern_id: int = DEFAULT_PATTERNS["rte"]) -> ClozeTask:
    _check_pattern("rte", pattern_id, 5)
    labels = ("entailment", "not_entailment")
    verbalizers = (" true", " false") if pattern_id == 4 else (" Yes", " No")

    def examples(record: Record) -> list[ClozeExample]:
        parts_a, parts_b = _entailment_parts(record, pattern_id, cb=False)
        label = _label(record, "label", str, labels)
        return [_example(record, parts_a, labels, verbalizers, label, parts_b)]

    return ClozeTask("rte", examples, _accuracy_metrics)


def cb(pattern_id: int = DEFAULT_PATTERNS["cb"]) -> ClozeTask:
    _check_pattern("cb", pattern_id, 5)
    labels = ("entailment", "contradiction", "neutral")
    verbalizers = (" true", " false", " neither") if pattern_id == 4 else (" Yes", " No", " Maybe")

    def examples(record: Record) -> list[ClozeExample]:
        parts_a, parts_b = _entailment_parts(record, pattern_id, cb=True)
        label = _label(record, "label", str, labels)
        return [_example(record, parts_a, labels, verbalizers, label, parts_b)]

    def metrics(examples: Sequence[ClozeExample], predictions: Sequence[Any]) -> dict[str, float]:
        gold = [x.label for x in examples]
        return {"accuracy": accuracy(predictions, gold), "f1_macro": macro_f1(predictions, gold)}

    return ClozeTask("cb", examples, metrics)


# --------------------------------------------------------------------------------------------
# WiC


def wic(pattern_id: int = DEFAULT_PATTERNS["wic"]) -> ClozeTask:
    _check_pattern("wic", pattern_id, 3)
    labels = ("false", "true")
    verbalizers = ("2", "b") if pattern_id == 2 else (" No", " Yes")

    def examples(record: Record) -> list[ClozeExample]:
        first = standardize(record.field("sentence1", kind=str))
        second = standardize(record.field("sentence2", kind=str))
        word = record.field("word", kind=str)
        if pattern_id == 0:
            parts = [_short(f'"{first}" / "{second}"'), Text(f' Similar sense of "{word}"?'), BLANK, Text(".")]
        elif pattern_id == 1:
            parts = [_short(first), _short(" " + second),
                     Text(f" Does {word} have the same meaning in both sentences?"), BLANK]
        else:
            parts = [Text(word), Text(" ."), Text(' Sense (1) (a) "'), _short(first), Text('"'), Text(" ("), BLANK,
                     Text(') "'), Text(second), Text('"')]
        label = _label(record, "label", _bool_name, labels)
        return [_example(record, parts, labels, verbalizers, label)]

    return ClozeTask("wic", examples, _accuracy_metrics)


# --------------------------------------------------------------------------------------------
# COPA (multi-token: the choices are the candidates)


def copa(pattern_id: int = DEFAULT_PATTERNS["copa"]) -> ClozeTask:
    _check_pattern("copa", pattern_id, 2)

    def examples(record: Record) -> list[ClozeExample]:
        premise = _strip_final_punctuation(" " + record.field("premise", kind=str))
        choices = [_strip_final_punctuation(_lowercase_first(record.field(key, kind=str)))
                   for key in ("choice1", "choice2")]
        question = record.field("question", kind=str)
        if question not in ("cause", "effect"):
            raise record.error(f"field 'question' must be 'cause' or 'effect', got {question!r}")
        joiner = " because" if question == "cause" else ", so"
        if pattern_id == 0:
            parts = [Text('"'), Text(choices[0]), Text('" or "'), Text(choices[1]), Text('"?'), _short(premise),
                     Text(joiner), BLANK, Text(".")]
        else:
            parts = [Text(choices[0]), Text(" or"), Text(" " + choices[1]), Text("?"), _short(premise), Text(joiner),
                     BLANK, Text(".")]
        label = _label(record, "label", lambda v: v, (0, 1))
        return [_example(record, parts, (0, 1), [" " + c for c in choices], label)]

    def training_examples(record: Record) -> list[ClozeExample]:
        mirrored = {**record.data, "choice1": record.data.get("choice2"), "choice2": record.data.get("choice1")}
        if isinstance(record.data.get("label"), int):
            mirrored["label"] = 1 - record.data["label"]
        return examples(record) + examples(record.child(mirrored))

    return ClozeTask("copa", examples, _accuracy_metrics, multi_token=True, training_examples=training_examples)


# --------------------------------------------------------------------------------------------
# WSC


def _marked_text(record: Record) -> tuple[str, str]:
    """The text with the pronoun marked ``*it*`` (the authors' index repairs: the pronoun may sit
    one word off, or be glued to the next characters) and the pronoun."""
    words = standardize(record.field("text", kind=str)).split()
    pronoun = record.field("target", "span2_text", kind=str)
    index = record.field("target", "span2_index", kind=int)
    if not 0 <= index < len(words) or words[index] != pronoun:
        for offset in (-1, 1):
            if 0 <= index + offset < len(words) and words[index + offset] == pronoun:
                index += offset
        if 0 <= index < len(words) and words[index] != pronoun and words[index].startswith(pronoun):
            words[index : index + 1] = [words[index][: len(pronoun)], words[index][len(pronoun) :]]
    if not 0 <= index < len(words) or words[index] != pronoun:
        raise record.error(f"field 'target.span2_index' ({index}) does not point at span2_text {pronoun!r} in 'text'")
    words[index] = f"*{words[index]}*"
    return " ".join(words), pronoun


def wsc(pattern_id: int = DEFAULT_PATTERNS["wsc"]) -> ClozeTask:
    _check_pattern("wsc", pattern_id, 3)
    labels = ("False", "True")

    def parts(record: Record):
        text, pronoun = _marked_text(record)
        question = {
            0: f" The pronoun '*{pronoun}*' refers to",
            1: f" In the previous sentence, the pronoun '*{pronoun}*' refers to",
            2: f" Question: In the passage above, what does the pronoun '*{pronoun}*' refer to?",
        }[pattern_id]
        pattern = [_short(text), Text(question), *([Text(" Answer:")] if pattern_id == 2 else []), BLANK, Text(".")]
        target = record.field("target", "span1_text", kind=str)
        label = _label(record, "label", str, labels)
        return pattern, target, _wsc_candidates(record), label

    def example(record: Record, pattern, target: str, others: list[str], label) -> ClozeExample:
        candidates = [" " + target] + [" " + c for c in others]
        return ClozeExample(
            parts_a=tuple(pattern), candidates=tuple(candidates), choices=tuple(range(len(candidates))), label=label,
            target=0, meta={"generative": not record.has("candidates")}, source=record.where,
        )

    def examples(record: Record) -> list[ClozeExample]:
        return [example(record, *parts(record))]

    def training_examples(record: Record) -> list[ClozeExample]:
        pattern, target, others, label = parts(record)
        if label != "True":
            return []
        if len(others) <= WSC_TRAIN_CANDIDATES:
            return [example(record, pattern, target, others, label)]
        chunks = [others[i : i + WSC_TRAIN_CANDIDATES] for i in range(0, len(others), WSC_TRAIN_CANDIDATES)]
        chunks[-1] += others[: WSC_TRAIN_CANDIDATES - len(chunks[-1])]
        return [example(record, pattern, target, chunk, label) for chunk in chunks]

    def decide(example: ClozeExample, result: ClozeResult) -> str:
        right = result.greedy[0] if example.meta["generative"] else result.best == 0
        return "True" if right else "False"

    return ClozeTask("wsc", examples, _accuracy_metrics, multi_token=True, length_penalty=1.0, decide=decide,
                     training_examples=training_examples, training_loss="mix")


def _wsc_candidates(record: Record) -> list[str]:
    """The distinct texts of a WSC record's ``candidates`` (the authors' WSC-negative files), in order."""
    others: list[str] = []
    if record.has("candidates"):
        for i, candidate in enumerate(record.field("candidates", kind=list)):
            name = candidate.get("text") if isinstance(candidate, dict) else candidate
            if not isinstance(name, str):
                raise record.error(f"field 'candidates.{i}' must be a string or an object with a 'text'")
            if name not in others:
                others.append(name)
    return others


# --------------------------------------------------------------------------------------------
# MultiRC (one example per answer)


def multirc(pattern_id: int = DEFAULT_PATTERNS["multirc"]) -> ClozeTask:
    _check_pattern("multirc", pattern_id, 5)
    labels = (0, 1)
    verbalizers = (" False", " True") if pattern_id == 3 else (" No", " Yes")

    def examples(record: Record) -> list[ClozeExample]:
        passage = _strip_final_punctuation(standardize(record.field("passage", "text", kind=str)).rstrip())
        result = []
        for q, question_data in enumerate(record.field("passage", "questions", kind=list)):
            question_record = record.child({"question": question_data})
            question = _strip_final_punctuation(
                standardize(question_record.field("question", "question", kind=str)).rstrip())
            question_id = (record.data.get("idx"), question_data.get("idx", q))
            for a in range(len(question_record.field("question", "answers", kind=list))):
                answer = standardize(question_record.field("question", "answers", a, "text", kind=str))
                parts = {
                    0: [_short(passage), Text("."), Text(" Question:"), Text(f" {question}?"), Text(" Is it"),
                        Text(" " + answer), Text("?"), BLANK, Text(".")],
                    1: [_short(passage), Text("."), Text(" Question:"), Text(" " + question), Text("?"),
                        Text(' Is the correct answer "'), Text(answer), Text('"?'), BLANK, Text(".")],
                    2: [_short(passage), Text(". Based on the previous passage,"), Text(" " + question), Text("?"),
                        Text(' Is "'), Text(answer), Text('" a correct answer?'), BLANK, Text(".")],
                    3: [_short(passage), Text(" " + question), Text("- ["), BLANK, Text("]"), Text(answer)],
                    4: [_short(passage), Text("."), Text(" Question:"), Text(" " + question), Text("?"),
                        Text(" " + answer), Text("?"), BLANK, Text(".")],
                }[pattern_id]
                answer_record = question_record.child(question_data["answers"][a])
                label = _label(answer_record, "label", lambda v: v, labels)
                result.append(_example(record, parts, labels, verbalizers, label, question=question_id))
        return result

    def metrics(examples: Sequence[ClozeExample], predictions: Sequence[Any]) -> dict[str, float]:
        gold = [x.label for x in examples]
        return {"f1a": f1(predictions, gold, positive=1),
                "em": multirc_exact_match(predictions, gold, [x.meta["question"] for x in examples]),
                "accuracy": accuracy(predictions, gold)}

    return ClozeTask("multirc", examples, metrics)


# --------------------------------------------------------------------------------------------
# ReCoRD (one example per query; the candidates are the passage's entities)


def record(pattern_id: int = DEFAULT_PATTERNS["record"]) -> ClozeTask:
    _check_pattern("record", pattern_id, 1)

    def queries(item: Record):
        """(pattern parts, the passage's entities sorted, the answers or None) of each query."""
        raw = item.field("passage", "text", kind=str)
        text = standardize(raw)
        entities = set()
        for e, _ in enumerate(item.field("passage", "entities", kind=list)):
            start = item.field("passage", "entities", e, "start", kind=int)
            end = item.field("passage", "entities", e, "end", kind=int)
            entities.add(standardize(raw[start : end + 1]))
        entities_sorted = sorted(entities)
        text = text.replace("@highlight\n", "- ")
        for q, _ in enumerate(item.field("qas", kind=list)):
            query = standardize(item.field("qas", q, "query", kind=str))
            if "@placeholder" not in query:
                raise item.error(f"field 'qas.{q}.query' holds no @placeholder")
            before, after = query.split("@placeholder", 1)
            answers = None
            if item.has("qas") and "answers" in item.data["qas"][q]:
                answers = sorted({standardize(item.field("qas", q, "answers", a, "text", kind=str))
                                  for a in range(len(item.field("qas", q, "answers", kind=list)))})
            yield (_short(text), Text(" " + before.rstrip()), BLANK, Text(after)), entities_sorted, answers

    def example(item: Record, pattern, candidates: Sequence[str], answers: list[str] | None) -> ClozeExample:
        target = next((i for i, e in enumerate(candidates) if answers and e in answers), None)
        return ClozeExample(parts_a=pattern, candidates=tuple(" " + e for e in candidates), choices=tuple(candidates),
                            label=answers, target=target, meta={"answers": answers or []}, source=item.where)

    def examples(item: Record) -> list[ClozeExample]:
        return [example(item, parts, entities, answers) for parts, entities, answers in queries(item)]

    def training_examples(item: Record) -> list[ClozeExample]:
        shuffler = random.Random(item.line)
        result = []
        for parts, entities, answers in queries(item):
            if not answers:
                raise item.error("a ReCoRD training record needs the answers of every query")
            for answer in answers:
                wrong = [e for e in entities if e not in answers]
                if len(wrong) > RECORD_TRAIN_NEGATIVES:
                    shuffler.shuffle(wrong)
                    wrong = wrong[:RECORD_TRAIN_NEGATIVES]
                result.append(example(item, parts, [answer, *wrong], [answer]))
        return result

    def metrics(examples: Sequence[ClozeExample], predictions: Sequence[Any]) -> dict[str, float]:
        truths = [x.meta["answers"] for x in examples]
        return {"em": squad_exact_match(predictions, truths), "f1": squad_f1(predictions, truths)}

    return ClozeTask("record", examples, metrics, multi_token=True, training_examples=training_examples)


#: Task name -> factory taking ``pattern_id`` (default: the authors' finetuning choice).
SUPERGLUE_TASKS: dict[str, Callable[..., ClozeTask]] = {
    "boolq": boolq, "cb": cb, "copa": copa, "rte": rte, "wic": wic, "wsc": wsc, "multirc": multirc, "record": record,
}


def superglue_task(name: str, pattern_id: int | None = None) -> ClozeTask:
    """The SuperGLUE task ``name`` with pattern ``pattern_id`` (None: the authors' default)."""
    if name not in SUPERGLUE_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(SUPERGLUE_TASKS)} or custom")
    factory = SUPERGLUE_TASKS[name]
    return factory() if pattern_id is None else factory(pattern_id)


