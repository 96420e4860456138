"""``glm-ext evaluate cloze|lm`` end to end on a saved checkpoint: the printed and written results
are those of the Python API on the same model, and bad input ends in one clear error line."""

from __future__ import annotations

import json
import math

import pytest

from glm_ext.checkpoint import load_checkpoint, save_checkpoint
from glm_ext.cli import main
from glm_ext.tasks import cloze_task
from glm_ext.tasks.cloze import evaluate_cloze
from glm_ext.tasks.language_model import lambada, perplexity
from tasks_testing import one_thread, random_model, small_tokenizer  # noqa: F401

BOOLQ = [
    {"passage": "The while statement is used for repeated execution.", "question": "is while a loop", "label": True},
    {"passage": "The if statement is used for conditional execution.", "question": "is if a loop", "label": False},
    {"passage": "A break statement terminates the loop.", "question": "does break end the loop", "label": True},
    {"passage": "It was great.", "question": "was it terrible"},
]
TEXTS = ["The while statement is used for repeated execution", "It was great", "A string tuple or list"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint directory, tokenizer file, the loaded model, tokenizer)."""
    directory = tmp_path_factory.mktemp("model")
    tokenizer = small_tokenizer()
    save_checkpoint(random_model(tokenizer).float(), directory / "checkpoint")
    tokenizer.save(directory / "tokenizer.json")
    return directory / "checkpoint", directory / "tokenizer.json", load_checkpoint(directory / "checkpoint"), tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def evaluate(saved, *arguments):
    checkpoint, tokenizer_file, _, _ = saved
    return main(["evaluate", arguments[0], str(checkpoint), "--tokenizer", str(tokenizer_file), "--device", "cpu",
                 *arguments[1:]])


def test_evaluate_cloze_superglue(saved, tmp_path, capsys):
    data = write_jsonl(tmp_path / "boolq.jsonl", BOOLQ)
    output, predictions = tmp_path / "out.json", tmp_path / "predictions.jsonl"
    assert evaluate(saved, "cloze", "--task", "boolq", "--data", data, "--output", str(output),
                    "--predictions", str(predictions)) == 0
    _, _, model, tokenizer = saved
    task = cloze_task("boolq")
    expected = evaluate_cloze(model, tokenizer, task, task.read(data))
    printed = capsys.readouterr().out
    assert "boolq on" in printed and "4 examples, 3 labelled" in printed
    assert f"accuracy: {expected.metrics['accuracy']:.2f}" in printed
    results = json.loads(output.read_text())
    assert results["metrics"] == pytest.approx(expected.metrics) and results["task"] == "boolq"
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [line["prediction"] for line in lines] == list(expected.predictions)
    assert [line["source"] for line in lines] == [f"{data}:{i}" for i in range(1, 5)]
    assert lines[3]["label"] is None and len(lines[0]["scores"]) == 2


def test_evaluate_cloze_custom_pattern_and_function(saved, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": "Fine food", "label": "positive"},
                                                    {"text": "Cold soup", "label": "negative"}])
    arguments = ["--task", "custom", "--data", data, "--verbalizer", "positive=great", "--verbalizer",
                 "negative=terrible"]
    assert evaluate(saved, "cloze", *arguments, "--pattern", "{text}. It was [MASK].", "--output",
                    str(tmp_path / "a.json")) == 0
    (tmp_path / "my_patterns.py").write_text("def review(record):\n    return record['text'] + '. It was [MASK].'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert evaluate(saved, "cloze", *arguments, "--pattern-function", "my_patterns:review", "--output",
                    str(tmp_path / "b.json")) == 0
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert first["metrics"] == second["metrics"]  # the same filled text either way
    assert "accuracy:" in capsys.readouterr().out


def test_evaluate_lm(saved, tmp_path, capsys):
    _, _, model, tokenizer = saved
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    output = tmp_path / "lm.json"
    assert evaluate(saved, "lm", "--data", data, "--mode", "unidirectional", "--window", "6", "--stride", "2",
                    "--output", str(output)) == 0
    printed = capsys.readouterr().out
    documents = [tokenizer.encode(t) for t in TEXTS]
    expected = perplexity(model, tokenizer, documents, mode="unidirectional", window=6, stride=2)
    accuracy = lambada(model, tokenizer, TEXTS, mode="unidirectional").accuracy
    assert f"perplexity: {expected.perplexity:.4f}" in printed and f"accuracy: {accuracy:.2f}" in printed
    results = json.loads(output.read_text())
    assert results["perplexity"] == pytest.approx(expected.perplexity) and results["accuracy"] == accuracy
    assert results["num_tokens"] == sum(len(d) - 1 for d in documents)

    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS))
    assert evaluate(saved, "lm", "--data", str(text), "--output", str(output)) == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "accuracy" not in printed
    assert math.isfinite(json.loads(output.read_text())["perplexity"])


def test_evaluate_errors_are_one_line(saved, tmp_path, capsys):
    missing_field = write_jsonl(tmp_path / "bad.jsonl", [{"passage": "p", "label": True}])
    assert evaluate(saved, "cloze", "--task", "boolq", "--data", missing_field) == 1
    assert capsys.readouterr().err.strip() == f"error: {missing_field}:1: field 'question' is missing"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert evaluate(saved, "lm", "--data", str(empty)) == 1
    assert "holds no records" in capsys.readouterr().err
    assert evaluate(saved, "cloze", "--task", "custom", "--data", missing_field, "--pattern", "{text} [MASK]") == 1
    assert "needs a pattern" in capsys.readouterr().err
    assert evaluate(saved, "cloze", "--task", "boolq", "--data", str(tmp_path / "none.jsonl")) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown task
        evaluate(saved, "cloze", "--task", "sst2", "--data", missing_field)
    assert "invalid choice: 'sst2'" in capsys.readouterr().err
