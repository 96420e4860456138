"""``glm-ext demo``: the end-to-end demo of ``glm_ext.demo`` (``make demo``)."""

from __future__ import annotations

import argparse
import time
from typing import get_args

from glm_ext.cli.common import USER_ERRORS, error


def add_parser(commands) -> None:
    from glm_ext import demo
    from glm_ext.model import PositionEncoding

    parser = commands.add_parser(
        "demo", help="end to end: train a small GLM on Python's documentation, then fill blanks",
        description="Tokenizer, token files, a few minutes of CPU training, a checkpoint, then blank filling "
        "scored by exact match on held-out sentences. Reuses what --output-dir already holds (a finished run "
        "is not trained again).",
    )
    parser.add_argument("--output-dir", default="glm-demo", help="where everything goes (default: ./glm-demo)")
    parser.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help=f"training steps (default: {demo.DEMO_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--vocab-size", type=int, default=demo.DEMO_VOCAB_SIZE,
                        help=f"tokenizer size (default: {demo.DEMO_VOCAB_SIZE})")
    parser.add_argument("--position-encoding", choices=get_args(PositionEncoding),
                        help="default: TrainConfig's (rotary_2d, ChatGLM's 2D rotary); learned_2d: the authors' "
                             "learned 2D tables, which learn more slowly at this size")
    parser.add_argument("--retrain", action="store_true", help="train again even if --output-dir holds a run")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from glm_ext import demo

    try:
        return demo.run_demo(args, time.perf_counter())
    except (*USER_ERRORS, RuntimeError) as exc:
        return error(str(exc))
