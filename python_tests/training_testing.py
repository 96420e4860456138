"""A small corpus, tokenizer and trainer configuration for the tests of training runs
(test_run_dir.py, test_trainer_steps.py, test_faults.py, test_training_distributed.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from glm_ext.data import default_corpus, prepare_token_file
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig

SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=4, max_sequence_length=64)


def make_training_data(root: Path, documents: int = 12) -> Path:
    """``root`` with tokenizer.json and the token files ``train`` and ``heldout`` (help() topics)."""
    texts = default_corpus()[:documents]
    cut = documents - 2
    for name, docs in (("train", texts[:cut]), ("heldout", texts[cut:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = GLMTokenizer.train(texts[:cut], 300)
    tokenizer.save(root / "tokenizer.json")
    for name in ("train", "heldout"):
        prepare_token_file([root / f"{name}.jsonl"], tokenizer, root / name)
    return root


def small_config(data: Path, output_dir: Path, **overrides) -> TrainConfig:
    fields = dict(
        train_data=str(data / "train"), eval_data=str(data / "heldout"), tokenizer=str(data / "tokenizer.json"),
        output_dir=str(output_dir), model_overrides=SMALL_MODEL, max_length=48, batch_size=4, steps=6,
        warmup=2, lr=3e-3, log_every=0, eval_batches=2, device="cpu", dtype="float64",
    )
    return TrainConfig(**{**fields, **overrides})


def quiet(_line: str) -> None:
    pass


def temporaries(directory: Path) -> list[str]:
    """Every leftover temporary (``.<name>.<tag>.tmp``) anywhere under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*.tmp"))


def wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    """The lines a training process prints up to the first holding ``text`` (AssertionError when it
    ends before)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended before printing {text!r}: {''.join(lines)}{process.stderr.read()}")
