"""Training-step throughput of the GLM model: glm_ext's fast path against plain PyTorch.

One step is forward + ``lm_loss`` + backward (no optimizer update) on a batch of GLM rows with
random ids, 2D positions and ``sep``. Every configuration runs on the same model object (the
same weights; only the backends change) in the same process:

* ``pytorch``: the baseline, "the same model built from plain PyTorch": reference embedding
  (three ``F.embedding`` lookups) and ``scaled_dot_product_attention`` with a dense boolean mask;
* ``glm_ext``: the fast path: fused ``embedding_2d`` and rotary, and the fused mixed-mask attention
  op (``mixed_mask_attention``; no mask tensor).

Model FLOPs per token (stated in the results): ``6 * N + 12 * layers * hidden * seq``, with N the
parameters used in matmuls (the layers plus the tied output projection ``vocab * hidden``; the
position tables are lookups) and the second term the attention scores and values, forward and
backward, counted over the full ``seq x seq`` square as is usual for MFU. MFU divides the achieved
model FLOP rate by the device's dense bf16/fp16 tensor-core peak.

Goal (CUDA, ``large`` preset, seq 512, bf16): ``glm_ext`` at least 1.5x ``pytorch`` and 40% MFU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import default_device, environment_info, print_table, select_device, time_fn, write_results
from glm_ext.model import PRESETS, GLMConfig, GLMModel, lm_loss

BASELINE = {"embedding_backend": "reference", "attention_backend": "sdpa"}
FAST_PATH = {"embedding_backend": "fused", "attention_backend": "fused"}
CONFIGURATIONS = {"pytorch": BASELINE, "glm_ext": FAST_PATH}
GOAL_SPEEDUP = 1.5
GOAL_MFU = 0.40
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, by a substring of the device name;
# the first match wins, so the more specific names come first.
PEAK_FLOPS_16BIT = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> float | None:
    """The device's peak in FLOP/s for ``dtype`` (``--peak-tflops`` wins), None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS_16BIT if key in name), None)


def model_flops_per_token(model: GLMModel, seq: int) -> dict[str, float]:
    """``6 N + 12 layers hidden seq`` (see the module docstring) and its two terms."""
    config = model.config
    layer_params = sum(p.numel() for p in model.transformer.layers.parameters())
    matmul_params = layer_params + config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * config.hidden_size * seq
    return {"matmul_params": matmul_params, "attention_flops": attention, "total": 6 * matmul_params + attention}


def make_batch(config: GLMConfig, batch: int, seq: int, device: torch.device, gen: torch.Generator):
    """GLM rows: Part A of random length in [seq/2, seq), Part B one span that points at a random
    mask position of A (block positions 1, 2, ...); the loss covers Part B."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    sep = torch.randint(seq // 2, seq, (batch,), generator=gen)
    index = torch.arange(seq).expand(batch, seq)
    in_b = index >= sep[:, None]
    mask_position = (torch.rand(batch, generator=gen) * sep).long()
    position = torch.where(in_b, mask_position[:, None], index)
    block = torch.where(in_b, index - sep[:, None] + 1, 0)
    positions = torch.stack([position, block], dim=1)
    tensors = (ids, positions, sep, targets, in_b.float())
    return tuple(t.to(device) for t in tensors)


def measure(
    model: torch.nn.Module, batch: tuple, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    """Times one training step of ``model`` (already set to its configuration)."""
    ids, positions, sep, targets, loss_mask = batch
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        with autocast:
            loss = lm_loss(model(ids, positions, sep), targets, loss_mask)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    loss = step().item()  # first call: compilation (when compiled), allocator warm-up
    first_call_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_fn(step, device, warmup=args.warmup, iters=args.iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"loss": loss, "first_call_s": first_call_s, "timing": timing, "peak_memory_bytes": peak}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny preset, short rows, few iterations")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model size (default: large; tiny with --quick)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: 512; 128 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 16 on CUDA, 4 elsewhere)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype, float32 = no autocast (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="also measure every configuration under torch.compile")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5 on CUDA, 3 elsewhere)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default: 20 on CUDA, 10 elsewhere)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/model_<device-kind>.json)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("name", "configuration"),
    ("embedding_backend", "embedding"),
    ("attention_backend", "attention"),
    ("step_ms", "step ms", ".2f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("model_tflops", "model TFLOP/s", ".2f"),
    ("mfu", "MFU", ".3f"),
    ("peak_memory_gib", "peak GiB", ".2f"),
    ("speedup_vs_pytorch", "x pytorch", ".2f"),
    ("loss_rel_diff_vs_pytorch", "loss rel diff", ".1e"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    preset = args.preset or ("tiny" if args.quick else "large")
    seq = args.seq or (128 if args.quick else 512)
    batch_size = args.batch or (16 if on_cuda else 4)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 3)
    args.iters = args.iters or (20 if on_cuda else 10)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"model_{device.type}.json"

    torch.manual_seed(args.seed)
    config = GLMConfig.preset(preset)
    model = GLMModel(config, activation_checkpointing=args.activation_checkpointing).to(device)
    batch = make_batch(config, batch_size, seq, device, torch.Generator().manual_seed(args.seed))
    flops = model_flops_per_token(model, seq)
    peak = peak_flops(device, dtype, args.peak_tflops)
    env = environment_info(device)
    print(f"GLM {preset} ({config}) on {env['device_name']} ({device}), batch {batch_size} x seq {seq}, "
          f"{str(dtype).removeprefix('torch.')}, warmup {args.warmup}, iters {args.iters}; "
          f"model FLOPs/token {flops['total'] / 1e9:.3f} G", flush=True)

    runs = [(name, backends, False) for name, backends in CONFIGURATIONS.items()]
    if args.compile:
        runs += [(f"{name}+compile", backends, True) for name, backends in CONFIGURATIONS.items()]
    rows: list[dict[str, Any]] = []
    for name, backends, compiled in runs:
        model.embedding_backend = backends["embedding_backend"]
        model.attention_backend = backends["attention_backend"]
        torch._dynamo.reset()
        runner = torch.compile(model) if compiled else model
        result = measure(runner, batch, device, dtype, args)
        seconds = result["timing"]["median_ms"] * 1e-3
        tokens_per_s = batch_size * seq / seconds
        achieved = flops["total"] * tokens_per_s
        rows.append({
            "name": name, **backends, "compiled": compiled,
            "step_ms": result["timing"]["median_ms"], "timing": result["timing"],
            "tokens_per_s": tokens_per_s, "model_tflops": achieved / 1e12,
            "mfu": achieved / peak if peak else None,
            "peak_memory_gib": result["peak_memory_bytes"] / 2**30 if result["peak_memory_bytes"] else None,
            "loss": result["loss"], "first_call_s": result["first_call_s"],
        })
        print(f"  {name:18s} {result['timing']['median_ms']:9.2f} ms/step  {tokens_per_s:12,.0f} tokens/s", flush=True)

    baseline = {r["compiled"]: r for r in rows if r["name"].startswith("pytorch")}
    for row in rows:
        reference_row = baseline[row["compiled"]]
        row["speedup_vs_pytorch"] = reference_row["step_ms"] / row["step_ms"]
        row["loss_rel_diff_vs_pytorch"] = abs(row["loss"] - reference_row["loss"]) / abs(reference_row["loss"])

    fast = next(r for r in rows if r["name"] == "glm_ext")
    goal_applies = on_cuda and preset == "large" and seq == 512 and dtype == torch.bfloat16
    goals = {
        "applies_to": "cuda, large preset, seq 512, bfloat16 (H100)",
        "applies_here": goal_applies,
        "speedup_vs_pytorch": GOAL_SPEEDUP,
        "mfu": GOAL_MFU,
        "speedup_met": fast["speedup_vs_pytorch"] >= GOAL_SPEEDUP,
        "mfu_met": None if fast["mfu"] is None else fast["mfu"] >= GOAL_MFU,
    }
    goals["all_met"] = bool(goals["speedup_met"] and goals["mfu_met"]) if goal_applies else None
    payload = {
        "benchmark": "model",
        "environment": env,
        "config": {
            "preset": preset, "model_config": config.to_dict(), "batch": batch_size, "seq": seq,
            "dtype": str(dtype).removeprefix("torch."),
            "precision": "fp32 weights, torch.autocast" if dtype != torch.float32 else "fp32",
            "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
            "warmup": args.warmup, "iters": args.iters, "seed": args.seed,
            "step": "zero grads (set to None), forward, lm_loss over Part B, backward; no optimizer update",
            "timing": ("CUDA events per step, L2 evicted before each, median" if on_cuda
                       else "time.perf_counter per step, median"),
            "flops_formula": "6 * N + 12 * layers * hidden * seq per token; N = layer parameters "
                             "+ vocab * hidden (tied output projection)",
            "flops_per_token": flops,
            "peak_flops": peak,
        },
        "rows": rows,
        "goals": goals,
    }
    print()
    print_table(rows, SUMMARY_COLUMNS)
    if goal_applies:
        print(f"\nGoal (>= {GOAL_SPEEDUP}x pytorch and >= {GOAL_MFU:.0%} MFU): "
              f"{'MET' if goals['all_met'] else 'NOT MET'}")
    print(f"results written to {write_results(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
