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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-ext", description="GLM on fused PyTorch ops.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="how the installed extension was built")
    info.add_argument("--json", action="store_true", help="print the build info as JSON")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
