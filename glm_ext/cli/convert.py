"""``glm-ext convert``: checkpoints between the authors' layout and ours."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from glm_ext.cli.common import error, reports_errors


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert a checkpoint between the authors' layout and ours",
        description="SRC is a glm_ext checkpoint directory, or the authors' / Hugging Face checkpoint "
        "(mp_rank_00_model_states.pt, pytorch_model.bin, or a directory holding one), which needs "
        "--preset or --config.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint to read")
    parser.add_argument("dst", metavar="DST", help="directory (--to ours) or file (--to authors) to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST (by default an existing output is never overwritten)")
    parser.add_argument("--to", choices=("ours", "authors"), default="ours",
                        help="ours: model.safetensors + config.json; authors: mp_rank_00_model_states.pt "
                             "(default: ours)")
    source_config = parser.add_mutually_exclusive_group()
    source_config.add_argument("--preset", metavar="NAME",
                               help="architecture of an authors' SRC: a preset of glm_ext.model.PRESETS "
                                    "(base, large, 410m, 515m, 2b, 10b, ...)")
    source_config.add_argument("--config", metavar="JSON", help="GLMConfig fields of an authors' SRC (a JSON file)")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="with --preset: the rows of SRC's word embedding, when not the preset's (e.g. a model "
                             "trained with a 1024-token tokenizer)")
    tokenizer = parser.add_argument_group(
        "tokenizer", "DST (--to ours) carries the model's tokenizer as tokenizer.json, so that glm-ext generate DST "
        "runs on it; a glm_ext SRC passes on the one it carries.")
    tokenizer.add_argument("--tokenizer-files", nargs="+", metavar="FILE",
                           help="the files SRC was trained with: vocab.txt (wordpiece), vocab.json merges.txt "
                                "(roberta, gpt2) or cog-pretrain.model (chinese-sp)")
    tokenizer.add_argument("--tokenizer-family", metavar="NAME",
                           help="how to read --tokenizer-files: wordpiece, wordpiece-cased, roberta, gpt2, chinese-sp "
                                "(GLM-Large-Chinese), chinese-sp-10b (GLM-10B-Chinese); default: the one --preset "
                                "was trained with (glm_ext.tokenizer.PRESET_TOKENIZER_FAMILIES)")
    parser.set_defaults(run=run)


def _source_config(args: argparse.Namespace):
    """The architecture of an authors' SRC, from --preset or --config."""
    from glm_ext.model import GLMConfig

    if args.preset:
        config = GLMConfig.preset(args.preset)
        return dataclasses.replace(config, vocab_size=args.vocab_size) if args.vocab_size else config
    with open(args.config, encoding="utf-8") as f:
        return GLMConfig.from_dict(json.load(f))


def _check_destination(args: argparse.Namespace) -> None:
    """Refuses an existing DST before the (possibly long) conversion starts; the writers check again."""
    from glm_ext.checkpoint import AUTHORS_WEIGHTS_FILE

    target = Path(args.dst)
    if args.to == "authors" and target.is_dir():
        target = target / AUTHORS_WEIGHTS_FILE
    if args.overwrite or not (target.exists() or target.is_symlink()):
        return
    if args.to == "ours" and target.is_dir() and not any(target.iterdir()):
        return  # an empty directory holds nothing to lose
    raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")


def _tokenizer(args: argparse.Namespace, ours: bool):
    """The tokenizer DST carries: built from --tokenizer-files, or the one a glm_ext SRC carries, or None."""
    from glm_ext.checkpoint import TOKENIZER_FILE
    from glm_ext.tokenizer import PRESET_TOKENIZER_FAMILIES, GLMTokenizer

    if not args.tokenizer_files:
        carried = Path(args.src) / TOKENIZER_FILE
        return GLMTokenizer.from_file(carried) if ours and carried.is_file() else None
    trained_with = PRESET_TOKENIZER_FAMILIES.get(args.preset)
    family = args.tokenizer_family or trained_with
    if family is None:
        raise ValueError("--tokenizer-files needs --tokenizer-family NAME (or the --preset of a released model)")
    if trained_with and family != trained_with:
        raise ValueError(f"--tokenizer-family {family} does not fit --preset {args.preset}, "
                         f"which the authors trained with the {trained_with} tokenizer")
    return GLMTokenizer.from_files(family, args.tokenizer_files)


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext import checkpoint

    _check_destination(args)
    ours = checkpoint.is_checkpoint(args.src)
    if ours and (args.preset or args.config):
        return error(f"{args.src} is a glm_ext checkpoint with its own config.json; drop --preset/--config", 2)
    if not ours and not (args.preset or args.config):
        return error("an authors' checkpoint needs --preset NAME or --config JSON", 2)
    if args.vocab_size and not args.preset:
        return error("--vocab-size goes with --preset (a --config JSON holds vocab_size itself)", 2)
    if args.tokenizer_family and not args.tokenizer_files:
        return error("--tokenizer-family needs --tokenizer-files", 2)
    if args.tokenizer_files and args.to == "authors":
        return error("the authors' layout holds no tokenizer: drop --tokenizer-files or convert --to ours", 2)
    tokenizer = _tokenizer(args, ours) if args.to == "ours" else None
    if ours:
        model = checkpoint.load_checkpoint(args.src)
    else:
        model = checkpoint.import_authors_checkpoint(args.src, _source_config(args))
    if args.tokenizer_files:
        tokenizer.check_embedding_rows(model.config.vocab_size)
    if args.to == "ours":
        written = checkpoint.save_checkpoint(model, args.dst, tokenizer=tokenizer, overwrite=args.overwrite)
    else:
        written = checkpoint.save_authors_checkpoint(model, args.dst, overwrite=args.overwrite)
    layouts = {True: "glm_ext checkpoint", False: "authors' layout"}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({layouts[ours]}) -> {written} ({layouts[args.to == 'ours']}): "
          f"{parameters:,} parameters, {model.config}"
          + (f", with its tokenizer ({tokenizer.vocab_size} tokens)" if tokenizer else ""))
    return 0
