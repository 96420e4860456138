"""``glm-ext convert``: checkpoints between the authors' layout and ours."""

from __future__ import annotations

import argparse
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
    parser.set_defaults(run=run)


def _source_config(args: argparse.Namespace):
    """The architecture of an authors' SRC, from --preset or --config."""
    from glm_ext.model import GLMConfig

    if args.preset:
        return GLMConfig.preset(args.preset)
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


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext import checkpoint

    _check_destination(args)
    ours = checkpoint.is_checkpoint(args.src)
    if ours and (args.preset or args.config):
        return error(f"{args.src} is a glm_ext checkpoint with its own config.json; drop --preset/--config", 2)
    if not ours and not (args.preset or args.config):
        return error("an authors' checkpoint needs --preset NAME or --config JSON", 2)
    if ours:
        model = checkpoint.load_checkpoint(args.src)
    else:
        model = checkpoint.import_authors_checkpoint(args.src, _source_config(args))
    if args.to == "ours":
        written = checkpoint.save_checkpoint(model, args.dst, overwrite=args.overwrite)
    else:
        written = checkpoint.save_authors_checkpoint(model, args.dst, overwrite=args.overwrite)
    layouts = {True: "glm_ext checkpoint", False: "authors' layout"}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({layouts[ours]}) -> {written} ({layouts[args.to == 'ours']}): "
          f"{parameters:,} parameters, {model.config}")
    return 0
