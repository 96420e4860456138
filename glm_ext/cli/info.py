"""``glm-ext info``: how the installed extension was built."""

from __future__ import annotations

import argparse
import json


def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="how the installed extension was built")
    parser.add_argument("--json", action="store_true", help="print the build info as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
