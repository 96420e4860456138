"""``glm-ext plot``: loss, held-out token accuracy and learning-rate curves of runs (glm_ext.plot)."""

from __future__ import annotations

import argparse

from glm_ext.cli.common import reports_errors


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "plot", help="draw the curves of training runs into a PNG",
        description="Draws training and held-out loss, held-out blank-infilling token accuracy and the learning "
        "rate of one or more runs (their metrics.jsonl) on one figure.",
    )
    parser.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories (glm-ext train --output-dir)")
    parser.add_argument("--output", metavar="PNG",
                        help="the image to write (default: RUN_DIR/loss.png for one run, ./loss.png for several)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step",
                        help="the x axis: optimizer steps or training tokens seen (default: step)")
    parser.set_defaults(run=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.plot import plot_runs
    from glm_ext.run_dir import LOSS_PLOT_FILE, RunDirectory

    output = args.output or (RunDirectory(args.runs[0]).loss_plot_file if len(args.runs) == 1 else LOSS_PLOT_FILE)
    print(f"wrote {plot_runs(args.runs, output, x=args.x)}")
    return 0
