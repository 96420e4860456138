"""glm_ext.training (the trainer) and the `glm-ext train / generate / demo` commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from glm_ext import cli, progress
from glm_ext.checkpoint import is_checkpoint, load_checkpoint, save_authors_checkpoint
from glm_ext.cli.config_options import add_dataclass_options, option_values
from glm_ext.data import BlankInfillingConfig
from glm_ext.files import write_manifest
from glm_ext.metrics import read_metrics
from glm_ext.model import PRESETS, GLMConfig, GLMModel
from glm_ext.training import (
    OBJECTIVE_MIXES,
    TrainConfig,
    Trainer,
    config_field,
    latest_checkpoint,
    lr_at,
    resolve_device,
)

import training_testing
from training_testing import SMALL_MODEL, make_training_data, quiet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and training / held-out token files from a few help() topics."""
    return make_training_data(tmp_path_factory.mktemp("data"))


def small_config(data: Path, output_dir: Path, **overrides) -> TrainConfig:
    """The shared small run, 20 steps logged every 5, in the default dtype."""
    fields = dict(steps=20, warmup=3, log_every=5, dtype="auto")
    return training_testing.small_config(data, output_dir, **{**fields, **overrides})


@pytest.fixture(autouse=True)
def plain_progress(monkeypatch):
    """Progress as plain lines through the trainer's ``log``, wherever pytest's output goes."""
    monkeypatch.setattr(progress, "progress_mode", lambda stream=None: "lines")


class Crash(Exception):
    pass


def crash_at(prefix: str):
    """A ``log`` that raises when the line starting with ``prefix`` comes (a crash at that moment)."""

    def log(line: str) -> None:
        if line.startswith(prefix):
            raise Crash(line)

    return log


def row_lengths(batches) -> int:
    """The real tokens of padded batches: each row's Part A (``sep``) and Part B (its loss tokens)."""
    return sum(int(batch.sep.sum()) + int(batch.loss_mask.sum()) for batch in batches)


def window_means(history: list[dict], ends: list[int]) -> list[float]:
    """The mean training loss of each logging window (the steps after the previous end up to each end)."""
    means, start = [], 0
    for end in ends:
        losses = [e["loss"] for e in history if start < e["step"] <= end]
        means.append(sum(losses) / len(losses))
        start = end
    return means


def test_loss_decreases(data, tmp_path):
    lines = []
    trainer = Trainer(small_config(data, tmp_path), log=lines.append)
    summary = trainer.fit()
    losses = [entry["loss"] for entry in trainer.history]
    assert len(losses) == 20 and [e["step"] for e in trainer.history] == list(range(1, 21))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.5
    assert summary["eval_loss_before"] == pytest.approx(math.log(trainer.model.config.vocab_size), rel=0.1)
    assert summary["eval_accuracy"] > summary["eval_accuracy_before"]
    assert any("tokens/s" in line for line in lines) and any("held-out loss" in line for line in lines)
    assert sum("held-out loss at step 20" in line for line in lines) == 1
    assert summary["step"] == 20 and latest_checkpoint(tmp_path) == summary["checkpoint"]
    assert is_checkpoint(summary["checkpoint"] / "model")
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "train_config.json").is_file()


def test_resume_is_exact(data, tmp_path):
    config = dict(dtype="float64", steps=6, warmup=2, log_every=1)
    straight = Trainer(small_config(data, tmp_path / "straight", **config), log=quiet)
    straight.fit(evaluate_first=False)

    first = Trainer(small_config(data, tmp_path / "split", **config), log=quiet)
    for _ in range(3):
        first.train_step(first.next_batches())
    first.save()
    second = Trainer(small_config(data, tmp_path / "split", **config), log=quiet)
    assert second.resume() and second.step == 3
    second.fit(evaluate_first=False)

    assert [e["loss"] for e in second.history] == [e["loss"] for e in straight.history]
    assert [e["lr"] for e in second.history] == [e["lr"] for e in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert a.dtype == torch.float64 and torch.equal(a, b), name
    assert second.stream.state_dict() == straight.stream.state_dict()
    saved = load_checkpoint(latest_checkpoint(tmp_path / "split") / "model")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), straight.model.state_dict().values()))


def test_a_checkpoint_of_an_older_layout_resumes_exactly(data, tmp_path):
    # Before several processes, trainer_state.pt held the optimizer (and RNG states); no optimizer/.
    config = dict(dtype="float64", steps=4, warmup=2)
    straight = Trainer(small_config(data, tmp_path / "straight", **config), log=quiet)
    straight.fit(evaluate_first=False)
    old = Trainer(small_config(data, tmp_path / "old", **config), log=quiet)
    for _ in range(2):
        old.train_step(old.next_batches())
    path = old.save()
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    state.update(optimizer=old.optimizer.state_dict(), rng={"torch": torch.get_rng_state()})
    torch.save(state, path / "trainer_state.pt")
    shutil.rmtree(path / "optimizer")
    write_manifest(path, ["trainer_state.pt"])
    resumed = Trainer(small_config(data, tmp_path / "old", **config), log=quiet)
    assert resumed.resume() and resumed.step == 2
    resumed.fit(evaluate_first=False)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_resume_refuses_other_data_settings(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, steps=2), log=quiet)
    trainer.fit(evaluate_first=False)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        Trainer(small_config(data, tmp_path, steps=2, seed=1), log=quiet).resume()


def test_metrics_have_one_line_per_logged_step_across_a_crash_and_resume(data, tmp_path):
    settings = dict(dtype="float64", steps=8, warmup=2, log_every=2, save_every=4)
    straight = Trainer(small_config(data, tmp_path / "straight", **settings), log=quiet)
    straight.fit(evaluate_first=False)
    expected = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in expected] == [2, 4, 6, 8]
    assert [r["loss"] for r in expected] == pytest.approx(window_means(straight.history, [2, 4, 6, 8]), rel=1e-12)
    replay = Trainer(small_config(data, tmp_path / "replay", **settings), log=quiet)
    real = [row_lengths(replay.next_batches()) for _ in range(8)]  # the steps' real tokens (no padding)
    assert [r["tokens_seen"] for r in expected] == [sum(real[:s]) for s in (2, 4, 6, 8)]
    assert [r["padding_share"] for r in expected] == pytest.approx(
        [1 - (real[s - 2] + real[s - 1]) / (2 * 4 * 48) for s in (2, 4, 6, 8)], rel=1e-12)
    assert [r["lr"] for r in expected] == pytest.approx([straight.lr_schedule(s - 1) for s in (2, 4, 6, 8)])
    for record in expected:
        assert 0 < record["padding_share"] < 1 and record["grad_norm"] > 0 and record["tokens_per_second"] > 0
        assert record["wall_time"] > 1e9
    assert "eval_loss" not in expected[0] and 0 <= expected[-1]["eval_accuracy"] <= 1
    assert expected[-1]["eval_loss"] == pytest.approx(straight.evaluate()["eval_loss"], rel=1e-12)

    # A run that crashes after writing the metrics of step 6, before its next checkpoint (step 8) ...
    crashed = Trainer(small_config(data, tmp_path / "split", **settings), log=crash_at("step 6/8"))
    with pytest.raises(Crash):
        crashed.fit(evaluate_first=False)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [2, 4, 6]
    assert latest_checkpoint(tmp_path / "split").name == "step-00000004"
    # ... resumes at step 4: the file ends with each logged step once, as the uninterrupted run's.
    resumed = Trainer(small_config(data, tmp_path / "split", **settings), log=quiet)
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    got = read_metrics(tmp_path / "split")
    assert [r["step"] for r in got] == [2, 4, 6, 8]
    for a, b in zip(got, expected):
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "padding_share", "eval_loss", "eval_accuracy"):
            assert a.get(key) == b.get(key), (a["step"], key)


def test_tensorboard_event_files(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(small_config(data, tmp_path, steps=4, log_every=2, tensorboard=True), log=quiet)
    trainer.fit(evaluate_first=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = read_metrics(tmp_path)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(4, pytest.approx(metrics[-1]["eval_accuracy"]))]


def test_other_steps_on_resume_keep_the_schedule(data, tmp_path):
    Trainer(small_config(data, tmp_path, steps=4, warmup=2), log=quiet).fit(evaluate_first=False)
    lines = []
    longer = Trainer(small_config(data, tmp_path, steps=7, warmup=2), log=lines.append)
    assert longer.resume() and longer.step == 4
    assert lines == ["steps changed from 4 to 7: the learning-rate schedule stays the checkpoint's (warmup 2, "
                     "cosine to 3.00e-04 at step 4); steps 5-7 run at the minimum learning rate 3.00e-04"]
    longer.fit()
    schedule = dict(lr=3e-3, warmup=2, total_steps=4, min_lr=3e-4)  # the 4-step run's
    assert [e["lr"] for e in longer.history] == pytest.approx([lr_at(s, **schedule) for s in range(7)])
    assert json.loads((tmp_path / "train_config.json").read_text())["lr_schedule_steps"] == 4

    shorter = Trainer(small_config(data, tmp_path, steps=6, warmup=2), log=lines.append)
    assert shorter.resume() and shorter.config.schedule_steps == 4  # pinned in train_config.json's run
    with pytest.raises(ValueError, match=r"schedule would change \(lr: 0.003 -> 0.01\)"):
        Trainer(small_config(data, tmp_path, steps=9, warmup=2, lr=1e-2), log=quiet).resume()
    with pytest.raises(ValueError, match=r"lr_schedule_steps: 4 -> 9"):
        Trainer(small_config(data, tmp_path, steps=9, warmup=2, lr_schedule_steps=9), log=quiet).resume()


def test_lr_schedule():
    kwargs = dict(lr=1.0, warmup=10, total_steps=110, min_lr=0.1)
    assert lr_at(0, **kwargs) == pytest.approx(0.1)
    assert lr_at(4, **kwargs) == pytest.approx(0.5)
    assert lr_at(9, **kwargs) == pytest.approx(1.0)
    assert lr_at(10, **kwargs) == pytest.approx(1.0)
    assert lr_at(60, **kwargs) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(35, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kwargs) == pytest.approx(0.1) and lr_at(500, **kwargs) == pytest.approx(0.1)
    assert lr_at(0, lr=2.0, warmup=0, total_steps=10, min_lr=0.0) == pytest.approx(2.0)


def test_train_step_uses_the_schedule_and_decays_only_matrices(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, lr=1e-2, warmup=4, steps=10), log=quiet)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(p.ndim == 2 and "layernorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.final_layernorm.weight",
                                                          "transformer.layers.0.attention.dense.bias"}
    real = 0
    for step in range(3):
        batches = trainer.next_batches()
        real += row_lengths(batches)
        trainer.train_step(batches)
        assert decay["lr"] == pytest.approx(1e-2 * (step + 1) / 4)
    trainer.log_metrics()
    assert trainer.step == 3 and trainer.tokens_seen == real and 0 < real < 3 * 4 * 48


def test_checkpoints_are_atomic(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, steps=10), log=quiet)
    trainer.train_step(trainer.next_batches())
    good = trainer.save()
    trainer.train_step(trainer.next_batches())

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # the trainer state fails, after the weights and the optimizer
        if Path(getattr(f, "name", "")).name != "trainer_state.pt":
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001"]  # no partial or temporary dirs
    assert latest_checkpoint(tmp_path) == good
    resumed = Trainer(small_config(data, tmp_path, steps=10), log=quiet)
    assert resumed.resume() and resumed.step == 1


def test_old_checkpoints_are_pruned(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, steps=6, save_every=2, keep_checkpoints=2), log=quiet)
    trainer.fit(evaluate_first=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(tmp_path).name == "step-00000006"


def test_config_checks(data, tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="dtype"):
        small_config(data, tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="steps"):
        small_config(data, tmp_path, steps=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        Trainer(small_config(data, tmp_path, max_length=80), log=quiet)
    config = small_config(data, tmp_path)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---------------------------------------------------------------------------------------------
# The commands


def train_args(data: Path, run: Path) -> list[str]:
    return ["train", "--data", str(data / "train"), "--tokenizer", str(data / "tokenizer.json"),
            "--eval-data", str(data / "heldout"), "--output-dir", str(run), "--batch-size", "2",
            "--max-length", "64", "--device", "cpu"]


def test_train_and_generate_commands(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*train_args(data, run), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out loss at step 2") == 1 and (run / "loss.png").is_file() and "loss.png" in out
    assert [r["step"] for r in read_metrics(run)] == [2]
    assert cli.main([*train_args(data, run), "--steps", "2"]) == 0  # nothing left to do
    out = capsys.readouterr().out
    assert f"{run} holds a complete run: step 2 of 2; nothing to train" in out
    assert "held-out loss" not in out and "training" not in out
    assert cli.main([*train_args(data, run), "--steps", "3"]) == 0  # resumes and goes on
    out = capsys.readouterr().out
    assert "resumed" in out and "step 3/3" in out and "steps changed from 2 to 3" in out
    assert [r["step"] for r in read_metrics(run)] == [2, 3]
    assert cli.main(["generate", str(run), "The [MASK] statement.", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "context: The [MASK] statement." in out and "filled:" in out and "blank 1:" in out


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def test_train_options_are_the_train_config_fields():
    train = subcommand_parser("train")
    options = {a.dest: a for a in train._actions if a.option_strings and a.dest not in ("help", "config")}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(options) == set(fields)
    for name, field in fields.items():
        assert "--" + name.replace("_", "-") in options[name].option_strings
        assert field.metadata["help"] and options[name].help.startswith(field.metadata["help"].replace("%", "%%"))
    assert "--data" in options["train_data"].option_strings
    assert options["preset"].choices == tuple(PRESETS) and options["dtype"].choices == ("auto", "float32", "float64",
                                                                                          "bfloat16")
    # Only the flags given reach the configuration: every other value is the dataclass's default.
    assert option_values(train.parse_args(["--data", "d", "--tokenizer", "t"]), TrainConfig) == {
        "train_data": "d", "tokenizer": "t"}
    assert "(default: 1000)" in options["steps"].help and "(default: 0.9 0.95)" in options["betas"].help


def test_every_train_config_field_is_reachable_from_the_command_line():
    train = subcommand_parser("train")

    def config(*argv: str) -> TrainConfig:
        return TrainConfig.from_dict(option_values(train.parse_args(["--data", "d", "--tokenizer", "t", *argv]),
                                                   TrainConfig))

    got = config("--objectives", "glm-10b", "mask_ratio=0.2", "--betas", "0.8", "0.9", "--min-lr-ratio", "0.2",
                 "--keep-checkpoints", "3", "--activation-checkpointing", "--model-overrides", "num_layers=2",
                 "hidden_size=64", "--position-encoding", "learned_2d", "--preset", "base", "--dtype", "float64",
                 "--tensorboard", "--lr-schedule-steps", "500", "--eval-data", "e")
    assert got.objectives == dataclasses.replace(BlankInfillingConfig.glm_10b(), mask_ratio=0.2)
    assert (got.betas, got.min_lr_ratio, got.keep_checkpoints, got.activation_checkpointing) == ((0.8, 0.9), 0.2, 3, True)
    assert got.model_overrides == {"num_layers": 2, "hidden_size": 64}
    assert (got.position_encoding, got.preset, got.dtype, got.tensorboard) == ("learned_2d", "base", "float64", True)
    assert (got.lr_schedule_steps, got.eval_data) == (500, "e")
    assert config("--objectives", "objective_probs=0.5,0.3,0.2").objectives.objective_probs == (0.5, 0.3, 0.2)
    assert config("--compile", "--no-compile").compile is False
    with pytest.raises(ValueError, match="at most one of glm-base, glm-10b"):
        config("--objectives", "glm-20b")
    with pytest.raises(ValueError, match="unknown field 'ratio'; known: .*mask_ratio"):
        config("--objectives", "ratio=0.2")
    with pytest.raises(SystemExit):
        config("--preset", "huge")


def test_a_new_train_config_field_gets_its_option_without_a_cli_edit():
    @dataclasses.dataclass
    class Extended(TrainConfig):
        attention_backend: Literal["sdpa", "fused"] = config_field("sdpa", help="attention kernels")
        micro_batches: int = config_field(1, help="micro-batches per step")

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, Extended)
    args = parser.parse_args(["--data", "d", "--attention-backend", "fused", "--micro-batches", "4"])
    assert option_values(args, Extended) == {"train_data": "d", "attention_backend": "fused", "micro_batches": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])


def test_train_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert re.search(rf"^  {name} +{preset['num_layers']} layers, hidden +{preset['hidden_size']}", out, re.M)
    assert "glm-10b" in out and "--min-lr-ratio" in out and "--keep-checkpoints" in out


def test_a_config_file_with_flags_overriding_it(data, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "train_data": str(data / "train"), "tokenizer": str(data / "tokenizer.json"), "output_dir": str(tmp_path / "run"),
        "model_overrides": SMALL_MODEL, "objectives": "glm-10b", "steps": 50, "batch_size": 2, "max_length": 48,
        "device": "cpu",
    }))
    assert cli.main(["train", "--config", str(config_file), "--steps", "2", "--lr", "1e-4"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["steps"], saved["lr"], saved["batch_size"]) == (2, 1e-4, 2)
    assert TrainConfig.from_dict(saved).objectives == OBJECTIVE_MIXES["glm-10b"]
    assert cli.main(["train", "--config", str(tmp_path / "nothing.json")]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 2, "stpes": 3}')
    assert cli.main(["train", "--config", str(bad), "--data", str(data / "train")]) == 1
    assert "unknown TrainConfig field(s): stpes" in capsys.readouterr().err
    assert cli.main(["train", "--steps", "2"]) == 2
    assert "train needs train_data" in capsys.readouterr().err


def test_convert_a_preset_with_another_vocabulary(tmp_path, capsys):
    config = dataclasses.replace(GLMConfig.preset("tiny"), vocab_size=1024)
    model = GLMModel(config)
    save_authors_checkpoint(model, tmp_path / "a.pt")
    assert cli.main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "x"), "--preset", "tiny"]) == 1
    assert "mis-shaped" in capsys.readouterr().err  # the preset's 512 rows are not the checkpoint's 1024
    assert cli.main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "ours"), "--preset", "tiny",
                     "--vocab-size", "1024"]) == 0
    loaded = load_checkpoint(tmp_path / "ours")
    assert loaded.config == config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert cli.main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "y"), "--config", str(tmp_path / "config.json"),
                     "--vocab-size", "1024"]) == 2
    assert "--vocab-size goes with --preset" in capsys.readouterr().err


def test_demo_smoke_and_train_continues_its_run(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    args = ["demo", "--output-dir", str(out_dir), "--steps", "3", "--vocab-size", "300", "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for expected in ("held-out loss at step 0", "held-out loss at step 3", "filled:", "demo finished"):
        assert expected in out
    assert re.search(r"^exact match: \d+\.\d% \(\d+ of 200\); most-frequent-word baseline \(always '[a-z]+'\): "
                     r"\d+\.\d%$", out, re.M)
    checkpoint = latest_checkpoint(out_dir / "run")
    assert checkpoint.name == "step-00000003" and is_checkpoint(checkpoint / "model")
    assert (out_dir / "run" / "loss.png").is_file()
    # A second run reuses the tokenizer, the token files and the finished training run.
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "holds a complete run: step 3 of 3" in out and "step 1/3" not in out
    # The demo's run has the default position encoding of glm-ext train: train continues it.
    saved = json.loads((out_dir / "run" / "train_config.json").read_text())
    assert saved["position_encoding"] == TrainConfig.__dataclass_fields__["position_encoding"].default == "rotary_2d"
    assert cli.main(["train", "--config", str(out_dir / "run" / "train_config.json"), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 3" in out and "step 4/4" in out
