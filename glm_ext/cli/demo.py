"""``glm-ext demo``: the end-to-end demo of ``glm_ext.demo`` (``make demo``)."""

from __future__ import annotations

import argparse
import time

from glm_ext.cli.common import USER_ERRORS, error


def add_parser(commands) -> None:
    from glm_ext import demo

    parser = commands.add_parser(
        "demo", help="end to end: train a tiny GLM on Python's help() topics, then fill blanks",
        description="Tokenizer, token files, a few minutes of CPU training of the tiny preset, a checkpoint, "
        "then blank filling. Reuses what --output-dir already holds (a finished run is not trained again).",
    )
    parser.add_argument("--output-dir", default="glm-demo", help="where everything goes (default: ./glm-demo)")
    parser.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help=f"training steps (default: {demo.DEMO_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--vocab-size", type=int, default=demo.DEMO_VOCAB_SIZE,
                        help=f"tokenizer size (default: {demo.DEMO_VOCAB_SIZE})")
    parser.add_argument("--position-encoding", choices=("rotary_2d", "learned_2d"),
                        default=demo.DEMO_POSITION_ENCODING,
                        help="2D rotary (ChatGLM's variant, learns faster; default) or the authors' learned 2D tables")
    parser.add_argument("--retrain", action="store_true", help="train again even if --output-dir holds a run")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from glm_ext import demo

    try:
        return demo.run_demo(args, time.perf_counter())
    except (*USER_ERRORS, RuntimeError) as exc:
        return error(str(exc))
