"""glm_ext.training (the trainer) and the `glm-ext train / generate / demo` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from glm_ext import cli, demo
from glm_ext.checkpoint import is_checkpoint, load_checkpoint
from glm_ext.data import default_corpus, prepare_token_file
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig, Trainer, latest_checkpoint, lr_at, resolve_device

SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=4, max_sequence_length=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and training / held-out token files from a few help() topics."""
    root = tmp_path_factory.mktemp("data")
    documents = default_corpus()[:12]
    for name, docs in (("train", documents[:10]), ("heldout", documents[10:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = GLMTokenizer.train(documents[:10], 300)
    tokenizer.save(root / "tokenizer.json")
    for name in ("train", "heldout"):
        prepare_token_file([root / f"{name}.jsonl"], tokenizer, root / name)
    return root


def small_config(data: Path, output_dir: Path, **overrides) -> TrainConfig:
    fields = dict(
        train_data=str(data / "train"), eval_data=str(data / "heldout"), tokenizer=str(data / "tokenizer.json"),
        output_dir=str(output_dir), model_overrides=SMALL_MODEL, max_length=48, batch_size=4, steps=20,
        warmup=3, lr=3e-3, log_every=5, eval_batches=2, device="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


def quiet(_line: str) -> None:
    pass


def test_loss_decreases(data, tmp_path):
    lines = []
    trainer = Trainer(small_config(data, tmp_path), log=lines.append)
    summary = trainer.fit()
    losses = [entry["loss"] for entry in trainer.history]
    assert len(losses) == 20 and [e["step"] for e in trainer.history] == list(range(1, 21))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.5
    assert summary["eval_loss_before"] == pytest.approx(math.log(trainer.model.config.vocab_size), rel=0.1)
    assert any("tokens/s" in line for line in lines) and any("held-out loss" in line for line in lines)
    assert summary["step"] == 20 and latest_checkpoint(tmp_path) == summary["checkpoint"]
    assert is_checkpoint(summary["checkpoint"] / "model")
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "train_config.json").is_file()


def test_resume_is_exact(data, tmp_path):
    config = dict(dtype="float64", steps=6, warmup=2, log_every=1)
    straight = Trainer(small_config(data, tmp_path / "straight", **config), log=quiet)
    straight.fit(evaluate_first=False)

    first = Trainer(small_config(data, tmp_path / "split", **config), log=quiet)
    for _ in range(3):
        first.train_step(first.next_batch())
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


def test_resume_refuses_other_data_settings(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, steps=2), log=quiet)
    trainer.fit(evaluate_first=False)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        Trainer(small_config(data, tmp_path, steps=2, seed=1), log=quiet).resume()


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
    for step in range(3):
        trainer.train_step(trainer.next_batch())
        assert decay["lr"] == pytest.approx(1e-2 * (step + 1) / 4)
    assert trainer.step == 3 and trainer.tokens_seen == 3 * 4 * 48


def test_checkpoints_are_atomic(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, steps=10), log=quiet)
    trainer.train_step(trainer.next_batch())
    good = trainer.save()
    trainer.train_step(trainer.next_batch())

    def failing_save(obj, f, *args, **kwargs):
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


def test_train_and_generate_commands(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(data / "train"), "--tokenizer", str(data / "tokenizer.json"),
            "--eval-data", str(data / "heldout"), "--output-dir", str(run), "--batch-size", "2",
            "--max-length", "64", "--device", "cpu"]
    assert cli.main([*args, "--steps", "2"]) == 0
    assert "held-out loss at step 2" in capsys.readouterr().out
    assert cli.main([*args, "--steps", "3"]) == 0  # resumes and goes on
    out = capsys.readouterr().out
    assert "resumed" in out and "step 3/3" in out
    assert cli.main(["generate", str(run), "The [MASK] statement.", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "context: The [MASK] statement." in out and "filled:" in out and "blank 1:" in out


def test_demo_smoke(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    args = ["demo", "--output-dir", str(out_dir), "--steps", "3", "--vocab-size", "300", "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for expected in ("held-out loss before training", "held-out loss after 3 steps", "filled:", "demo finished"):
        assert expected in out
    assert out.count("filled:") == len(demo.DEMO_EXAMPLES)
    checkpoint = latest_checkpoint(out_dir / "run")
    assert checkpoint.name == "step-00000003" and is_checkpoint(checkpoint / "model")
    # A second run reuses the tokenizer, the token files and the finished training run.
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "holds a finished run of 3 steps" in out and "step 1/3" not in out
