"""The end-to-end demo (``glm-ext demo``, ``make demo``): from nothing but this machine's Python,
a tokenizer, token files, a tiny GLM trained on the CPU in minutes, a checkpoint, and blanks filled.

Everything goes to one output directory (``corpus/``, ``tokenizer.json``, ``data/``, ``run/``); a second
run reuses what is there and trains only what is missing.
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
from glm_ext.cli.generate import print_fill
from glm_ext.data import TokenFile, default_corpus, prepare_token_file
from glm_ext.data.corpus import DEFAULT_CORPUS_NAME
from glm_ext.generation import fill_blanks
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.run_dir import MODEL_DIR
from glm_ext.training import TrainConfig, Trainer

# The demo's training run: the tiny preset for about 2-4 minutes on 2 otherwise idle CPU cores
# (about 12,000 tokens/s there). With 2D rotary positions (GLM_SPEC 3, ChatGLM's variant) the tiny
# model learns to read the text around a blank within this budget; with the learned 2D tables it
# is still at the stage of filling every blank with the most common tokens (newlines) after 1000
# steps (held-out loss 4.49 vs 4.26 with rotary; --position-encoding learned_2d to see it).
DEMO_STEPS = 800
DEMO_BATCH_SIZE = 16
DEMO_MAX_LENGTH = 128
DEMO_LR = 2e-3
DEMO_WARMUP = 50
DEMO_POSITION_ENCODING = "rotary_2d"
DEMO_VOCAB_SIZE = 1024
DEMO_MAX_NEW_TOKENS = 12


# Sentences in the corpus's style with [MASK] blanks, and what the corpus says there. All but the
# last come from training topics; the "for" topic is held out (see _demo_split).
DEMO_EXAMPLES = (
    ('The "while" statement is used for [MASK] execution as long as an expression is true.', "repeated"),
    ('A "break" statement executed in the first suite terminates the [MASK] without executing the "else" '
     "clause’s suite.", "loop"),
    ('The "if" statement is used for [MASK] execution.', "conditional"),
    ("The [MASK] statement is used for repeated execution as long as an [MASK] is true.", '"while" / expression'),
    ('The "for" statement is used to [MASK] over the elements of a sequence.', "iterate"),
)
DEMO_HELD_OUT_EVERY = 10  # every 10th help topic (from the 6th on) is held out
_UNDERLINE = re.compile(r"^([*=~^-])\1+$")


def _reflow(text: str) -> str:
    """Joins the lines of each hard-wrapped prose paragraph (help() text is wrapped at ~70
    columns) with spaces. Paragraphs with an indented line (code, lists) or a heading underline
    stay as they are. Without this, line-break tokens are the corpus's most common token and a tiny
    model fills every blank with them."""
    paragraphs = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        if len(lines) > 1 and all(line and not line[0].isspace() and not _UNDERLINE.match(line) for line in lines):
            paragraph = " ".join(lines)
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _demo_split(documents: list[str]) -> tuple[list[str], list[str]]:
    held_out = [d for i, d in enumerate(documents) if i % DEMO_HELD_OUT_EVERY == DEMO_HELD_OUT_EVERY // 2]
    train = [d for i, d in enumerate(documents) if i % DEMO_HELD_OUT_EVERY != DEMO_HELD_OUT_EVERY // 2]
    return train, held_out


def run_demo(args: argparse.Namespace, start: float) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"glm-ext demo: a tiny GLM trained on {DEFAULT_CORPUS_NAME}, then asked to fill blanks -> {out}")

    # 1. Corpus: Python's help() topics, every 10th one held out.
    documents = [_reflow(document) for document in default_corpus()]
    train_docs, held_docs = _demo_split(documents)
    corpus_dir = out / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    sources = {}
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        sources[name] = corpus_dir / f"{name}.jsonl"
        if not sources[name].is_file():
            temp = sources[name].with_suffix(".jsonl.tmp")
            temp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
            temp.replace(sources[name])
    print(f"[1/5] corpus: {len(documents)} help topics ({sum(map(len, documents)) / 1e3:,.0f} kB of text, "
          f"paragraphs unwrapped); {len(train_docs)} for training, {len(held_docs)} held out")

    # 2. Tokenizer: byte-level BPE learnt on the training topics.
    tokenizer_path = out / "tokenizer.json"
    if tokenizer_path.is_file():
        tokenizer = GLMTokenizer.from_file(tokenizer_path)
        if tokenizer.vocab_size != args.vocab_size:
            raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, not --vocab-size "
                             f"{args.vocab_size}; use another --output-dir")
        print(f"[2/5] tokenizer: {tokenizer.vocab_size} tokens, reusing {tokenizer_path}")
    else:
        t = time.perf_counter()
        tokenizer = GLMTokenizer.train(train_docs, args.vocab_size)
        tokenizer.save(tokenizer_path)
        print(f"[2/5] tokenizer: byte-level BPE of {tokenizer.vocab_size} tokens in {time.perf_counter() - t:.1f} s "
              f"-> {tokenizer_path}")

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
    print(f"[3/5] token files: {data['train'].num_tokens:,} training and {data['heldout'].num_tokens:,} held-out "
          f"tokens -> {out / 'data'}")

    # 4. Training.
    run_dir = out / "run"
    if args.retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    config = TrainConfig(
        train_data=str(out / "data" / "train"), eval_data=str(out / "data" / "heldout"),
        tokenizer=str(tokenizer_path), output_dir=str(run_dir), preset="tiny",
        model_overrides={"position_encoding": args.position_encoding}, steps=args.steps,
        batch_size=DEMO_BATCH_SIZE, max_length=DEMO_MAX_LENGTH, lr=DEMO_LR,
        warmup=max(1, min(DEMO_WARMUP, args.steps // 10)), log_every=max(1, min(25, args.steps // 10)),
        seed=args.seed, device=args.device,
    )
    trainer = Trainer(config, log=lambda line: print(f"      {line}"))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    model_config = trainer.model.config
    print(f"[4/5] training the tiny preset ({parameters / 1e6:.2f} M parameters: {model_config.num_layers} layers, "
          f"hidden {model_config.hidden_size}, {model_config.position_encoding} positions) on {trainer.device} "
          f"for {config.steps} steps of {config.batch_size} x {config.max_length} tokens (blank infilling: "
          f"spans over 15% of the tokens)")
    before = trainer.evaluate()
    print(f"      held-out loss before training: {before:.3f} (uniform guessing: "
          f"{math.log(trainer.model.config.vocab_size):.3f})")
    if trainer.resume():
        if trainer.step >= config.steps:
            print(f"      {run_dir} holds a finished run of {trainer.step} steps: using it (--retrain trains again)")
        else:
            print(f"      resuming the run in {run_dir} at step {trainer.step} (--retrain starts over)")
    summary = trainer.fit(evaluate_first=False)
    after = summary["eval_loss"]
    print(f"      held-out loss after {summary['step']} steps: {after:.3f} (before: {before:.3f}; "
          f"perplexity {math.exp(before):.0f} -> {math.exp(after):.0f})")
    checkpoint = Path(summary["checkpoint"])
    print(f"      checkpoint: {checkpoint}")

    # 5. Blank filling with the saved checkpoint.
    model = load_checkpoint(checkpoint / MODEL_DIR, map_location=trainer.device)
    print("[5/5] filling blanks (greedy decoding; the last sentence is from a held-out topic):")
    for text, expected in DEMO_EXAMPLES:
        result = fill_blanks(model, tokenizer, text, max_new_tokens=DEMO_MAX_NEW_TOKENS)
        print_fill(text, result, expected)
        print()
    print("A 1M-parameter model trained for minutes picks up the corpus's words and phrasing, not its meaning: "
          "expect rough fills.")
    print(f"Try your own: glm-ext generate {run_dir} 'The [MASK] statement is used to ...'")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0
