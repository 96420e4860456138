"""What a person watching a run sees: progress display (glm_ext.progress), metrics files
(glm_ext.metrics) and plots (glm_ext.plot, glm-ext plot)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from glm_ext import cli
from glm_ext.metrics import MetricsLogger, read_metrics
from glm_ext.plot import DPI, FIGURE_SIZE
from glm_ext.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]

# A job of 3 units reporting after each: what `Progress` prints depends only on where stdout goes.
PROGRESS_SCRIPT = """
from glm_ext.progress import Progress
with Progress("step", 3, unit="step") as progress:
    progress.write("starting")
    for i in range(3):
        progress.advance()
        progress.report(f"loss {4 - i:.4f}", "1,000 tokens/s")
"""


def run_progress_script(stdout, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT], stdout=stdout, stderr=subprocess.PIPE,
                          env=environment, cwd=ROOT, timeout=120, check=True)


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal():
    out = run_progress_script(subprocess.PIPE).stdout.decode()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "starting"
    assert [line.split(" | ")[:3] for line in lines[1:]] == [
        ["step 1/3", "loss 4.0000", "1,000 tokens/s"],
        ["step 2/3", "loss 3.0000", "1,000 tokens/s"],
        ["step 3/3", "loss 2.0000", "1,000 tokens/s"],
    ]
    assert all(line.split(" | ")[3].startswith("ETA ") for line in lines[1:])


def test_progress_draws_a_bar_in_a_terminal_and_nothing_off_rank_0():
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
    try:
        run_progress_script(terminal)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "3/3" in shown and "loss 2.0000" in shown and "starting" in shown
    assert "step 1/3 | loss" not in shown  # no plain lines in a terminal

    assert run_progress_script(subprocess.PIPE, RANK="1").stdout == b""


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_file_drops_lines_beyond_the_resumed_step(tmp_path):
    run = RunDirectory(tmp_path)
    logger = MetricsLogger(run)
    logger.start(0)
    for step in (2, 4, 6):
        logger.log({"step": step, "loss": 10.0 - step})
    logger.close()
    with open(run.metrics_file, "a", encoding="utf-8") as file:
        file.write('{"step": 8, "lo')  # a crash in the middle of a line
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]

    logger = MetricsLogger(run)
    logger.start(4)  # resumed from the checkpoint of step 4
    assert run.metrics_file.read_text() == '{"step": 2, "loss": 8.0}\n{"step": 4, "loss": 6.0}\n'
    with pytest.raises(ValueError, match="steps must increase"):
        logger.log({"step": 4, "loss": 1.0})
    logger.log({"step": 6, "loss": 0.5})
    logger.close()
    assert read_metrics(run.metrics_file) == [{"step": 2, "loss": 8.0}, {"step": 4, "loss": 6.0},
                                              {"step": 6, "loss": 0.5}]


# ---------------------------------------------------------------------------------------------
# Plots


def write_metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_draws_two_runs_into_one_png(tmp_path, capsys):
    from PIL import Image

    for name, scale in (("run-a", 1.0), ("run-b", 0.5)):
        write_metrics(tmp_path / name, [
            {"step": s, "loss": 6 * scale / s, "lr": 1e-3 * s, "tokens_seen": 2048 * s,
             **({"eval_loss": 7 * scale / s, "eval_accuracy": 0.05 * s} if s % 2 == 0 else {})}
            for s in range(1, 9)
        ])
    output = tmp_path / "plots" / "both.png"
    assert cli.main(["plot", str(tmp_path / "run-a"), str(tmp_path / "run-b"), "--output", str(output),
                     "--x", "tokens"]) == 0
    assert str(output) in capsys.readouterr().out
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI))
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    # matplotlib's first two cycle colours: one per run
    assert (0x1F, 0x77, 0xB4) in colours and (0xFF, 0x7F, 0x0E) in colours

    assert cli.main(["plot", str(tmp_path / "run-a")]) == 0  # one run: RUN_DIR/loss.png by default
    assert (tmp_path / "run-a" / "loss.png").is_file()
    assert cli.main(["plot", str(tmp_path / "missing")]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err

