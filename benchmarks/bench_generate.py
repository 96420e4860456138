"""Decoding throughput of blank filling: glm_ext's key/value cache against recomputing everything
and against the authors' decoding, which caches hidden states and re-projects keys and values.

Every method runs on the same model (same weights) in the same process, greedy, on rows of a
context of ``--context`` random tokens ending in ``[gMASK]``: a prefill of the context and the
blank's ``<sop>`` (not timed), then one token per row per step (timed: decode tokens/s = rows *
steps / time). Methods:

* ``cache``: ``glm_ext.model.KVCache``, what ``fill_blanks`` uses: a step feeds one token per row,
  the keys and values of earlier tokens are read from the cache;
* ``recompute``: no cache, every step runs the whole sequence again (``use_cache=False``);
* ``authors_mems``: THUDM/GLM's decoding (``mpu/transformer.py``, GLM_SPEC 5), written here from
  their code with the model's weights: the cache ("mems") holds each layer's input hidden states,
  and every step applies the layer's LayerNorm and QKV projection to all of them again;
* ``fill_blanks``: the API end to end with the cache (prefill, sampling bookkeeping and results
  included; ``decode_tokens_per_s`` subtracts the ``cache`` method's prefill time).

The greedy tokens of the three model-level methods are compared (``tokens_match``). Timed runs go
in rounds that run every method at every batch size once (medians over the rounds), so that the
load changes of a shared machine hit all figures alike.

Goals (CPU): ``cache`` at least 3x ``authors_mems`` at batch 1 (5x on a GPU), and ``cache`` at
batch 32 at least 8x the tokens/s of batch 1. The machine's load average is recorded before and
after: a shared machine makes absolute figures noisy.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks.common import default_device, environment_info, print_table, select_device, write_results
from glm_ext import reference
from glm_ext.generation import fill_blanks
from glm_ext.model import ATTENTION_BACKENDS, PRESETS, GLMConfig, GLMModel, KVCache
from glm_ext.tokenizer import GLMTokenizer

GOAL_CACHE_VS_AUTHORS = {"cpu": 3.0, "cuda": 5.0}
GOAL_BATCH_SCALING = 8.0  # tokens/s at the largest batch over batch 1, CPU
TOKENIZER_TEXTS = [f"Line {i}: the statement is used for repeated execution as long as it holds." for i in range(50)]


# --------------------------------------------------------------------------------------------
# Inputs


def make_rows(config: GLMConfig, batch: int, context: int, mask_id: int, sop_id: int, vocab: int,
              device: torch.device, generator: torch.Generator):
    """``batch`` rows of ``context`` random ids (ids 10.. of ``vocab``, the last a mask token) plus
    the blank's ``<sop>``: (ids, positions [B, 2, L], sep)."""
    ids = torch.randint(10, vocab, (batch, context + 1), generator=generator)
    ids[:, context - 1] = mask_id
    ids[:, context] = sop_id
    position = torch.arange(context + 1).clamp(max=context - 1)  # <sop> takes the mask's position
    block = (torch.arange(context + 1) == context).long()
    positions = torch.stack([position, block]).expand(batch, 2, context + 1).contiguous()
    sep = torch.full((batch,), context)
    return ids.to(device), positions.to(device), sep.to(device)


def step_positions(batch: int, context: int, step: int, device: torch.device) -> torch.Tensor:
    """The 2D position of the ``step``-th generated token (0-based) of every row: [B, 2, 1]."""
    return torch.tensor([[context - 1], [step + 2]], device=device).expand(batch, 2, 1)


# --------------------------------------------------------------------------------------------
# The three ways to decode (each: prefill(rows) -> state, computed once; decode(state, steps) ->
# tokens [B, steps], which leaves the state as the prefill left it)


def cache_prefill(model: GLMModel, rows, steps: int):
    ids, positions, sep = rows
    cache = KVCache(ids.shape[1] + steps + 1)
    last = torch.full_like(sep, ids.shape[1] - 1)
    return cache, model(ids, positions, sep, kv_cache=cache, logits_index=last)


def cache_decode(model: GLMModel, rows, state, steps: int) -> torch.Tensor:
    ids, _, sep = rows
    cache, logits = state
    cache.trim([ids.shape[1]] * len(sep))  # back to the prefill: every timed run decodes the same tokens
    context, first = ids.shape[1] - 1, torch.zeros_like(sep)
    tokens = []
    for step in range(steps):
        token = logits.argmax(dim=-1)
        tokens.append(token)
        positions = step_positions(len(sep), context, step, ids.device)
        logits = model(token[:, None], positions, sep, kv_cache=cache, logits_index=first)
    return torch.stack(tokens, dim=1)


def recompute_decode(model: GLMModel, rows, state, steps: int) -> torch.Tensor:
    ids, positions, sep = rows
    context = ids.shape[1] - 1
    tokens = []
    for step in range(steps):
        logits = model(ids, positions, sep, logits_index=torch.full_like(sep, ids.shape[1] - 1))
        token = logits.argmax(dim=-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        positions = torch.cat([positions, step_positions(len(sep), context, step, ids.device)], dim=2)
    return torch.stack(tokens, dim=1)


def authors_forward(model: GLMModel, ids: torch.Tensor, positions: torch.Tensor, sep: torch.Tensor,
                    mems: list[torch.Tensor] | None):
    """One forward pass as the authors' GPT2ParallelTransformer runs it with ``mems`` (each layer's
    input hidden states of the earlier tokens): every layer normalises and projects memory and new
    tokens together, keeping the queries of the new ones. Returns (last token's logits, new mems)."""
    config = model.config
    tables = model.transformer
    hidden = (F.embedding(ids, model.word_embeddings.weight)
              + F.embedding(positions[:, 0], tables.position_embeddings.weight)
              + F.embedding(positions[:, 1], tables.block_position_embeddings.weight))
    batch, new = ids.shape
    seen = new + (mems[0].shape[1] if mems else 0)
    mask = reference.mixed_mask(sep, new, seen)[:, None]
    new_mems = []
    for index, layer in enumerate(tables.layers):
        memory = mems[index] if mems else None
        new_mems.append(hidden if memory is None else torch.cat([memory, hidden], dim=1))
        normed = layer.input_layernorm(hidden)
        if memory is not None:
            normed = torch.cat([layer.input_layernorm(memory), normed], dim=1)
        qkv = layer.attention.query_key_value(normed).view(batch, seen, 3, config.num_heads, config.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q[:, :, -new:], k, v, attn_mask=mask)
        hidden = hidden + layer.attention.dense(out.transpose(1, 2).flatten(2))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    logits = F.linear(tables.final_layernorm(hidden[:, -1]), model.word_embeddings.weight)
    return logits, new_mems


def authors_prefill(model: GLMModel, rows, steps: int):
    return authors_forward(model, *rows, None)


def authors_decode(model: GLMModel, rows, state, steps: int) -> torch.Tensor:
    ids, _, sep = rows
    logits, mems = state
    context = ids.shape[1] - 1
    tokens = []
    for step in range(steps):
        token = logits.argmax(dim=-1)
        tokens.append(token)
        logits, mems = authors_forward(model, token[:, None], step_positions(len(sep), context, step, ids.device),
                                       sep, mems)
    return torch.stack(tokens, dim=1)


METHODS: dict[str, tuple[Callable | None, Callable]] = {
    "cache": (cache_prefill, cache_decode),
    "recompute": (None, recompute_decode),
    "authors_mems": (authors_prefill, authors_decode),
}


# --------------------------------------------------------------------------------------------
# Measuring


def steps_for(method: str, batch: int, args: argparse.Namespace) -> int:
    """Decode steps of one timed run: the slow methods run few (their cost per step hardly changes
    over a few tokens of a long context)."""
    if method in ("cache", "fill_blanks"):
        return args.steps
    slow = max(1, args.steps // (4 if method == "authors_mems" else 8))
    return slow if batch == 1 else max(1, slow // 2)


def seconds_of(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall-clock seconds, result) of one call, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def prepare_runs(model, tokenizer, rows, batch: int, args) -> dict[str, tuple[int, Callable[[], Any]]]:
    """Method -> (decode steps, one timed run) at one batch size; the prefills are done here, once,
    and every decode method is warmed up by one step. ``prefill`` times the cache method's prefill."""
    runs: dict[str, tuple[int, Callable[[], Any]]] = {}
    for method, (prefill, decode) in METHODS.items():
        steps = steps_for(method, batch, args)
        state = prefill(model, rows, steps) if prefill is not None else None
        decode(model, rows, state, 1)
        runs[method] = (steps, functools.partial(decode, model, rows, state, steps))
    ids = rows[0][:, :-1].remainder(tokenizer.vocab_size - 10).add(10).tolist()  # ids the tokenizer knows
    for row in ids:
        row[0], row[-1] = tokenizer.special_ids.cls, tokenizer.special_ids.gmask
    runs["fill_blanks"] = (args.steps, lambda: fill_blanks(model, tokenizer, ids, max_new_tokens=args.steps,
                                                           min_new_tokens=args.steps))
    runs["prefill"] = (0, lambda: cache_prefill(model, rows, 1))
    return runs


def measure(runs: dict[tuple[int, str], tuple[int, Callable[[], Any]]], args, device) -> list[dict[str, Any]]:
    """Times every (batch, method) run in rounds, each round running each of them once (so that a
    change of a shared machine's load hits all of them alike); medians over the rounds."""
    seconds: dict[tuple[int, str], list[float]] = {key: [] for key in runs}
    tokens: dict[tuple[int, str], torch.Tensor] = {}
    for round_index in range(args.rounds):
        for key, (_, run) in runs.items():
            elapsed, result = seconds_of(run, device)
            seconds[key].append(elapsed)
            if round_index == 0 and key[1] in METHODS:
                tokens[key] = result.cpu()
        print(f"  round {round_index + 1}: "
              + ", ".join(f"{method} ({batch}) {s[-1]:.1f} s" for (batch, method), s in seconds.items()), flush=True)

    median = {key: statistics.median(values) for key, values in seconds.items()}
    results = []
    for (batch, method), (steps, _) in runs.items():
        if method == "prefill":
            continue
        row = {"method": method, "batch": batch, "steps": steps, "rounds": args.rounds,
               "run_seconds": seconds[(batch, method)], "step_ms": median[(batch, method)] / steps * 1e3,
               "tokens_per_s": batch * steps / median[(batch, method)]}
        if method in METHODS:
            batch_tokens = [t for (b, _), t in tokens.items() if b == batch]
            shortest = min(t.shape[1] for t in batch_tokens)
            row["tokens_match"] = all(torch.equal(t[:, :shortest], batch_tokens[0][:, :shortest]) for t in batch_tokens)
        else:  # fill_blanks: end to end; decoding alone = minus the cache method's prefill
            prefill = median[(batch, "prefill")]
            row["prefill_seconds"] = prefill
            row["decode_tokens_per_s"] = batch * steps / max(median[(batch, method)] - prefill, 1e-9)
        results.append(row)
    return results


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny preset, context 64, few steps")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="model size (default: base; tiny with --quick)")
    p.add_argument("--context", type=int, default=None, help="context tokens per row (default: 512; 64 with --quick)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32],
                   help="comma-separated batch sizes, 1 first (default: 1,32)")
    p.add_argument("--steps", type=int, default=None,
                   help="decode steps of the cache method (default: 16; 8 with --quick)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of every method (default: 3)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/generate_<device-kind>.json)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="the model's attention backend (default: the model's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 is steadier on a loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("method", "method"),
    ("batch", "batch"),
    ("steps", "steps"),
    ("step_ms", "ms/step", ".1f"),
    ("tokens_per_s", "tokens/s", ",.1f"),
    ("decode_tokens_per_s", "decode tokens/s", ",.1f"),
    ("speedup_vs_authors", "x authors_mems", ".1f"),
    ("speedup_vs_recompute", "x recompute", ".1f"),
    ("scaling_vs_batch_1", "x batch 1", ".1f"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    preset = args.preset or ("tiny" if args.quick else "base")
    context = args.context or (64 if args.quick else 512)
    args.steps = args.steps or (8 if args.quick else 16)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"generate_{device.type}.json"
    if args.batches[0] != 1:
        raise SystemExit("error: --batches must start with 1 (the reference of the scaling goal)")

    torch.manual_seed(args.seed)
    config = GLMConfig.preset(preset, max_sequence_length=max(PRESETS[preset]["max_sequence_length"], context))
    model = GLMModel(config).to(device=device, dtype=dtype).eval()
    if args.attention:
        model.attention_backend = args.attention
    tokenizer = GLMTokenizer.train(TOKENIZER_TEXTS, 400)
    special = tokenizer.special_ids
    env = environment_info(device)
    resolved, decoding = model.backends(device, dtype), model.backends(device, dtype, decoding=True)
    attention = f"{model.attention_backend} -> {resolved.attention} ({resolved.reason}); decoding steps: " \
                f"{decoding.attention} ({decoding.reason}); rows of different lengths in the cache: sdpa"
    load_before = load_average()
    print(f"GLM {preset} ({config}) on {env['device_name']} ({device}), {str(dtype).removeprefix('torch.')}, "
          f"context {context}, batches {args.batches}, attention {attention}; "
          f"load average {load_before}", flush=True)

    with torch.no_grad():
        runs = {}
        for batch in args.batches:
            rows = make_rows(config, batch, context, special.gmask, special.sop, config.vocab_size, device,
                             torch.Generator().manual_seed(args.seed + batch))
            runs.update({(batch, method): run for method, run in prepare_runs(model, tokenizer, rows, batch,
                                                                              args).items()})
        rows_out = measure(runs, args, device)

    by_key = {(r["method"], r["batch"]): r for r in rows_out}
    for row in rows_out:
        same_batch = lambda method: by_key[(method, row["batch"])]["tokens_per_s"]  # noqa: E731
        row["speedup_vs_authors"] = row["tokens_per_s"] / same_batch("authors_mems")
        row["speedup_vs_recompute"] = row["tokens_per_s"] / same_batch("recompute")
        row["scaling_vs_batch_1"] = row["tokens_per_s"] / by_key[(row["method"], 1)]["tokens_per_s"]
    largest = args.batches[-1]
    cache_vs_authors = by_key[("cache", 1)]["speedup_vs_authors"]
    scaling = by_key[("cache", largest)]["scaling_vs_batch_1"]
    goal_kind = "cuda" if device.type == "cuda" else "cpu"
    goals = {
        "cache_vs_authors_at_batch_1": GOAL_CACHE_VS_AUTHORS[goal_kind],
        "cache_vs_authors_measured": cache_vs_authors,
        "cache_vs_authors_met": cache_vs_authors >= GOAL_CACHE_VS_AUTHORS[goal_kind],
        "batch_scaling_applies_here": device.type == "cpu" and largest == 32 and not args.quick,
        "batch_scaling_goal": GOAL_BATCH_SCALING,
        "batch_scaling_measured": scaling,
        "batch_scaling_met": scaling >= GOAL_BATCH_SCALING,
        "applies_here": preset == "base" and context == 512 and not args.quick,
    }
    payload = {
        "benchmark": "generate",
        "environment": {**env, "load_average_before": load_before, "load_average_after": load_average()},
        "config": {
            "preset": preset, "model_config": config.to_dict(), "context": context, "batches": args.batches,
            "dtype": str(dtype).removeprefix("torch."), "attention_backend": attention,
            "steps": args.steps, "rounds": args.rounds, "seed": args.seed,
            "decoding": "greedy, one token per row per step after a prefill of context + <sop> (not timed)",
            "timing": "time.perf_counter per decode run (all its steps; device synchronised), in rounds "
                      "that run every method at every batch size once, median over the rounds; caches not "
                      "flushed",
            "methods": {"cache": "glm_ext KVCache", "recompute": "whole sequence every step",
                        "authors_mems": "hidden states cached, LayerNorm + QKV of all of them every step",
                        "fill_blanks": "API end to end with the cache; decode_tokens_per_s subtracts the prefill"},
        },
        "rows": rows_out,
        "goals": goals,
    }
    print()
    print_table(rows_out, SUMMARY_COLUMNS)
    print(f"\ncache vs authors_mems at batch 1: {cache_vs_authors:.1f}x (goal {GOAL_CACHE_VS_AUTHORS[goal_kind]}x); "
          f"cache at batch {largest} vs batch 1: {scaling:.1f}x (goal {GOAL_BATCH_SCALING}x on the CPU)")
    print(f"results written to {write_results(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
