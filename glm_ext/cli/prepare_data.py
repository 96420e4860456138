"""``glm-ext prepare-data``: text into a memory-mapped token file (optionally training a tokenizer first)."""

from __future__ import annotations

import argparse
import time

from glm_ext.cli.common import reports_errors


def add_parser(commands) -> None:
    parser = commands.add_parser("prepare-data", help="tokenise text into a memory-mapped token file")
    parser.add_argument("sources", nargs="*", help=".txt files (one document each), .jsonl files, directories")
    parser.add_argument("--output", required=True,
                        help="token file prefix: writes PREFIX.bin/.idx.npy/.json (a prefix, not a directory: "
                             "o/tokens writes o/tokens.bin, ...; o/ is refused)")
    parser.add_argument("--default-corpus", action="store_true", help="add Python's help() topics as documents")
    parser.add_argument("--text-key", default="text", help="the field holding each .jsonl line's text")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", help="a tokenizer.json to encode with")
    tokenizer.add_argument(
        "--train-tokenizer", type=int, metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this size on the sources first (saved as PREFIX.tokenizer.json once "
             "the token file is written)",
    )
    parser.set_defaults(run=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.data.datasets import (
        iter_text_pieces, prepare_token_file, token_file_paths, token_file_tokenizer_path)
    from glm_ext.progress import Progress
    from glm_ext.tokenizer import GLMTokenizer

    reading = dict(sources=args.sources, text_key=args.text_key, with_default_corpus=args.default_corpus)
    paths = token_file_paths(args.output)
    if args.train_tokenizer:
        start = time.perf_counter()
        tokenizer = GLMTokenizer.train((piece for _, piece in iter_text_pieces(**reading)), args.train_tokenizer)
        print(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.perf_counter() - start:.1f} s")
    else:
        tokenizer = GLMTokenizer.from_file(args.tokenizer)
    start = time.perf_counter()
    with Progress("tokenising", unit="char", unit_scale=True) as progress:
        token_file = prepare_token_file(tokenizer=tokenizer, output=args.output, progress=progress.advance, **reading)
    seconds = time.perf_counter() - start
    print(f"{len(token_file)} documents, {token_file.num_tokens:,} tokens in {seconds:.1f} s "
          f"({token_file.num_tokens / seconds:,.0f} tokens/s) -> {', '.join(map(str, paths))}")
    if args.train_tokenizer:  # saved last, so that a failure leaves no tokenizer without its token file
        tokenizer_path = token_file_tokenizer_path(args.output)
        tokenizer.save(tokenizer_path)
        print(f"tokenizer -> {tokenizer_path}")
    return 0
