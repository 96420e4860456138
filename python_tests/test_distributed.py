"""glm_ext.distributed and glm_ext.data.steps: a step split over ranks (DDP, FSDP2 on 2 gloo
processes), micro-batches and packed rows equals the same step done as one padded batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from glm_ext import distributed
from glm_ext.checkpoint import load_checkpoint, save_checkpoint
from glm_ext.data import BlankInfillingCollator, BlankInfillingConfig, PackedRowStream, TokenFile, default_corpus
from glm_ext.data import prepare_token_file
from glm_ext.data.steps import StepLayout, batch_logits, next_step_batches, pack_batch, padding_share
from glm_ext.model import GLMConfig, GLMModel
from glm_ext.tokenizer import GLMTokenizer

MAX_LENGTH = 32
GLOBAL_BATCH = 4
STEPS = 4
WORLD_SIZE = 2
# (parallelism, micro-batches per step) of the runs on 2 processes
RUNS = {"ddp": ("ddp", 1), "ddp_accum": ("ddp", 2), "fsdp": ("fsdp", 1), "fsdp_accum": ("fsdp", 2)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and a token file of a few help() topics."""
    root = tmp_path_factory.mktemp("data")
    documents = default_corpus()[:8]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    tokenizer = GLMTokenizer.train(documents, 300)
    tokenizer.save(root / "tokenizer.json")
    prepare_token_file([root / "train.jsonl"], tokenizer, root / "train")
    return root


def pipeline(data: Path, objectives: BlankInfillingConfig = BlankInfillingConfig()):
    tokenizer = GLMTokenizer.from_file(data / "tokenizer.json")
    collator = BlankInfillingCollator(tokenizer, MAX_LENGTH, config=objectives, seed=3)
    stream = PackedRowStream(TokenFile(data / "train"), collator.input_length, seed=5)
    return tokenizer, collator, stream


def build_model(tokenizer: GLMTokenizer) -> GLMModel:
    """The same float64 model in every process (learned 2D positions: all three tables train)."""
    torch.manual_seed(0)
    config = GLMConfig(vocab_size=tokenizer.padded_vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                       max_sequence_length=MAX_LENGTH)
    return GLMModel(config).double()


def train(data: Path, layout: StepLayout, parallel: str | None = None, *, packed: bool = False):
    """``STEPS`` AdamW steps with clipping; returns the trace (each step's loss and gradient norm:
    Adam and clipping hide a wrong gradient scale from the weights, not from the norms), the whole
    trained state dict (rank 0), the (wrapped) model and the optimizer."""
    tokenizer, collator, stream = pipeline(data)
    model = build_model(tokenizer)
    if parallel == "ddp":
        model = distributed.apply_ddp(model, "cpu")
    elif parallel == "fsdp":
        model = distributed.apply_fsdp(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    trace = []
    for _ in range(STEPS):
        batches = next_step_batches(stream, collator, layout)
        if packed:
            batches = [pack_batch(batch, pad_id=tokenizer.special_ids.pad) for batch in batches]
        trace.append(distributed.accumulate_gradients(model, batches).item())
        trace.append(distributed.clip_grad_norm(model, 0.5).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trace, distributed.full_model_state_dict(model), model, optimizer


def assert_same_weights(got: dict, expected: dict, rtol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------
# Data across ranks and micro-batches (one process)


def test_collate_parts_equal_rows_of_the_whole_batch(data):
    # The 10B mix also draws the objective: every part must agree on it with the whole.
    _, collator, stream = pipeline(data, BlankInfillingConfig.glm_10b())
    rows = [stream.next_row() for _ in range(6)]
    for seed in range(8):
        whole = collator.collate(rows, seed=seed)
        for first, last in ((0, 2), (2, 5), (5, 6)):
            part = collator.collate(rows[first:last], seed=seed, first_row=first)
            assert part.objective == whole.objective
            for name in ("tokens", "targets", "loss_mask", "position_ids", "sep"):
                assert torch.equal(getattr(part, name), getattr(whole, name)[first:last]), (seed, first, name)
    # Mutation guard: without its offset a part is drawn differently.
    moved = collator.collate(rows[2:5], seed=0, first_row=0)
    assert not torch.equal(moved.tokens, collator.collate(rows, seed=0).tokens[2:5])


def test_ranks_and_micro_batches_share_out_the_rows_of_one_batch(data):
    _, collator, stream = pipeline(data)
    whole = [collator([stream.next_row() for _ in range(8)]) for _ in range(2)]  # the single-process trainer
    parts, positions = {}, []
    for rank in range(2):
        _, collator, stream = pipeline(data)
        layout = StepLayout.for_global_batch(8, grad_accum=2, world_size=2, rank=rank)
        parts[rank] = [next_step_batches(stream, collator, layout) for _ in range(2)]
        assert collator.batches_drawn == 2 and layout.first_row == 4 * rank
        positions.append(stream.state_dict())
    _, collator, stream = pipeline(data)
    for _ in range(16):
        stream.next_row()
    assert positions == [stream.state_dict()] * 2  # every rank's stream ends past the whole step
    for step in range(2):
        micro = [batch for rank in range(2) for batch in parts[rank][step]]
        assert [b.tokens.shape[0] for b in micro] == [2, 2, 2, 2]
        for name in ("tokens", "targets", "loss_mask", "position_ids", "sep"):
            assert torch.equal(torch.cat([getattr(b, name) for b in micro]), getattr(whole[step], name))


def test_step_layout_errors():
    with pytest.raises(ValueError, match="does not split into grad_accum=3 x world_size=2"):
        StepLayout.for_global_batch(16, grad_accum=3, world_size=2, rank=0)
    with pytest.raises(ValueError, match="grad_accum must be a positive int, got 0"):
        StepLayout(4, grad_accum=0)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        StepLayout(4, world_size=2, rank=2)


def test_accumulated_micro_batches_equal_one_batch(data):
    one_losses, one_state, *_ = train(data, StepLayout(4))
    for micro_batch_size in (2, 1):
        layout = StepLayout.for_global_batch(4, grad_accum=4 // micro_batch_size, world_size=1, rank=0)
        losses, state, *_ = train(data, layout)
        assert losses == pytest.approx(one_losses, rel=1e-12)
        assert_same_weights(state, one_state)


def test_packed_rows_train_like_padded_rows(data):
    tokenizer, collator, stream = pipeline(data)
    (batch,) = next_step_batches(stream, collator, StepLayout(4))
    packed = pack_batch(batch, pad_id=tokenizer.special_ids.pad)
    real = int(batch.sep.sum() + batch.loss_mask.sum())
    assert packed.tokens.shape == (real,) and packed.cu_seqlens.tolist()[-1] == real
    assert padding_share(packed) == 0.0
    assert padding_share(batch) == pytest.approx(1 - real / (4 * MAX_LENGTH)) and padding_share(batch) > 0
    padded_losses, padded_state, *_ = train(data, StepLayout(4))
    packed_losses, packed_state, *_ = train(data, StepLayout(4), packed=True)
    assert packed_losses == pytest.approx(padded_losses, rel=1e-10)
    assert_same_weights(packed_state, padded_state)


def test_step_loss_is_the_mean_over_the_tokens_of_the_whole_step(data):
    tokenizer, collator, stream = pipeline(data)
    model = build_model(tokenizer)
    batches = next_step_batches(stream, collator, StepLayout(2, grad_accum=2))
    with torch.no_grad():
        logits = [batch_logits(model, b) for b in batches]
        step_loss = distributed.StepLoss.for_step(b.loss_mask for b in batches)
        value = step_loss.value([step_loss(x, b.targets, b.loss_mask) for x, b in zip(logits, batches)])
        per_token = torch.cat([torch.nn.functional.cross_entropy(x[b.loss_mask.bool()], b.targets[b.loss_mask.bool()],
                                                                 reduction="none") for x, b in zip(logits, batches)])
    assert step_loss.tokens == per_token.numel() and value.item() == pytest.approx(per_token.mean().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 2 processes on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_reductions(data: Path, grad_accum: int, rank: int) -> int:
    """How many bucket all-reduces DDP runs for one step of ``grad_accum`` micro-batches."""
    tokenizer, collator, stream = pipeline(data)
    model = distributed.apply_ddp(build_model(tokenizer), "cpu")
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    layout = StepLayout.for_global_batch(GLOBAL_BATCH, grad_accum=grad_accum, world_size=WORLD_SIZE, rank=rank)
    distributed.accumulate_gradients(model, next_step_batches(stream, collator, layout))
    return len(calls)


def _worker(rank: int, port: int, data: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    context = distributed.init_distributed("cpu")
    try:
        results = {"context": (context.rank, context.world_size, str(context.device)),
                   "main": distributed.is_main_process()}
        for name, (parallel, grad_accum) in RUNS.items():
            layout = StepLayout.for_global_batch(GLOBAL_BATCH, grad_accum=grad_accum, world_size=WORLD_SIZE, rank=rank)
            losses, state, model, optimizer = train(data, layout, parallel)
            results[name] = (losses, state)
        # The last run (FSDP2): the whole model in the checkpoint format, and the optimizer's shards.
        if context.is_main:
            save_checkpoint(state, out / "model", config=model.config)
        distributed.save_optimizer_state(model, optimizer, out / "optimizer")
        torch.distributed.barrier()
        fresh = distributed.apply_fsdp(build_model(GLMTokenizer.from_file(data / "tokenizer.json")))
        distributed.load_full_model_state_dict(fresh, load_checkpoint(out / "model").state_dict())
        results["reloaded"] = distributed.full_model_state_dict(fresh)
        results["ddp_reductions"] = [_ddp_reductions(data, grad_accum, rank) for grad_accum in (1, 2)]
        results["any_rank"] = [distributed.any_rank(rank == 1, "cpu"), distributed.any_rank(False, "cpu")]
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        distributed.close_distributed()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # loading 2 shards in 1 process
def test_ddp_and_fsdp_on_two_processes_equal_one_process(data, tmp_path):
    mp.spawn(_worker, args=(_free_port(), data, tmp_path), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert [r["context"] for r in ranks] == [(0, 2, "cpu"), (1, 2, "cpu")]
    assert [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["any_rank"] == ranks[1]["any_rank"] == [True, False]
    once, accumulated = ranks[0]["ddp_reductions"]
    assert once > 0 and accumulated == once  # no all-reduce before the last micro-batch

    losses, state, model, optimizer = train(data, StepLayout(GLOBAL_BATCH))
    for name in RUNS:
        for rank in ranks:
            assert rank[name][0] == pytest.approx(losses, rel=1e-9), name
        assert ranks[1][name][1] == {}  # only rank 0 gathers the whole model
        assert_same_weights(ranks[0][name][1], state)

    # Rank 0 saved the FSDP2 model in the checkpoint format; every rank reloaded it.
    assert_same_weights(load_checkpoint(tmp_path / "model").state_dict(), state)
    assert_same_weights(ranks[0]["reloaded"], state)
    # The optimizer saved as 2 shards loads into one process as that process's own state.
    assert sorted(p.name for p in (tmp_path / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    expected = get_optimizer_state_dict(model, optimizer)
    fresh = build_model(GLMTokenizer.from_file(data / "tokenizer.json"))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    distributed.load_optimizer_state(fresh, fresh_optimizer, tmp_path / "optimizer")
    loaded = get_optimizer_state_dict(fresh, fresh_optimizer)
    assert loaded["state"].keys() == expected["state"].keys()
    for name, values in expected["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(loaded["state"][name][key], values[key], rtol=1e-6, atol=1e-12)


def test_single_process_context_and_backends(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert distributed.is_main_process()
    assert distributed.any_rank(True, "cpu") and not distributed.any_rank(False, "cpu")
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="no collective backend for meta devices"):
        distributed.backend_for("meta")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'two'"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent torchrun environment: RANK=2"):
        distributed.init_distributed("cpu")
