"""Curves of training runs from their ``metrics.jsonl`` (``glm-ext plot``; ``glm-ext train`` and the demo
write ``loss.png`` into the run directory at the end).

One PNG of ``FIGURE_SIZE`` inches at ``DPI`` (1500 x 420 pixels) with three panels sharing the x axis
(the step, or the training tokens seen): training loss (solid) and held-out loss (dashed, dots at the
evaluations); held-out blank-infilling token accuracy; learning rate. Each run has one colour.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from glm_ext.files import write_file_atomically
from glm_ext.metrics import read_metrics
from glm_ext.run_dir import RunDirectory

__all__ = ["DPI", "FIGURE_SIZE", "X_AXES", "plot_runs"]

FIGURE_SIZE = (15.0, 4.2)
DPI = 100
X_AXES = {"step": ("step", "step"), "tokens": ("tokens_seen", "training tokens seen")}


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its whole path where names repeat."""
    names = [path.resolve().name for path in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs)]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, *, x: Literal["step", "tokens"] = "step"
) -> Path:
    """Draws the runs of ``run_dirs`` (run directories holding ``metrics.jsonl``) into the PNG
    ``output`` (written atomically) and returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    if not run_dirs:
        raise ValueError("run_dirs is empty: name at least one run directory")
    key, x_label = X_AXES[x]
    runs = [Path(run) for run in run_dirs]
    for run in runs:
        if not RunDirectory(run).metrics_file.is_file():
            raise FileNotFoundError(f"{run} has no {RunDirectory(run).metrics_file.name} (a run directory of glm-ext train)")
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3, sharex=True)
    for index, (run, label) in enumerate(zip(runs, _labels(runs))):
        records = read_metrics(run)
        color = f"C{index % 10}"

        def series(name: str) -> tuple[list[float], list[float]]:
            points = [(r[key], r[name]) for r in records if r.get(name) is not None and key in r]
            return [p[0] for p in points], [p[1] for p in points]

        loss_axes.plot(*series("loss"), color=color, label=f"{label} train")
        loss_axes.plot(*series("eval_loss"), color=color, linestyle="--", marker=".", label=f"{label} held-out")
        accuracy_axes.plot(*series("eval_accuracy"), color=color, marker=".", label=label)
        lr_axes.plot(*series("lr"), color=color, label=label)
    for axes, title in ((loss_axes, "loss"), (accuracy_axes, "held-out token accuracy"), (lr_axes, "learning rate")):
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(output, lambda f: figure.savefig(f, format="png"), mode="wb")
    return output
