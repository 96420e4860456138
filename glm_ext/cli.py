"""The ``glm-ext`` command (also ``python -m glm_ext``)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

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


def _info(args: argparse.Namespace) -> int:
    import glm_ext

    info = glm_ext.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    archs = ", ".join(info["cuda_archs"]) or "-"
    print(f"glm_ext {info['version']}")
    print(f"  built against torch {info['torch_version']} (running torch {info['torch_runtime']})")
    if info["cuda"]:
        print(f"  CUDA kernels: yes (CUDA {info['cuda_version']}, archs {archs})")
    else:
        print("  CUDA kernels: no (CPU kernels only)")
    return 0


def _convert_config(args: argparse.Namespace):
    """The architecture of an authors' SRC, from --preset or --config."""
    from glm_ext.model import GLMConfig

    if args.preset:
        return GLMConfig.preset(args.preset)
    with open(args.config, encoding="utf-8") as f:
        return GLMConfig.from_dict(json.load(f))


def _convert(args: argparse.Namespace) -> int:
    from glm_ext import checkpoint

    ours = checkpoint.is_checkpoint(args.src)
    if ours and (args.preset or args.config):
        print(f"error: {args.src} is a glm_ext checkpoint with its own config.json; drop --preset/--config",
              file=sys.stderr)
        return 2
    if not ours and not (args.preset or args.config):
        print("error: an authors' checkpoint needs --preset NAME or --config JSON", file=sys.stderr)
        return 2
    try:
        if ours:
            model = checkpoint.load_checkpoint(args.src)
        else:
            model = checkpoint.import_authors_checkpoint(args.src, _convert_config(args))
        if args.to == "ours":
            written = checkpoint.save_checkpoint(model, args.dst)
        else:
            written = checkpoint.save_authors_checkpoint(model, args.dst)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    layouts = {True: "glm_ext checkpoint", False: "authors' layout"}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({layouts[ours]}) -> {written} ({layouts[args.to == 'ours']}): "
          f"{parameters:,} parameters, {model.config}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    import time

    from glm_ext.data.datasets import iter_documents, prepare_token_file, token_file_paths
    from glm_ext.tokenizer import GLMTokenizer

    reading = dict(sources=args.sources, text_key=args.text_key, with_default_corpus=args.default_corpus)
    paths = token_file_paths(args.output)
    try:
        if args.train_tokenizer:
            start = time.perf_counter()
            tokenizer = GLMTokenizer.train(iter_documents(**reading), args.train_tokenizer)
            tokenizer_path = paths[0].with_suffix(".tokenizer.json")
            tokenizer.save(tokenizer_path)
            print(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.perf_counter() - start:.1f} s "
                  f"-> {tokenizer_path}")
        else:
            tokenizer = GLMTokenizer.from_file(args.tokenizer)
        start = time.perf_counter()
        token_file = prepare_token_file(tokenizer=tokenizer, output=args.output, **reading)
        seconds = time.perf_counter() - start
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(token_file)} documents, {token_file.num_tokens:,} tokens in {seconds:.1f} s "
          f"({token_file.num_tokens / seconds:,.0f} tokens/s) -> {', '.join(map(str, paths))}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import os

    from glm_ext.training import TrainConfig, Trainer

    tokenizer = args.tokenizer or f"{args.data}.tokenizer.json"
    if not os.path.isfile(tokenizer):
        print(f"error: no tokenizer at {tokenizer}; pass --tokenizer (the one the token file was made with)",
              file=sys.stderr)
        return 2
    try:
        config = TrainConfig(
            train_data=args.data, tokenizer=tokenizer, eval_data=args.eval_data, output_dir=args.output_dir,
            preset=args.preset, model_overrides={"position_encoding": args.position_encoding}, steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length,
            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            seed=args.seed, log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
            device=args.device, dtype=args.dtype, compile=args.compile,
        )
        trainer = Trainer(config)
        if trainer.resume():
            print(f"resumed {args.output_dir} at step {trainer.step}")
        parameters = sum(p.numel() for p in trainer.model.parameters())
        print(f"training {parameters:,} parameters ({trainer.model.config}) on {trainer.device} "
              f"for {config.steps} steps of {config.batch_size} x {config.max_length} tokens")
        summary = trainer.fit()
    except (OSError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}")
    return 0


def _load_for_generation(path: str, tokenizer_path: str | None, device: str):
    """(model, tokenizer) from a run directory, a checkpoints/step-N directory or a checkpoint."""
    from pathlib import Path

    from glm_ext.checkpoint import is_checkpoint, load_checkpoint
    from glm_ext.tokenizer import GLMTokenizer
    from glm_ext.training import MODEL_DIR, TOKENIZER_FILE, latest_checkpoint, resolve_device

    root = Path(path)
    if is_checkpoint(root):
        model_dir, default_tokenizer = root, None
    elif is_checkpoint(root / MODEL_DIR):
        model_dir, default_tokenizer = root / MODEL_DIR, root.parent.parent / TOKENIZER_FILE
    elif (step_dir := latest_checkpoint(root)) is not None:
        model_dir, default_tokenizer = step_dir / MODEL_DIR, root / TOKENIZER_FILE
    else:
        raise FileNotFoundError(f"{path} is neither a training run (glm-ext train --output-dir) nor a checkpoint")
    tokenizer_path = tokenizer_path or default_tokenizer
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path} is a bare checkpoint: pass --tokenizer")
    model = load_checkpoint(model_dir, map_location=resolve_device(device))
    return model, GLMTokenizer.from_file(tokenizer_path)


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def _print_fill(context: str, result, expected: str | None = None) -> None:
    print(f"  context: {_one_line(context)}")
    print(f"  filled:  {_one_line(result.text)}")
    for i, blank in enumerate(result.blanks, 1):
        print(f"           blank {i}: {blank.text!r} (ended by {blank.stop})")
    if expected is not None:
        print(f"           the corpus has: {expected!r}")


def _generate(args: argparse.Namespace) -> int:
    from glm_ext.generation import fill_blanks

    try:
        model, tokenizer = _load_for_generation(args.model, args.tokenizer, args.device)
        for text in args.text:
            result = fill_blanks(
                model, tokenizer, text, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                use_cache=not args.no_cache,
            )
            _print_fill(text, result)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


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


def _demo(args: argparse.Namespace) -> int:
    import time

    try:
        return _run_demo(args, time.perf_counter())
    except (OSError, ValueError, RuntimeError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run_demo(args: argparse.Namespace, start: float) -> int:
    import json as json_module
    import shutil
    import time
    from pathlib import Path

    from glm_ext.checkpoint import load_checkpoint
    from glm_ext.data import TokenFile, default_corpus, prepare_token_file
    from glm_ext.data.corpus import DEFAULT_CORPUS_NAME
    from glm_ext.generation import fill_blanks
    from glm_ext.tokenizer import GLMTokenizer
    from glm_ext.training import MODEL_DIR, TrainConfig, Trainer

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
            temp.write_text("".join(json_module.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
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
        _print_fill(text, result, expected)
        print()
    print("A 1M-parameter model trained for minutes picks up the corpus's words and phrasing, not its meaning: "
          "expect rough fills.")
    print(f"Try your own: glm-ext generate {run_dir} 'The [MASK] statement is used to ...'")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-ext", description="GLM on fused PyTorch ops.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="how the installed extension was built")
    info.add_argument("--json", action="store_true", help="print the build info as JSON")
    info.set_defaults(run=_info)

    prepare = commands.add_parser("prepare-data", help="tokenise text into a memory-mapped token file")
    prepare.add_argument("sources", nargs="*", help=".txt files (one document each), .jsonl files, directories")
    prepare.add_argument("--output", required=True, help="token file prefix: writes PREFIX.bin/.idx.npy/.json")
    prepare.add_argument("--default-corpus", action="store_true", help="add Python's help() topics as documents")
    prepare.add_argument("--text-key", default="text", help="the field holding each .jsonl line's text")
    tokenizer = prepare.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", help="a tokenizer.json to encode with")
    tokenizer.add_argument(
        "--train-tokenizer", type=int, metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this size on the sources first (saved as PREFIX.tokenizer.json)",
    )
    prepare.set_defaults(run=_prepare_data)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint between the authors' layout and ours",
        description="SRC is a glm_ext checkpoint directory, or the authors' / Hugging Face checkpoint "
        "(mp_rank_00_model_states.pt, pytorch_model.bin, or a directory holding one), which needs "
        "--preset or --config.",
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint to read")
    convert.add_argument("dst", metavar="DST", help="directory (--to ours) or file (--to authors) to write")
    convert.add_argument("--to", choices=("ours", "authors"), default="ours",
                         help="ours: model.safetensors + config.json; authors: mp_rank_00_model_states.pt "
                              "(default: ours)")
    source_config = convert.add_mutually_exclusive_group()
    source_config.add_argument("--preset", metavar="NAME",
                               help="architecture of an authors' SRC: a preset of glm_ext.model.PRESETS "
                                    "(base, large, 410m, 515m, 2b, 10b, ...)")
    source_config.add_argument("--config", metavar="JSON", help="GLMConfig fields of an authors' SRC (a JSON file)")
    convert.set_defaults(run=_convert)

    train = commands.add_parser(
        "train", help="pretrain a GLM with blank infilling on a token file",
        description="Trains (or resumes: the newest checkpoint in --output-dir) a GLM on a token file "
        "made by prepare-data. Writes OUTPUT_DIR/checkpoints/step-N, OUTPUT_DIR/latest and a copy of the "
        "tokenizer, so that `glm-ext generate OUTPUT_DIR ...` works.",
    )
    train.add_argument("--data", required=True, metavar="PREFIX", help="training token file (prepare-data --output)")
    train.add_argument("--tokenizer", help="tokenizer.json of the token file (default: PREFIX.tokenizer.json)")
    train.add_argument("--eval-data", metavar="PREFIX", help="held-out token file for the held-out loss")
    train.add_argument("--output-dir", required=True, help="run directory (checkpoints, resumed if present)")
    train.add_argument("--preset", default="tiny", help="model size from glm_ext.model.PRESETS (default: tiny)")
    train.add_argument("--position-encoding", choices=("learned_2d", "rotary_2d"), default="learned_2d",
                       help="learned 2D tables (the authors' GLM, default) or 2D rotary (ChatGLM)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-length", type=int, default=128, help="tokens per blank-infilling row")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warmup, cosine decay)")
    train.add_argument("--warmup", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: end only)")
    train.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    train.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    train.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float64"),
                       help="auto: bf16 autocast on CUDA, float32 on the CPU")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.set_defaults(run=_train)

    generate = commands.add_parser(
        "generate", help="fill [MASK] blanks with a trained GLM",
        description="Fills every [MASK], [sMASK] and [gMASK] of each TEXT, in text order (GLM_SPEC 5).",
    )
    generate.add_argument("model", metavar="MODEL",
                          help="a run directory (glm-ext train --output-dir), a checkpoints/step-N directory "
                               "or a checkpoint (then with --tokenizer)")
    generate.add_argument("text", metavar="TEXT", nargs="+", help="context holding one or more mask tokens")
    generate.add_argument("--tokenizer", help="tokenizer.json (default: the run's copy)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="per blank (default: 32)")
    generate.add_argument("--min-new-tokens", type=int, default=1,
                          help="per blank: <eop>/<eos> are not drawn before (default: 1; 0 allows empty blanks)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--device", default="auto")
    generate.add_argument("--no-cache", action="store_true", help="recompute everything for every token")
    generate.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo", help="end to end: train a tiny GLM on Python's help() topics, then fill blanks",
        description="Tokenizer, token files, a few minutes of CPU training of the tiny preset, a checkpoint, "
        "then blank filling. Reuses what --output-dir already holds (a finished run is not trained again).",
    )
    demo.add_argument("--output-dir", default="glm-demo", help="where everything goes (default: ./glm-demo)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    demo.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE,
                      help=f"tokenizer size (default: {DEMO_VOCAB_SIZE})")
    demo.add_argument("--position-encoding", choices=("rotary_2d", "learned_2d"), default=DEMO_POSITION_ENCODING,
                      help="2D rotary (ChatGLM's variant, learns faster; default) or the authors' learned 2D tables")
    demo.add_argument("--retrain", action="store_true", help="train again even if --output-dir holds a run")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
