"""Faults on real training runs (`python -m glm_ext train` in a subprocess, a tiny model for 8
steps): SIGKILL at chosen points inside saves and at random moments, SIGINT and SIGTERM, each file
of a run directory corrupted in turn, and two trainers on one directory.

After each fault the same command is run again (in this process, through ``glm_ext.cli.main``, to
save the start-up time), and it either resumes with nothing lost (the final weights equal those of
an uninterrupted run, bitwise: float64 on one thread is deterministic) or stops with a clear
message; no temporary file survives the next successful start.

The faulty runs go through a driver (``DRIVER``) that runs the same command with ``os.fsync``,
``os.rename`` and ``os.replace`` wrapped, so that the process SIGKILLs itself at the n-th call
whose arguments name a given file, before or after the call (``FAULT_AT``: kill points inside
saves); it can also slow the steps down (``FAULT_SLOW_STEP``, seconds) or hold the run before a
step until a file exists (``FAULT_GATE``, ``step:path``).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm_ext import cli
from training_testing import make_training_data, temporaries, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
FINAL = f"step-{STEPS:08d}"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 300

DRIVER = """
import os, signal, sys, time
op, needle, count, when = os.environ["FAULT_AT"].split("|")
seen = 0

def describe(args):
    return " ".join(os.readlink(f"/proc/self/fd/{a}") if isinstance(a, int) else os.fspath(a) for a in args)

def wrap(name, real):
    def call(*args, **kwargs):
        global seen
        hit = name == op and needle in describe(args) and (seen := seen + 1) == int(count)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

for name in ("fsync", "rename", "replace"):
    setattr(os, name, wrap(name, getattr(os, name)))
from glm_ext.training import Trainer
real_step = Trainer.train_step
slow = float(os.environ.get("FAULT_SLOW_STEP", "0"))
gate_step, _, gate = os.environ.get("FAULT_GATE", "-1:").partition(":")

def step(self, batch):
    time.sleep(slow)
    while self.step == int(gate_step) and not os.path.exists(gate):
        time.sleep(0.05)
    return real_step(self, batch)

Trainer.train_step = step
from glm_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"), documents=6)


def command(data: Path, run: Path, fault: dict[str, str]) -> list[str]:
    """``python -m glm_ext train ...``, or with a ``fault`` (FAULT_AT, FAULT_SLOW_STEP) the driver
    running the same arguments."""
    arguments = ["train", "--data", str(data / "train"), "--tokenizer", str(data / "tokenizer.json"),
                 "--output-dir", str(run), "--steps", str(STEPS), "--batch-size", "2", "--max-length", "32",
                 "--warmup", "2", "--save-every", "2", "--log-every", "1", "--device", "cpu", "--dtype", "float64"]
    return [sys.executable, *(["-c", DRIVER] if fault else ["-m", "glm_ext"]), *arguments]


def environment(fault: dict[str, str]) -> dict[str, str]:
    return {**ENV, "FAULT_AT": "none|-|0|before", **fault}


def train(data: Path, run: Path, **fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(data, run, fault), env=environment(fault), capture_output=True, text=True,
                          timeout=TIMEOUT)


def rerun(data: Path, run: Path) -> tuple[int, str, str]:
    """(status, stdout, stderr) of the command run again, in this process on one thread."""
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(command(data, run, {})[3:])
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


def start(data: Path, run: Path, **fault: str) -> subprocess.Popen:
    return subprocess.Popen(command(data, run, fault), env=environment(fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / FINAL / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = train(data, run)
    assert done.returncode == 0, done.stderr
    return run


def assert_rerun_loses_nothing(data: Path, run: Path, reference: Path) -> tuple[str, str]:
    """Runs the command again: it must finish with exactly the uninterrupted run's weights and
    leave no temporaries. Returns its (stdout, stderr)."""
    status, out, err = rerun(data, run)
    assert status == 0, out + err
    assert (run / "latest").read_text() == FINAL + "\n"
    expected, got = final_weights(reference), final_weights(run)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert temporaries(run) == []
    return out, err


# ----- SIGKILL ------------------------------------------------------------------------------------

KILL_POINTS = {  # (operation, a file it names, the n-th such call, before/after it)
    "writing the run's config": ("replace", "train_config.json", 1, "before"),
    "syncing the weights of a checkpoint": ("fsync", "model.safetensors", 2, "before"),
    "syncing the trainer state": ("fsync", "trainer_state.pt", 2, "after"),
    "renaming the model directory into the staged checkpoint": ("rename", "/model", 2, "after"),
    "renaming a checkpoint into place": ("rename", "step-00000004", 2, "before"),
    "checkpoint in place, latest not yet updated": ("rename", "step-00000006", 2, "after"),
    "replacing latest": ("replace", "latest", 2, "before"),
    "pruning an old checkpoint": ("rename", "step-00000002", 3, "after"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_inside_a_save(data, tmp_path, reference, point):
    run = tmp_path / "run"
    killed = train(data, run, FAULT_AT="|".join(map(str, KILL_POINTS[point])))
    assert killed.returncode == -signal.SIGKILL, f"the kill point was not reached: {killed.stdout}{killed.stderr}"
    assert_rerun_loses_nothing(data, run, reference)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment(data, tmp_path, reference, seed):
    run = tmp_path / "run"
    process = start(data, run)
    wait_for_line(process, "training ")  # the imports are done: from here on every moment counts
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    process.kill()
    process.wait()
    assert_rerun_loses_nothing(data, run, reference)


# ----- SIGINT / SIGTERM -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint(data, tmp_path, reference, signum):
    run = tmp_path / "run"
    process = start(data, run, FAULT_SLOW_STEP="0.2")
    wait_for_line(process, f"step 3/{STEPS}")
    process.send_signal(signum)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out + err
    assert f"received {signum.name}: stopping after this step" in err and "Traceback" not in err
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped_at < STEPS and (run / "latest").read_text() == f"step-{stopped_at:08d}\n"
    assert temporaries(run) == []
    out, _ = assert_rerun_loses_nothing(data, run, reference)
    assert f"resumed {run} at step {stopped_at}" in out


def test_a_second_sigint_aborts_at_once(data, tmp_path, reference):
    run = tmp_path / "run"
    process = start(data, run, FAULT_SLOW_STEP="0.5")
    wait_for_line(process, f"step 3/{STEPS}")
    process.send_signal(signal.SIGINT)
    for line in process.stderr:  # wait until the first one is being honoured
        if "received SIGINT" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130 and "error: interrupted" in err and "Traceback" not in err, out + err
    assert_rerun_loses_nothing(data, run, reference)


# ----- corrupted files -------------------------------------------------------------------------------


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    if len(data) < 64:
        path.write_bytes(b"\x00garbage\xff" + bytes(data[::-1]))
    else:
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))


def test_each_file_of_a_run_corrupted_in_turn(data, tmp_path, reference):
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert len(files) >= 14, files
    for name in files:
        run = tmp_path / str(name).replace("/", "_")
        shutil.copytree(reference, run)
        corrupt(run / name)
        _, err = assert_rerun_loses_nothing(data, run, reference)
        if str(name).startswith(f"checkpoints/{FINAL}") or name == Path("latest"):
            assert "warning: " in err and name.name in err, (name, err)


def test_a_run_whose_checkpoints_are_all_damaged_is_refused(data, tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for checkpoint in (run / "checkpoints").iterdir():
        corrupt(checkpoint / "trainer_state.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.lock"}
    status, _, err = rerun(data, run)
    assert status == 1 and "holds checkpoints, but none is intact" in err and "refusing to start again" in err
    assert {p: p.read_bytes() for p in before} == before  # nothing pruned or rewritten


# ----- two trainers ---------------------------------------------------------------------------------


def test_a_second_trainer_on_the_same_directory_is_refused(data, tmp_path, reference):
    run = tmp_path / "run"
    gate = tmp_path / "go on"
    first = start(data, run, FAULT_GATE=f"3:{gate}")  # holds its run before step 4 until told to go on
    wait_for_line(first, f"step 3/{STEPS}")
    second = train(data, run)
    gate.touch()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"run directory {run} is in use by another trainer (pid {first.pid})" in second.stderr
    out, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, out + err
    assert final_weights(run).keys() == final_weights(reference).keys()
    assert all(torch.equal(a, b) for a, b in zip(final_weights(run).values(), final_weights(reference).values()))
    assert temporaries(run) == []
