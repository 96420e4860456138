"""End-to-end training throughput of GLM: padded vs packed rows, the attention backends, 1..N processes.

Every timed step is a whole step of ``glm_ext.training.Trainer`` (:meth:`Run.train_step`: the
trainer's ``next_batches`` and ``train_step``) with the data pipeline in the loop: rows read from a
``PackedRowStream`` over the demo's corpus (``glm_ext.data.default_corpus()``, tokenised by a
byte-level BPE of the demo's vocabulary size), blank-infilling rows drawn by the collator and shared
out to ranks and micro-batches, packed into one varlen row per micro-batch (``packing``), forward,
loss over the step's tokens, backward with the gradient reduction of DDP (several processes),
clipping, an AdamW step.

Configurations: rows ``padded`` (the collator's fixed-width rows, SDPA with a dense mask or the
fused kernel) or ``packed`` (the same samples without padding), attention ``sdpa`` or ``fused``;
each with 1 process and with N processes (spawned, gloo on the CPU / nccl on CUDA, one rank per
device or ``cores / N`` threads each on the CPU). All configurations see the same samples.

tokens/s counts real tokens (every row's Part A and Part B, not its padding): the same work for
every configuration, summed over ranks; ``padding_share`` is the share of the positions the model
computed that were padding. MFU (CUDA): ``6 N + 12 layers hidden seq`` model FLOPs per
real token (``bench_model.model_flops_per_token``, seq = max_length) over the device's bf16 peak.

Timing: ``rounds`` rounds; in each, every configuration builds its model and runs ``warmup``
steps, then all run ``iters`` timed steps interleaved step by step (a slow spell of the machine hits
them alike). Wall time gives tokens/s; CPU time (``time.process_time``, summed over ranks) gives
tokens per CPU-second, which other processes on a shared machine disturb far less (with one thread
a process it is the work done). Each configuration's best round is reported; ``uptime`` is recorded.

Goal (CPU, the demo's settings: tiny preset, rotary positions, 16 rows of 128): ``packed`` +
``fused`` at least 1.3x the tokens/s of ``padded`` + ``sdpa`` (today's trainer), with 1 process.
GPU: base and large presets, seq 512, bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.multiprocessing as mp

from benchmarks.bench_model import model_flops_per_token, peak_flops
from benchmarks.common import default_device, environment_info, print_table, select_device, write_results
from glm_ext import distributed
from glm_ext.data import TokenFile, default_corpus, prepare_token_file
from glm_ext.data.steps import real_tokens
from glm_ext.demo import DEMO_BATCH_SIZE, DEMO_MAX_LENGTH, DEMO_VOCAB_SIZE
from glm_ext.model import PRESETS
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig, Trainer

CONFIGURATIONS = [("padded", "sdpa"), ("padded", "fused"), ("packed", "sdpa"), ("packed", "fused")]
BASELINE = ("padded", "sdpa")
GOAL = ("packed", "fused")
GOAL_SPEEDUP_CPU = 1.3
LR = 1e-3
GRAD_CLIP = 1.0


# --------------------------------------------------------------------------------------------
# Data: the demo corpus as a token file (made once, kept in the cache directory)


def prepare_data(cache: Path, vocab_size: int) -> tuple[Path, Path]:
    """A byte-level BPE of ``vocab_size`` tokens trained on the demo corpus, and the corpus as a
    token file; reused when already in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_path, prefix = cache / f"tokenizer-{vocab_size}.json", cache / f"corpus-{vocab_size}"
    if not tokenizer_path.is_file():
        GLMTokenizer.train(default_corpus(), vocab_size).save(tokenizer_path)
    tokenizer = GLMTokenizer.from_file(tokenizer_path)
    try:
        if TokenFile(prefix).metadata.get("tokenizer_sha256") == tokenizer.sha256:
            return tokenizer_path, prefix
    except FileNotFoundError:
        pass
    source = cache / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in default_corpus()), encoding="utf-8")
    prepare_token_file([source], tokenizer, prefix)
    return tokenizer_path, prefix


# --------------------------------------------------------------------------------------------
# One configuration on one rank


class Run:
    """The trainer of one configuration on this rank (the process group, if any, already joined)."""

    def __init__(self, args: argparse.Namespace, rows: str, attention: str, output_dir: Path):
        self.packed = rows == "packed"
        # The tiny preset keeps the tokenizer's vocabulary (the demo's model); larger ones their own.
        vocab = {} if args.preset == "tiny" else {"vocab_size": PRESETS[args.preset]["vocab_size"]}
        config = TrainConfig(
            train_data=str(args.token_file), tokenizer=str(args.tokenizer), output_dir=str(output_dir),
            preset=args.preset, position_encoding=args.position_encoding, model_overrides=vocab,
            attention_backend=attention, packing=self.packed, batch_size=args.batch, grad_accum=args.grad_accum,
            max_length=args.max_length, lr=LR, warmup=1, grad_clip=GRAD_CLIP, seed=args.seed,
            device=str(args.device), dtype="auto" if args.device.type == "cuda" else "float32",
        )
        self.trainer = Trainer(config, log=lambda line: None)
        self.model = self.trainer.model

    def train_step(self) -> tuple[int, int]:
        """One step of the trainer; returns this rank's real tokens and the positions computed."""
        batches = self.trainer.next_batches()
        self.trainer.train_step(batches)
        return sum(int(real_tokens(b)) for b in batches), sum(b.tokens.numel() for b in batches)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _barrier(device: torch.device) -> None:
    _synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def measure_round(args: argparse.Namespace, context: distributed.DistributedContext) -> list[dict]:
    """Builds every configuration, warms each up, then times ``iters`` steps of each, interleaved
    step by step (so that a slow spell of the machine hits all configurations alike). Returns one
    result per configuration, for all ranks together."""
    with tempfile.TemporaryDirectory() as output_dirs:  # the trainers' run directories (nothing is saved)
        runs = [Run(args, rows, attention, Path(output_dirs) / f"{rows}-{attention}")
                for rows, attention in args.configurations]
        for run in runs:
            for _ in range(args.warmup):
                run.train_step()
        # per configuration: real tokens, positions computed, wall seconds, CPU seconds (this rank)
        totals = torch.zeros(len(runs), 4, dtype=torch.float64)
        for _ in range(args.iters):
            for index, run in enumerate(runs):
                _barrier(context.device)
                wall, cpu = time.perf_counter(), time.process_time()
                counts = run.train_step()
                _synchronize(context.device)
                seconds = [time.perf_counter() - wall, time.process_time() - cpu]
                totals[index] += torch.tensor([*counts, *seconds], dtype=torch.float64)
    if torch.distributed.is_initialized():
        reduced = totals.to(context.device)
        torch.distributed.all_reduce(reduced)  # tokens, positions and CPU time add up over ranks
        totals[:, [0, 1, 3]] = reduced[:, [0, 1, 3]].cpu()
    results = []
    for run, (tokens, positions, wall, cpu) in zip(runs, totals.tolist()):
        results.append({
            "rows": "packed" if run.packed else "padded", "attention": run.model.attention_backend,
            "tokens": int(tokens), "seconds": wall, "cpu_seconds": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "padding_share": 1 - tokens / positions,
            "resolved_attention": run.model.backends(context.device, args.autocast_dtype).attention,
            "model_flops_per_token": model_flops_per_token(run.model, args.max_length)["total"],
        })
    return results


def run_all(args: argparse.Namespace, context: distributed.DistributedContext) -> list[list[dict]]:
    """``rounds`` rounds of every configuration: ``[round][configuration]``."""
    rounds = []
    for index in range(args.rounds):
        rounds.append(measure_round(args, context))
        if context.is_main:
            summary = ", ".join(f"{r['rows']}+{r['attention']} {r['tokens_per_s']:,.0f}" for r in rounds[-1])
            print(f"    world {context.world_size}, round {index + 1}/{args.rounds}: tokens/s {summary}", flush=True)
    return rounds


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads_per_rank)
    context = distributed.init_distributed(args.device.type)
    try:
        rounds = run_all(args, context)
        if context.is_main:
            torch.save(rounds, out)
    finally:
        distributed.close_distributed()


def run_world(args: argparse.Namespace, world_size: int) -> list[list[dict]]:
    if world_size == 1:
        return run_all(args, distributed.DistributedContext(0, 0, 1, args.device))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rounds.pt"
        mp.spawn(_worker, args=(world_size, port, args, out), nprocs=world_size, join=True)
        return torch.load(out, weights_only=False)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="device type (default: cuda if available, else cpu)")
    p.add_argument("--presets", nargs="+", default=None,
                   help="model sizes (default: tiny on the CPU, base and large on CUDA)")
    p.add_argument("--max-length", type=int, default=None, help="row width (default: 128 on the CPU, 512 on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="rows per step, all ranks together (default: 16 on the CPU, 32 on CUDA)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--world-sizes", type=int, nargs="+", default=None,
                   help="process counts (default: 1 2 on the CPU; 1 and the device count on CUDA)")
    p.add_argument("--configurations", nargs="+", default=None, metavar="ROWS+ATTENTION",
                   help=f"subset of {' '.join(f'{r}+{a}' for r, a in CONFIGURATIONS)}")
    p.add_argument("--position-encoding", default=TrainConfig.position_encoding, choices=["learned_2d", "rotary_2d"],
                   help="default: the trainer's (and the demo's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round and configuration")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default: 8 on the CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each configuration's best is reported")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of one process (default: all cores)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "glm_ext_bench_train",
                   help="where the tokenizer and token file are kept between runs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/train_<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("preset", "preset"),
    ("world_size", "procs"),
    ("rows", "rows"),
    ("attention", "attention"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("speedup_vs_baseline", "x padded+sdpa", ".2f"),
    ("tokens_per_cpu_s", "tokens/CPU-s", ",.0f"),
    ("cpu_speedup_vs_baseline", "x (CPU time)", ".2f"),
    ("padding_share", "padding", ".3f"),
    ("mfu", "MFU", ".3f"),
]


def _uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = select_device(args.device)
    on_cpu = args.device.type == "cpu"
    presets = args.presets or (["tiny"] if on_cpu else ["base", "large"])
    args.max_length = args.max_length or (DEMO_MAX_LENGTH if on_cpu else 512)
    args.batch = args.batch or (DEMO_BATCH_SIZE if on_cpu else 32)
    args.iters = args.iters or (8 if on_cpu else 20)
    args.autocast_dtype = None if on_cpu else torch.bfloat16
    world_sizes = args.world_sizes or ([1, 2] if on_cpu else sorted({1, torch.accelerator.device_count()}))
    args.configurations = ([tuple(c.split("+")) for c in args.configurations] if args.configurations
                           else CONFIGURATIONS)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    args.tokenizer, args.token_file = prepare_data(args.cache, DEMO_VOCAB_SIZE)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"train_{args.device.type}.json"
    env = environment_info(args.device)
    load_before = _uptime()
    print(f"training throughput on {env['device_name']} ({args.device}): presets {presets}, {args.batch} rows of "
          f"{args.max_length} a step, grad_accum {args.grad_accum}, world sizes {world_sizes}, "
          f"{args.rounds} rounds x ({args.warmup} warm-up + {args.iters} timed steps); {load_before}", flush=True)
    if not on_cpu:
        print("NOTE: the CUDA path of this benchmark was written without a GPU and is unverified.", flush=True)

    rows: list[dict[str, Any]] = []
    for preset in presets:
        args.preset = preset
        peak = peak_flops(args.device, torch.bfloat16, args.peak_tflops) if not on_cpu else None
        for world_size in world_sizes:
            args.threads_per_rank = max(1, threads // world_size)
            threads_note = f", {args.threads_per_rank} thread(s) each" if on_cpu else ""
            print(f"  {preset}, {world_size} process(es){threads_note}", flush=True)
            rounds = run_world(args, world_size)
            for index in range(len(args.configurations)):
                results = [r[index] for r in rounds]
                best = max(results, key=lambda r: r["tokens_per_s"])
                rows.append({
                    "preset": preset, "world_size": world_size, **best,
                    "tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in results),
                    "tokens_per_s_rounds": [r["tokens_per_s"] for r in results],
                    "mfu": best["model_flops_per_token"] * best["tokens_per_s"] / peak if peak else None,
                })
    for row in rows:
        baseline = next(r for r in rows if (r["preset"], r["world_size"]) == (row["preset"], row["world_size"])
                        and (r["rows"], r["attention"]) == BASELINE)
        row["speedup_vs_baseline"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["cpu_speedup_vs_baseline"] = row["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"]

    goal_row = next((r for r in rows if r["preset"] == "tiny" and r["world_size"] == 1
                     and (r["rows"], r["attention"]) == GOAL), None)
    goals = {
        "applies_to": "cpu, tiny preset (the demo's settings), 1 process",
        "packed_fused_vs_padded_sdpa": GOAL_SPEEDUP_CPU,
        "measured": goal_row["speedup_vs_baseline"] if goal_row and on_cpu else None,
        "measured_in_cpu_time": goal_row["cpu_speedup_vs_baseline"] if goal_row and on_cpu else None,
    }
    goals["met"] = None if goals["measured"] is None else goals["measured"] >= GOAL_SPEEDUP_CPU
    payload = {
        "benchmark": "train",
        "environment": {**env, "uptime_before": load_before, "uptime_after": _uptime()},
        "config": {
            "presets": presets, "max_length": args.max_length, "batch": args.batch, "grad_accum": args.grad_accum,
            "position_encoding": args.position_encoding, "world_sizes": world_sizes, "threads": threads,
            "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "seed": args.seed,
            "autocast": None if args.autocast_dtype is None else str(args.autocast_dtype).removeprefix("torch."),
            "data": f"glm_ext.data.default_corpus(), byte-level BPE of {DEMO_VOCAB_SIZE} tokens",
            "step": "stream -> collator -> [pack] -> forward -> step loss -> backward (DDP) -> clip -> AdamW",
            "tokens": "real tokens (Part A + Part B of every row), summed over ranks",
            "timing": "per step, configurations interleaved step by step; wall (time.perf_counter, device "
                      "synchronised) and CPU time (time.process_time, summed over ranks); best round of each",
        },
        "rows": rows,
        "goals": goals,
    }
    print()
    print_table(rows, SUMMARY_COLUMNS)
    if goals["measured"] is not None:
        print(f"\nGoal (packed+fused >= {GOAL_SPEEDUP_CPU}x padded+sdpa, 1 process): {goals['measured']:.2f}x, "
              f"{'MET' if goals['met'] else 'NOT MET'} (in CPU time: {goals['measured_in_cpu_time']:.2f}x)")
    print(f"{payload['environment']['uptime_after']}\nresults written to {write_results(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
