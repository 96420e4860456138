"""The trainer on several processes: `torchrun --nproc-per-node 2 -m glm_ext train` on gloo (CPU,
float64), against the same command in one process; stopping on SIGTERM and resuming, at the same
and at another world size; and, in one process, gradient accumulation, packed rows, dropout and
the errors of bad settings.

The runs on 2 processes are real torchrun launches (about 10 s each): a DDP run and an FSDP2 run
with 2 micro-batches per process (both compared with one process), a DDP run stopped by SIGTERM to
its process group and run again (compared with the uninterrupted DDP run), an FSDP2 run resuming a
one-process checkpoint and stopped by SIGTERM to one rank, and a run refused because another
trainer holds its directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm_ext import cli
from glm_ext.checkpoint import load_checkpoint
from glm_ext.distributed import DistributedContext
from glm_ext.metrics import read_metrics
from glm_ext.run_dir import RunDirectory
from glm_ext.stopping import StopSignals
from glm_ext.training import TrainConfig, Trainer
from training_testing import make_training_data, quiet, small_config, temporaries, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 180
STEPS = 8
MODEL = ["hidden_size=32", "num_layers=2", "num_heads=4", "max_sequence_length=64"]

# Runs the command of its arguments like `python -m glm_ext`, slowing every step by FAULT_SLOW_STEP
# seconds; each rank writes its pid when it starts and its exit status when it ends into EXIT_DIR.
DRIVER = """
import os, sys, time
from pathlib import Path
out = Path(os.environ["EXIT_DIR"])
rank = os.environ.get("RANK", "0")
(out / f"pid{rank}").write_text(str(os.getpid()))
from glm_ext.training import Trainer
real_step = Trainer.train_step

def step(self, batches):
    time.sleep(float(os.environ.get("FAULT_SLOW_STEP", "0")))
    return real_step(self, batches)

Trainer.train_step = step
from glm_ext.cli import main
status = main(sys.argv[1:])
(out / f"exit{rank}").write_text(str(status))
sys.exit(status)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"), documents=6)


def arguments(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data / "train"), "--tokenizer", str(data / "tokenizer.json"),
            "--eval-data", str(data / "heldout"), "--eval-batches", "1", "--output-dir", str(run),
            "--steps", str(STEPS), "--batch-size", "4", "--max-length", "32", "--warmup", "2", "--log-every", "1",
            "--save-every", "4", "--device", "cpu", "--dtype", "float64", "--model-overrides", *MODEL, *extra]


def torchrun(data: Path, run: Path, *extra: str, driver: Path | None = None, env=None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 -m glm_ext train ...` (or the driver script), with
    its ranks in a process group of their own (as a scheduler starts a job)."""
    program = [str(driver)] if driver else ["-m", "glm_ext"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
               *arguments(data, run, *extra)]
    return subprocess.Popen(command, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def communicate(process: subprocess.Popen) -> tuple[str, str]:
    """The output of a run; a run that hangs (ranks that disagree) is killed with all its ranks."""
    try:
        return process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the run hung for {TIMEOUT} s: {out}{err}") from None


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = communicate(process)
    assert process.returncode == 0, out + err
    return out, err


def one_process(data: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    """The same command in this process (one thread): (status, stdout, stderr)."""
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(arguments(data, run, *extra))
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(RunDirectory(run).checkpoint_dir(step) / "model").state_dict()


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def assert_close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=1e-12, msg=name)


def driver_file(tmp_path: Path) -> tuple[Path, Path]:
    """(the driver script, the directory its ranks report into)."""
    script, reports = tmp_path / "driver.py", tmp_path / "reports"
    script.write_text(DRIVER)
    reports.mkdir()
    return script, reports


def exit_statuses(reports: Path) -> list[str]:
    return [(reports / f"exit{rank}").read_text() for rank in range(2)]


# ---------------------------------------------------------------------------------------------
# The runs that tests compare


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The command in one process: checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("single") / "run"
    status, out, err = one_process(data, run)
    assert status == 0, out + err
    return run


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory):
    """The command on 2 processes with DDP."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    out, _ = finish(torchrun(data, run))
    assert "on 2 processes (ddp)" in out and out.count("held-out loss at step 8") == 1  # rank 0 alone speaks
    return run


@pytest.fixture(scope="module")
def fsdp(data, tmp_path_factory):
    """The command on 2 processes with FSDP2, 2 micro-batches of 1 row per process and step."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    out, _ = finish(torchrun(data, run, "--parallel", "fsdp", "--grad-accum", "2"))
    assert "on 2 processes (fsdp), 2 micro-batches of 1 rows per process" in out
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_like_one(data, single, ddp, fsdp, parallel):
    run = {"ddp": ddp, "fsdp": fsdp}[parallel]
    expected, got = read_metrics(single), read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9), a["step"]
        assert (a["tokens_seen"], a["padding_share"]) == (b["tokens_seen"], pytest.approx(b["padding_share"]))
    assert got[-1]["eval_loss"] == pytest.approx(expected[-1]["eval_loss"], rel=1e-9)
    for step in (4, STEPS):
        assert_close_weights(weights(run, step), weights(single, step))
    optimizer = RunDirectory(run).checkpoint_dir(STEPS) / "optimizer"
    assert sorted(p.name for p in optimizer.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert temporaries(run) == [] and not (run / "train.lock").read_text()


def test_generate_reads_a_distributed_checkpoint(ddp, capsys):
    assert cli.main(["generate", str(ddp), "The [MASK] statement.", "--max-new-tokens", "3"]) == 0
    assert "filled:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Stopping and resuming


def test_sigterm_to_the_process_group_stops_every_rank_and_the_rerun_resumes(data, ddp, tmp_path):
    driver, reports = driver_file(tmp_path)
    run = tmp_path / "run"
    process = torchrun(data, run, driver=driver, env={"EXIT_DIR": str(reports), "FAULT_SLOW_STEP": "0.3"})
    wait_for_line(process, f"step 2/{STEPS}")
    os.killpg(process.pid, signal.SIGTERM)  # torchrun and its ranks, as a scheduler stops a job
    out, err = communicate(process)
    # torchrun reports the signal it got (status 1); every rank finished its step, saved and exited 0.
    assert exit_statuses(reports) == ["0", "0"], out + err
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 2 <= stopped < STEPS and (run / "latest").read_text() == f"step-{stopped:08d}\n"
    assert err.count("received SIGTERM: stopping after this step") == 2
    load_checkpoint(RunDirectory(run).checkpoint_dir(stopped) / "model")
    assert temporaries(run) == []

    out, _ = finish(torchrun(data, run))  # the same command again
    assert f"resumed {run} at step {stopped}" in out and "resuming a checkpoint of" not in out
    for name, value in weights(ddp, STEPS).items():  # exactly the uninterrupted run
        assert torch.equal(weights(run, STEPS)[name], value), name
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(ddp)]


def test_another_world_size_resumes_with_the_same_data_order(data, single, tmp_path):
    # A one-process checkpoint (step 4) resumed by FSDP2 on 2 processes; SIGTERM to one rank stops them all.
    run = tmp_path / "run"
    shutil.copytree(single, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    (run / "latest").write_text("step-00000004\n")
    driver, reports = driver_file(tmp_path)
    process = torchrun(data, run, "--parallel", "fsdp", driver=driver,
                       env={"EXIT_DIR": str(reports), "FAULT_SLOW_STEP": "0.3"})
    lines = wait_for_line(process, f"step 5/{STEPS}")
    assert any("resuming a checkpoint of 1 process(es) on 2" in line and "the data order stays the same" in line
               for line in lines), lines
    os.kill(int((reports / "pid1").read_text()), signal.SIGTERM)
    out, err = finish(process)  # torchrun too: every rank ended with status 0
    assert exit_statuses(reports) == ["0", "0"]
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 5 <= stopped < STEPS and "received SIGTERM" in err
    expected, got = losses(single), losses(run)
    assert sorted(got) == list(range(1, stopped + 1))
    for step in range(5, stopped + 1):  # the same rows, a resharded optimizer: the same steps
        assert got[step] == pytest.approx(expected[step], rel=1e-9), step
    assert weights(run, stopped).keys() == weights(single, 4).keys()


def test_a_second_trainer_on_a_distributed_run_is_refused(data, tmp_path):
    run = tmp_path / "run"
    with RunDirectory(run).lock():  # another trainer at work
        process = torchrun(data, run)
        out, err = communicate(process)
    assert process.returncode != 0
    assert err.count(f"error: run directory {run} is in use by another trainer (pid {os.getpid()})") == 1, err
    assert not (run / "checkpoints").exists()


def test_under_torchrun_a_second_interrupt_does_not_abort():
    # Ctrl-C reaches each rank twice under torchrun (from the terminal, and forwarded by torchrun).
    with StopSignals(abort_on_second_interrupt=False) as stop:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), StopSignals():  # a lone process aborts
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# One process: the step layout, packing, dropout


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    """4 steps of 4 rows, one batch a step."""
    trainer = Trainer(small_config(data, tmp_path_factory.mktemp("plain"), steps=4), log=quiet)
    trainer.fit(evaluate_first=False)
    return trainer


def train(data: Path, run: Path, **settings) -> Trainer:
    trainer = Trainer(small_config(data, run, steps=4, **settings), log=quiet)
    trainer.fit(evaluate_first=False)
    return trainer


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_accumulated_micro_batches_train_like_one_batch(data, plain, tmp_path, grad_accum):
    trainer = train(data, tmp_path, grad_accum=grad_accum)
    assert [e["loss"] for e in trainer.history] == pytest.approx([e["loss"] for e in plain.history], rel=1e-12)
    assert trainer.tokens_seen == plain.tokens_seen
    assert_close_weights(trainer.model.state_dict(), plain.model.state_dict())


def test_packed_rows_train_like_padded_rows(data, plain, tmp_path):
    trainer = train(data, tmp_path, packing=True, log_every=4)
    assert [e["loss"] for e in trainer.history] == pytest.approx([e["loss"] for e in plain.history], rel=1e-10)
    assert_close_weights(trainer.model.state_dict(), plain.model.state_dict())
    (record,), (padded,) = read_metrics(tmp_path), read_metrics(plain.run_dir.path)
    assert record["padding_share"] == 0 and record["tokens_seen"] == plain.tokens_seen
    # The share the same samples have as padded rows: what the padded run logged.
    assert record["padding_share_without_packing"] == pytest.approx(padded["padding_share"], rel=1e-12)
    assert 0.1 < padded["padding_share"] < 1 and "padding_share_without_packing" not in padded


def test_without_dropout_a_step_is_the_plain_loss_and_gradient(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, steps=4), log=quiet)
    assert trainer.model.config.attention_dropout == 0 and trainer.model.backends("cpu").attention == "fused"
    (batch,) = trainer.next_batches()
    model = trainer.model
    model.eval()  # no dropout anywhere: what the model computed before dropout existed
    logits = model(batch.tokens, batch.position_ids, batch.sep)
    chosen = batch.loss_mask.bool()
    expected = torch.nn.functional.cross_entropy(logits[chosen], batch.targets[chosen])
    expected.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    loss = trainer.train_step([batch])  # in train(); its clipping to 1.0 scales the gradients
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    norm = torch.cat([g.flatten() for g in gradients.values()]).norm().item()
    scale = min(1.0, 1.0 / (norm + 1e-6))  # clip_grad_norm_'s coefficient
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name] * scale, rtol=1e-10, atol=1e-14, msg=name)


def test_dropout_trains_differently_and_resumes_exactly(data, plain, tmp_path):
    straight = train(data, tmp_path / "straight", dropout=0.1)
    config = straight.model.config
    assert (config.embedding_dropout, config.attention_dropout, config.output_dropout) == (0.1, 0.1, 0.1)
    assert load_checkpoint(straight.run_dir.checkpoint_dir(4) / "model").config == config
    first = [e["loss"] for e in straight.history]
    assert all(a != pytest.approx(b, rel=1e-6) for a, b in zip(first, (e["loss"] for e in plain.history)))
    straight.model.train()
    assert straight.model.backends("cpu").attention == "sdpa"  # the only backend with attention dropout

    class StopAfter2:
        def requested(self) -> bool:
            return stopped.step >= 2

    stopped = Trainer(small_config(data, tmp_path / "split", steps=4, dropout=0.1), log=quiet)
    assert stopped.fit(evaluate_first=False, stop=StopAfter2())["stopped"]
    resumed = Trainer(small_config(data, tmp_path / "split", steps=4, dropout=0.1), log=quiet)
    assert resumed.resume() and resumed.step == 2
    resumed.fit(evaluate_first=False)
    assert [e["loss"] for e in resumed.history] == first
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


# ---------------------------------------------------------------------------------------------
# Bad settings


def test_bad_settings_are_refused_clearly(data, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="TrainConfig.grad_accum must be at least 1, got 0"):
        small_config(data, tmp_path, grad_accum=0)
    with pytest.raises(ValueError, match=r"TrainConfig.dropout must be a probability in \[0, 1\), got 1.5"):
        small_config(data, tmp_path, dropout=1.5)
    assert one_process(data, tmp_path / "a", "--grad-accum", "0")[0] == 1
    with pytest.raises(ValueError, match="parallel 'fsdp' .* was not started by torchrun: launch it with torchrun"):
        Trainer(small_config(data, tmp_path, parallel="fsdp"), log=quiet)
    status, _, err = one_process(data, tmp_path / "b", "--parallel", "fsdp")
    assert status == 1 and err.startswith("error: parallel 'fsdp'") and err.count("\n") == 1
    assert not (tmp_path / "b").exists()
    # A world size that does not divide the global batch (the context of rank 1 of 3).
    monkeypatch.setattr("glm_ext.training.current_context", lambda device: DistributedContext(1, 1, 3, device))
    with pytest.raises(ValueError, match=r"the global batch of 4 rows \(batch_size\) does not split into "
                                         r"grad_accum=1 x world_size=3 equal micro-batches: choose a multiple of 3"):
        Trainer(small_config(data, tmp_path), log=quiet)


def test_mismatched_resumes_are_refused_clearly(data, plain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(plain.run_dir.path, run)
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 8\); batch_size is the global batch .* grad_accum"):
        Trainer(small_config(data, run, steps=4, batch_size=8), log=quiet).resume()
    with pytest.raises(ValueError, match=r"holds another model than this run builds \(embedding_dropout 0.0 -> 0.1, "
                                         r"attention_dropout 0.0 -> 0.1, output_dropout 0.0 -> 0.1\)"):
        Trainer(small_config(data, run, steps=4, dropout=0.1), log=quiet).resume()
    # How the rows are shared out, packed and computed may change: the data and the model stay.
    resumed = Trainer(small_config(data, run, steps=6, grad_accum=2, packing=True, attention_backend="sdpa"), log=quiet)
    assert resumed.resume() and resumed.step == 4
    assert TrainConfig.from_dict(resumed.state_dict()["config"]).grad_accum == 2
