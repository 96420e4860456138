"""glm_ext.run_dir and the trainer's use of it: one trainer per directory, leftovers of crashes
removed, resuming from the newest intact checkpoint, stopping on signals, early checks of the
output directory and the device, and the tokenizer a run was trained with (in-process; the same
faults on real `glm-ext train` processes are in test_faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from glm_ext import cli
from glm_ext.checkpoint import load_checkpoint
from glm_ext.devices import resolve_device
from glm_ext.files import CorruptFileError
from glm_ext.run_dir import ResumeWarning, RunDirectory, RunDirectoryInUse, load_model
from glm_ext.stopping import StopSignals
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import Trainer
from training_testing import make_training_data, quiet, small_config, temporaries


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A run of 6 steps saved every 2 steps (checkpoints 4 and 6 kept); tests copy it."""
    run = tmp_path_factory.mktemp("finished")
    Trainer(small_config(data, run, save_every=2), log=quiet).fit(evaluate_first=False)
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(copy)], check=True)
    return copy


def weights(path):
    """(step, weights) of the checkpoint directory ``path``."""
    step = torch.load(path / "trainer_state.pt", weights_only=True)["step"]
    return step, load_checkpoint(path / "model").state_dict()


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def resumed_step(data, run, **overrides) -> int:
    trainer = Trainer(small_config(data, run, save_every=2, **overrides), log=quiet)
    assert trainer.resume()
    return trainer.step


# ----- one trainer at a time --------------------------------------------------------------------


def test_a_second_lock_is_refused_naming_the_directory_and_pid(tmp_path):
    first, second = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run")
    with first.lock():
        with first.lock():  # re-entrant on the same object
            pass
        with pytest.raises(RunDirectoryInUse, match=rf"run directory {tmp_path / 'run'} is in use by another "
                                                    rf"trainer \(pid {os.getpid()}\)"):
            with second.lock():
                pass
    with second.lock():  # released
        pass


def test_a_trainer_is_refused_while_another_process_holds_the_run(data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from glm_ext.run_dir import RunDirectory\n"
         "with RunDirectory(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        trainer = Trainer(small_config(data, run), log=quiet)
        with pytest.raises(RunDirectoryInUse, match=rf"in use by another trainer \(pid {holder.pid}\)"):
            trainer.fit()
        assert trainer.step == 0
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock with the process
        holder.wait()
    assert Trainer(small_config(data, run, steps=1), log=quiet).fit(evaluate_first=False)["step"] == 1


def test_stale_temporaries_are_removed_when_a_trainer_starts(data, run):
    leftovers = [
        "checkpoints/.step-00000008.k2j4h5g6.tmp/model/model.safetensors",  # a half-written checkpoint
        "checkpoints/.step-00000004.old-1a2b3c4d.tmp/trainer_state.pt",  # retired by a replacement
        ".latest.abc123.tmp", ".train_config.json.x1y2z3.tmp", ".tokenizer.json.qwerty.tmp",
    ]
    foreign = ["notes.txt", ".notes.txt.abc.tmp", ".hidden", "checkpoints/.other.abc.tmp", "checkpoints/readme"]
    for name in leftovers + foreign:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert resumed_step(data, run) == 6
    assert temporaries(run) == [".notes.txt.abc.tmp", "checkpoints/.other.abc.tmp"]
    assert all((run / name).exists() for name in foreign)


# ----- resuming from the newest intact checkpoint -------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "directory", "garbage", "names a missing checkpoint"])
def test_a_broken_latest_resumes_from_the_newest_checkpoint(data, run, damage):
    latest = run / "latest"
    latest.unlink()
    if damage == "directory":
        latest.mkdir()
    elif damage == "garbage":
        latest.write_bytes(b"\x00\xffstep")
    elif damage == "names a missing checkpoint":
        latest.write_text("step-00000010\n")
    with pytest.warns(ResumeWarning, match="latest is missing or damaged; resuming from the newest intact"):
        assert resumed_step(data, run) == 6
    assert latest.read_text() == "step-00000006\n"  # repointed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


@pytest.mark.parametrize("name", ["trainer_state.pt", "manifest.json", "model/model.safetensors",
                                  "model/config.json", "model/manifest.json"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(data, run, name):
    flip_byte(run / "checkpoints/step-00000006" / name)
    with pytest.warns(ResumeWarning, match=f"skipping checkpoint .*step-00000006: .*step-00000006/{name}"):
        assert resumed_step(data, run) == 4
    assert (run / "latest").read_text() == "step-00000004\n"


def test_a_resumed_fallback_ends_with_the_uninterrupted_weights(data, run, finished):
    flip_byte(run / "checkpoints/step-00000006/model/model.safetensors")
    trainer = Trainer(small_config(data, run, save_every=2), log=quiet)
    with pytest.warns(ResumeWarning):
        assert trainer.resume()
    trainer.fit(evaluate_first=False)
    step, resumed = weights(run / "checkpoints/step-00000006")
    assert step == 6
    _, straight = weights(finished / "checkpoints/step-00000006")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_only_damaged_checkpoints_are_refused_not_restarted(data, run):
    flip_byte(run / "checkpoints/step-00000006/trainer_state.pt")
    (run / "checkpoints/step-00000004/model/config.json").write_text("{}")
    (run / "latest").unlink()
    with pytest.warns(ResumeWarning), pytest.raises(ValueError, match="holds checkpoints, but none is intact .*"
                                                                       "refusing to start again from step 0"):
        Trainer(small_config(data, run, save_every=2), log=quiet).resume()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_a_garbage_trainer_state_never_suggests_unpickling(data, run):
    for name in ("manifest.json", "trainer_state.pt"):
        (run / "checkpoints/step-00000006" / name).unlink()
    (run / "checkpoints/step-00000006/trainer_state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CorruptFileError) as info:
        RunDirectory(run).load_checkpoint(run / "checkpoints/step-00000006")
    assert "trainer_state.pt is damaged or not a glm_ext trainer state" in str(info.value)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


# ----- stopping on request -------------------------------------------------------------------------


def test_stop_signals_record_the_request_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_interrupt_aborts_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


class StopAfter:
    """A stop condition of the kind a distributed run plugs in: only ``requested()`` is asked."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.step = trainer, step

    def requested(self) -> bool:
        return self.trainer.step >= self.step


def test_a_stopped_run_saves_the_step_it_reached_and_resumes_exactly(data, tmp_path, finished):
    trainer = Trainer(small_config(data, tmp_path, save_every=2), log=quiet)
    summary = trainer.fit(evaluate_first=False, stop=StopAfter(trainer, 3))
    assert summary["stopped"] and summary["step"] == 3 and "eval_loss" not in summary
    assert summary["checkpoint"] == tmp_path / "checkpoints/step-00000003"
    assert (tmp_path / "latest").read_text() == "step-00000003\n"
    again = Trainer(small_config(data, tmp_path, save_every=2), log=quiet)
    assert again.resume() and again.step == 3
    again.fit(evaluate_first=False)
    _, resumed = weights(tmp_path / "checkpoints/step-00000006")
    _, straight = weights(finished / "checkpoints/step-00000006")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_fit_stops_on_sigterm(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, steps=50), log=quiet)
    real_step = trainer.train_step

    def step_then_signal(batch):
        loss = real_step(batch)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    trainer.train_step = step_then_signal
    summary = trainer.fit(evaluate_first=False)
    assert summary["stopped"] and summary["step"] == 2
    assert RunDirectory(tmp_path).latest_checkpoint().name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----- early checks -------------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_refused_before_training(data, tmp_path):
    (tmp_path / "file").write_text("x")
    for output in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(NotADirectoryError, match=f"run directory {output}: {tmp_path / 'file'} exists and is "
                                                     "not a directory"):
            Trainer(small_config(data, output), log=quiet)


def test_devices_are_resolved_with_clear_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match=r"device 'bogus' \(--device\) is not a device: expected auto, cpu, cuda"):
        resolve_device("bogus")
    with pytest.raises(ValueError, match=r"device 'mps' \(--device\): glm_ext runs on cpu or cuda"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:1' \(--device\): no CUDA device is visible"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("device", ["bogus", "cuda:7"])
def test_train_with_an_unusable_device_is_one_line(data, tmp_path, capsys, device):
    args = ["train", "--data", str(data / "train"), "--tokenizer", str(data / "tokenizer.json"),
            "--output-dir", str(tmp_path / "run"), "--steps", "1", "--device", device]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: device {device!r} (--device)") and err.count("\n") == 1


# ----- the tokenizer a run was trained with ----------------------------------------------------------


def test_generate_refuses_another_tokenizer_of_the_same_size(data, run, tmp_path, capsys):
    texts = [text[::-1] for text in (data / "train.jsonl").read_text().splitlines()]
    other = GLMTokenizer.train(texts, 300)
    assert other.vocab_size == GLMTokenizer.from_file(data / "tokenizer.json").vocab_size
    other.save(tmp_path / "other.json")
    args = ["generate", str(run), "The [MASK] statement.", "--max-new-tokens", "2"]
    assert cli.main([*args, "--tokenizer", str(tmp_path / "other.json")]) == 1
    err = capsys.readouterr().err
    assert "other.json is not the one" in err and "was trained with" in err
    assert cli.main([*args, "--tokenizer", str(data / "tokenizer.json")]) == 0


def test_load_model_takes_the_tokenizer_a_model_carries_or_the_one_given(data, run, tmp_path, capsys):
    """What generate, evaluate and finetune load: a run (its newest checkpoint and tokenizer.json), a
    checkpoints/step-N directory, a checkpoint directory with or without a tokenizer.json of its own."""
    newest = RunDirectory(run).latest_checkpoint()
    expected = load_checkpoint(newest / "model").state_dict()
    tokenizer_file = run / "tokenizer.json"
    for source in (run, newest):
        loaded = load_model(source)
        assert loaded.model_dir == newest / "model" and loaded.tokenizer_path == tokenizer_file
        assert not loaded.model.training and loaded.tokenizer.sha256 == GLMTokenizer.from_file(tokenizer_file).sha256
        assert all(torch.equal(value, expected[key]) for key, value in loaded.model.state_dict().items())

    bare = tmp_path / "bare"
    subprocess.run(["cp", "-a", str(newest / "model"), str(bare)], check=True)
    with pytest.raises(FileNotFoundError, match="checkpoint without a tokenizer.json: pass --tokenizer"):
        load_model(bare)
    assert load_model(bare, tokenizer_file).tokenizer_path == tokenizer_file
    args = ["generate", str(bare), "The [MASK] statement.", "--max-new-tokens", "2"]
    assert cli.main(args) == 1 and "pass --tokenizer" in capsys.readouterr().err
    subprocess.run(["cp", str(tokenizer_file), str(bare / "tokenizer.json")], check=True)
    assert load_model(bare).tokenizer_path == bare / "tokenizer.json"
    assert cli.main(args) == 0  # the checkpoint carries its tokenizer: no --tokenizer


def test_a_garbage_tokenizer_is_one_line(data, run, capsys):
    (run / "tokenizer.json").write_text("{ not a tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["generate", str(run), "The [MASK] statement."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer file") and "is not JSON" in err and err.count("\n") == 1
