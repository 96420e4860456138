"""The ``glm-ext`` command (also ``python -m glm_ext``).

One module per subcommand; each defines ``add_parser(commands)``, which adds its subparser and sets
``run`` (a function of the parsed arguments returning the exit status). Modules import the heavy
parts of the package inside ``run``, so ``glm-ext --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from glm_ext.cli import convert, demo, evaluate, finetune, generate, info, plot, prepare_data, train

__all__ = ["build_parser", "main"]

COMMANDS = (info, prepare_data, train, finetune, plot, generate, evaluate, convert, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-ext", description="GLM on fused PyTorch ops.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
