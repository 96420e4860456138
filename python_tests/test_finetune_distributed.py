"""Finetuning on several processes: `torchrun --nproc-per-node 2 -m glm_ext finetune cloze` (gloo, CPU,
float64, DDP with 2 micro-batches per process) trains the weights, and reports the dev metrics, of
the same command in one process: each rank takes its share of every step's examples (one torchrun
launch, about 15 s)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from glm_ext import cli
from glm_ext.checkpoint import load_checkpoint, save_checkpoint
from glm_ext.metrics import read_metrics
from glm_ext.run_dir import RunDirectory
from tasks_testing import random_model, small_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 180


def arguments(model: Path, data: Path, run: Path) -> list[str]:
    return ["finetune", "cloze", str(model), "--task", "custom", "--pattern", "{text} It was [MASK].",
            "--verbalizer", "good=great", "--verbalizer", "bad=terrible", "--train", str(data), "--dev", str(data),
            "--output-dir", str(run), "--steps", "4", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3",
            "--eval-every", "2", "--log-every", "1", "--dtype", "float64", "--device", "cpu",
            "--dropout", "0"]  # dropout masks are drawn per process


def test_two_processes_train_as_one(tmp_path):
    tokenizer = small_tokenizer()
    model_dir = tmp_path / "model"
    save_checkpoint(random_model(tokenizer, scale=0.05), model_dir, tokenizer=tokenizer)
    texts = ["The while statement is used for repeated execution", "The if statement is used",
             "A break statement terminates the loop", "A string tuple or list", "It was true"]
    records = [{"text": text, "label": "good" if i % 3 else "bad"} for i, text in enumerate(texts * 3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(arguments(model_dir, data, tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "glm_ext",
               *arguments(model_dir, data, tmp_path / "ddp")]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the run hung for {TIMEOUT} s") from None
    assert process.returncode == 0, out + err
    assert "on 2 processes (ddp), 2 micro-batches of 2 rows per process" in out
    assert out.count("held-out loss at step 4") == 1  # rank 0 alone speaks

    weights = [load_checkpoint(RunDirectory(tmp_path / name).latest_checkpoint() / "model").state_dict()
               for name in ("single", "ddp")]
    for name, value in weights[0].items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(weights[1][name], value, rtol=1e-6, atol=1e-12, msg=name)
    metrics = [{r["step"]: r.get("dev_accuracy") for r in read_metrics(tmp_path / name)} for name in ("single", "ddp")]
    assert metrics[0] == metrics[1] and metrics[0][4] is not None
