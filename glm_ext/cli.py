"""The ``glm-ext`` command (also ``python -m glm_ext``)."""

from __future__ import annotations

import argparse
import json
import sys


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
