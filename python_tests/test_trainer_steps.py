"""The trainer's arithmetic checked against direct computations: gradient clipping, the held-out
loss (token-weighted), and settings that would silently disable them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from glm_ext.training import Trainer
from training_testing import make_training_data, quiet, small_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"))


def raw_gradients(model, batch) -> dict[str, torch.Tensor]:
    """The gradients of the mean cross-entropy over Part B, computed directly on a copy."""
    model = copy.deepcopy(model)
    logits = model(batch.tokens, batch.position_ids, batch.sep)
    chosen = batch.loss_mask.bool()
    F.cross_entropy(logits[chosen], batch.targets[chosen]).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("grad_clip", [0.05, 0.0, 1e6])
def test_gradients_are_clipped_to_the_configured_norm(data, tmp_path, grad_clip):
    trainer = Trainer(small_config(data, tmp_path, grad_clip=grad_clip), log=quiet)
    (batch,) = trainer.next_batches()
    raw = raw_gradients(trainer.model, batch)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in raw.values()))
    assert norm > 0.5  # so that a clip to 0.05 changes the gradients a lot
    trainer.train_step([batch])
    scale = grad_clip / norm if 0 < grad_clip < norm else 1.0
    for name, parameter in trainer.model.named_parameters():
        expected = raw[name] * scale  # the trainer's loss runs in float32: allow its rounding
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    trainer._flush_pending()
    logged = trainer.history[-1]["grad_norm"]
    assert math.isnan(logged) if grad_clip == 0 else logged == pytest.approx(norm, rel=1e-5)


def test_held_out_loss_weights_every_token_equally(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, batch_size=3, eval_batches=4), log=quiet)
    batches = trainer.eval_batches()
    counts = [int(b.loss_mask.sum()) for b in batches]
    assert len(batches) >= 2 and len(set(counts)) > 1, counts  # batches of unequal token counts
    total, means = 0.0, []
    with torch.no_grad():
        for batch in batches:
            logits = trainer.model(batch.tokens, batch.position_ids, batch.sep)
            chosen = batch.loss_mask.bool()
            loss_sum = float(F.cross_entropy(logits[chosen], batch.targets[chosen], reduction="sum"))
            total += loss_sum
            means.append(loss_sum / int(chosen.sum()))
    expected = total / sum(counts)
    assert abs(sum(means) / len(means) - expected) > 1e-4 * expected  # the plain mean of batch means differs
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-6)  # the trainer's loss runs in float32


@pytest.mark.parametrize("field, value", [
    ("grad_clip", math.nan), ("grad_clip", math.inf), ("weight_decay", math.nan), ("lr", math.nan), ("lr", math.inf),
])
def test_settings_that_would_silently_do_nothing_are_refused(data, tmp_path, field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        small_config(data, tmp_path, **{field: value})
