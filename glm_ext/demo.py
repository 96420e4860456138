"""The end-to-end demo (``glm-ext demo``, ``make demo``): from nothing but this machine's Python, a
tokenizer, token files, a small GLM trained on the CPU in minutes, a checkpoint, and blanks filled,
scored by exact match on held-out sentences (:mod:`glm_ext.tasks.masked_word`) next to a
most-frequent-word baseline.

The corpus is text that ships with Python: the ``help()`` topics and the docstrings of the standard
library, one document per topic or module, hard-wrapped paragraphs joined; every
``HELD_OUT_EVERY``-th document is held out (never trained on).

Everything goes to one output directory (``corpus/``, ``tokenizer.json``, ``data/``, ``run/``, the
run directory of :mod:`glm_ext.run_dir`); a second run reuses what is there and trains only what is
missing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from pathlib import Path

from glm_ext.checkpoint import load_checkpoint
from glm_ext.data import TokenFile, default_corpus, prepare_token_file
from glm_ext.data.corpus import stdlib_docstrings
from glm_ext.plot import plot_runs
from glm_ext.progress import Progress
from glm_ext.run_dir import MODEL_DIR, RunDirectory
from glm_ext.tasks import masked_word
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig, Trainer

# The demo's training run, sized so that the whole demo takes about three minutes on two idle cores (the
# README has the measurements). Blanks are single tokens mostly (Poisson(1) spans) over 30% of the
# tokens: twice the training signal per step of the authors' 15%, and closer to the one-word blanks it is
# scored on. The word-level vocabulary of 4000 tokens makes most of the held-out sentences' words one
# token; since training computes the logits of the blanks' tokens only, the output layer no longer
# dominates a step, and the larger vocabulary costs little.
DEMO_STEPS = 1500
DEMO_BATCH_SIZE = 16
DEMO_MAX_LENGTH = 128
DEMO_LR = 3e-3
DEMO_WARMUP = 100
DEMO_VOCAB_SIZE = 4000
DEMO_PRESET = "tiny"
DEMO_MODEL: dict = {}
DEMO_OBJECTIVES = {"mask_ratio": 0.3, "poisson_lambda": 1.0}

HELD_OUT_EVERY = 10  # documents 5, 15, 25, ... are held out
CLOZE_ITEMS = 200  # held-out sentences scored by exact match
CLOZE_SEED = 0
CLOZE_MAX_NEW_TOKENS = 4  # the plain greedy fill's tokens per blank (its first word is scored)
SHOWN_FILLS = 5

_UNDERLINE = re.compile(r"^([*=~^-])\1+$")


def reflow(text: str) -> str:
    """Joins the lines of each hard-wrapped prose paragraph with spaces. Paragraphs with an indented
    line (code, lists) or a heading underline stay as they are. Without this, line-break tokens are
    the corpus's most common token and a small model fills every blank with them."""
    paragraphs = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        if len(lines) > 1 and all(line and not line[0].isspace() and not _UNDERLINE.match(line) for line in lines):
            paragraph = " ".join(lines)
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def demo_corpus() -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the help() topics, then the standard library's
    docstrings by module, reflowed; every ``HELD_OUT_EVERY``-th document is held out."""
    documents = [reflow(d) for d in default_corpus()] + [reflow(text) for _, text in stdlib_docstrings()]
    held_out = HELD_OUT_EVERY // 2
    train = [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY != held_out]
    held = [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY == held_out]
    return train, held


def _write_jsonl(path: Path, documents: list[str]) -> None:
    if not path.is_file():
        temp = path.with_suffix(".jsonl.tmp")
        temp.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
        temp.replace(path)


def _timed(timings: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = now - start
    return now


def run_demo(args: argparse.Namespace, start: float) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    print(f"glm-ext demo: a small GLM trained on Python's own documentation, then asked to fill blanks -> {out}")

    # 1. Corpus.
    t = time.perf_counter()
    train_docs, held_docs = demo_corpus()
    corpus_dir = out / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    sources = {"train": corpus_dir / "train.jsonl", "heldout": corpus_dir / "heldout.jsonl"}
    _write_jsonl(sources["train"], train_docs)
    _write_jsonl(sources["heldout"], held_docs)
    size = sum(map(len, train_docs + held_docs)) / 1e6
    t = _timed(timings, "corpus", t)
    print(f"[1/5] corpus: help() topics and standard-library docstrings, {len(train_docs) + len(held_docs)} "
          f"documents ({size:.1f} MB); {len(train_docs)} for training, every {HELD_OUT_EVERY}th "
          f"({len(held_docs)}) held out ({timings['corpus']:.0f} s)")

    # 2. Tokenizer: a WordPiece large enough that the frequent words are one token each, so that
    # filling a blank with one token is choosing a word.
    tokenizer_path = out / "tokenizer.json"
    if tokenizer_path.is_file():
        tokenizer = GLMTokenizer.from_file(tokenizer_path)
        if tokenizer.vocab_size != args.vocab_size:
            raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, not --vocab-size "
                             f"{args.vocab_size}; use another --output-dir")
        note = f"reusing {tokenizer_path}"
    else:
        tokenizer = GLMTokenizer.train_wordpiece(train_docs, args.vocab_size)
        tokenizer.save(tokenizer_path)
        note = f"uncased WordPiece (as GLM-Base's) learnt on the training documents -> {tokenizer_path}"
    t = _timed(timings, "tokenizer", t)
    print(f"[2/5] tokenizer: {tokenizer.vocab_size} tokens, {note} ({timings['tokenizer']:.0f} s)")

    # 3. Token files.
    data = {}
    for name, source in sources.items():
        prefix = out / "data" / name
        try:
            data[name] = TokenFile(prefix)
            reused = data[name].metadata.get("tokenizer_sha256") == tokenizer.sha256
        except FileNotFoundError:
            reused = False
        if not reused:
            data[name] = prepare_token_file([source], tokenizer, prefix)
    t = _timed(timings, "token files", t)
    print(f"[3/5] token files: {data['train'].num_tokens:,} training and {data['heldout'].num_tokens:,} held-out "
          f"tokens -> {out / 'data'} ({timings['token files']:.0f} s)")

    # 4. Training.
    run_dir = RunDirectory(out / "run")
    if args.retrain and run_dir.path.exists():
        shutil.rmtree(run_dir.path)
    config = TrainConfig(
        train_data=str(out / "data" / "train"), eval_data=str(out / "data" / "heldout"),
        tokenizer=str(tokenizer_path), output_dir=str(run_dir.path), preset=DEMO_PRESET,
        model_overrides=DEMO_MODEL, objectives=DEMO_OBJECTIVES, steps=args.steps,
        batch_size=DEMO_BATCH_SIZE, max_length=DEMO_MAX_LENGTH, lr=DEMO_LR,
        warmup=max(1, min(DEMO_WARMUP, args.steps // 10)), log_every=max(1, min(25, args.steps // 10)),
        eval_every=max(1, args.steps // 4), seed=args.seed, device=args.device,
        **({"position_encoding": args.position_encoding} if args.position_encoding else {}),
    )
    trainer = Trainer(config, log=lambda line: print(f"      {line}"))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    model_config = trainer.model.config
    print(f"[4/5] training a GLM of {parameters / 1e6:.2f} M parameters ({model_config.num_layers} layers, hidden "
          f"{model_config.hidden_size}, {model_config.position_encoding} positions) on {trainer.device} for "
          f"{config.steps} steps of {config.batch_size} x {config.max_length} tokens (blank infilling: spans over "
          f"{config.objectives.mask_ratio:.0%} of the tokens); uniform guessing's loss: "
          f"{math.log(tokenizer.vocab_size):.3f}")
    if trainer.resume():
        print(f"      resuming the run in {run_dir.path} at step {trainer.step} (--retrain starts over)")
    summary = trainer.fit()
    if summary["complete"]:
        after = trainer.evaluate()
        print(f"      held-out loss: {after['eval_loss']:.3f}, token accuracy {after['eval_accuracy']:.1%}")
    plot = plot_runs([run_dir.path], run_dir.loss_plot_file)
    print(f"      curves: {plot}")
    checkpoint = Path(summary["checkpoint"])
    t = _timed(timings, "training", t)

    # 5. Exact match on held-out sentences, with the saved checkpoint.
    model = load_checkpoint(checkpoint / MODEL_DIR, map_location=trainer.device).eval()
    items = masked_word.masked_sentences(held_docs, CLOZE_ITEMS, seed=CLOZE_SEED)
    answers = [item.answer for item in items]
    counts = masked_word.word_counts(train_docs)
    baseline = masked_word.baseline_word(counts)
    candidates = masked_word.candidate_words(counts, tokenizer)
    with Progress("filling", 2 * len(items), unit="sentence", leave=False) as progress:
        chosen = masked_word.predict_words(model, tokenizer, items, candidates, progress=progress.advance)
        greedy = masked_word.greedy_words(model, tokenizer, items, max_new_tokens=CLOZE_MAX_NEW_TOKENS,
                                          progress=progress.advance)
    t = _timed(timings, "exact match", t)
    print(f"[5/5] blank filling on {len(items)} held-out sentences, one masked word of {masked_word.MIN_LETTERS}+ "
          f"lowercase letters each; the model's most probable word among the {len(candidates):,} words of the "
          f"training sentences that are one token each, and its plain greedy fill (glm-ext generate). The first "
          f"{SHOWN_FILLS}:")
    for item, word, fill in list(zip(items, chosen, greedy))[:SHOWN_FILLS]:
        print(f"  {item.text}\n      the text has {item.answer!r}; chosen word: {word!r}, greedy fill: {fill!r}")
    print(f"exact match on {len(items)} held-out sentences: {masked_word.exact_match(chosen, answers):.1%} choosing "
          f"among the training words, {masked_word.exact_match(greedy, answers):.1%} with the plain greedy fill; "
          f"most-frequent-word baseline (always {baseline!r}): "
          f"{masked_word.exact_match([baseline] * len(items), answers):.1%}")
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"Try your own: glm-ext generate {run_dir.path} 'The [MASK] statement is used to ...'")
    print(f"demo finished in {time.perf_counter() - start:.0f} s ({parts})")
    return 0
