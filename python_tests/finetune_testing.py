"""Shared pieces of the finetuning tests: a tiny GLM pretrained on the bundled corpus, and a
synthetic cloze task built from that corpus that can only be solved by reading the context."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from glm_ext.data import default_corpus, prepare_token_file
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig, Trainer

TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, max_sequence_length=128)
#: The synthetic task's two labels: which of these words a stretch of the corpus holds.
KEYWORDS = ("object", "value")


def pretrain(root: Path, steps: int = 150) -> Path:
    """A run directory holding a tiny GLM pretrained with blank infilling on the bundled corpus (and
    its tokenizer): the model finetuning starts from."""
    documents = default_corpus()
    tokenizer = GLMTokenizer.train(documents[:40], 1000)
    tokenizer.save(root / "tokenizer.json")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    prepare_token_file([root / "corpus.jsonl"], tokenizer, root / "corpus")
    config = TrainConfig(train_data=str(root / "corpus"), tokenizer=str(root / "tokenizer.json"),
                         output_dir=str(root / "pretrained"), model_overrides=TINY_MODEL, max_length=96, batch_size=16,
                         steps=steps, warmup=20, lr=3e-3, log_every=0, device="cpu")
    Trainer(config, log=lambda line: None).fit(evaluate_first=False)
    return root / "pretrained"


def keyword_records(words_per_text: int = 20, seed: int = 0) -> list[dict]:
    """Stretches of ``words_per_text`` words of the corpus holding exactly one of ``KEYWORDS``, with
    that word as the label, as many of each label, shuffled: chance is 50%, and the text alone tells
    the label (the pattern asks which word it holds)."""
    texts = []
    for document in default_corpus():
        words = document.split()
        texts += [" ".join(words[i : i + words_per_text]) for i in range(0, len(words), words_per_text)]
    by_label: dict[str, list[dict]] = {word: [] for word in KEYWORDS}
    for text in texts:
        present = [word for word in KEYWORDS if re.search(rf"\b{word}\b", text)]
        if len(present) == 1:
            by_label[present[0]].append({"text": text, "label": present[0]})
    count = min(len(records) for records in by_label.values())
    records = [record for word in KEYWORDS for record in by_label[word][:count]]
    random.Random(seed).shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)
