"""Benchmark of glm_ext's mixed-mask attention (``ops.mixed_mask_attention``), forward and training
step (forward + backward), against its peers measured in the same run.

Every case (batch, seq, heads, head_dim, ``sep = round(fraction * seq)`` for every row) builds each
implementation, checks it against glm_ext, then times them in interleaved rounds (every round times
every implementation once, so that a burst of load on a shared machine hits all of them alike) and
keeps the best round (and the median) of each: ms, useful TFLOP/s and the speedups ``peer_ms /
glm_ext_ms``. Peak memory is measured separately; everything is written to JSON with the machine's
load averages before and after.

Peers on the CPU:
  sdpa_dense       ``scaled_dot_product_attention`` with the dense boolean mask and PyTorch's own
                   choice of backend (its CPU flash-attention kernel, which takes the mask);
  sdpa_math_dense  SDPA forced to its math backend with the dense mask (plain PyTorch);
  flex             FlexAttention (``torch.compile(flex_attention)``) with a block mask from
                   ``create_block_mask``; forward only (it has no CPU backward); the block mask is
                   built once, untimed (its build time is reported);
  compile          ``torch.compile`` of ``glm_ext.reference.mixed_mask_attention`` (dense mask,
                   softmax and products written in PyTorch), forward and backward.
On CUDA (this path has NOT been run yet: written without a GPU, to be verified by the first GPU
session): sdpa_dense; sdpa_split (the exact two-call split of the GLM mask for one ``sep`` per batch:
Part A queries over Part A keys, then Part B over all keys with ``causal_lower_right``); flex;
sdpa_flash_causal (SDPA's flash backend with ``is_causal=True``: a different, plain causal mask, the
speed of light for comparison, never checked for correctness).
The dense mask is built once outside the timed region (a model builds it once per forward pass).

Useful FLOPs (the visible part of the score matrix only, the same count for every implementation):
``4 * head_dim * heads * sum_b (L^2 + sep^2 + L - sep) / 2`` forward; backward 2.5x that, so a
backward exactly as efficient per useful FLOP as the forward takes 2.5x its time.

Model mode (CPU, on by default; ``--no-model`` skips it): one training step (forward, ``lm_loss``,
backward) of a 4-layer, hidden-512, 8-head GLM (vocab 1024) on 2 rows of 1024 tokens with
``sep = 512``, with ``attention_backend="fused"`` against ``"sdpa"`` (the same weights; everything
else the same), interleaved rounds, best of each.

Goals (CPU, float32, the thread count of the run, sep = L/2, every L in {1024, 2048, 4096} that was
run): glm_ext's forward at least 2x sdpa_dense, sdpa_math_dense and flex; forward + backward at
least 1.5x sdpa_dense and sdpa_math_dense; peak memory growing at most as L^1.25; the model step
with the fused backend at least 1.15x the sdpa backend.

Usage (from the repository root):
  python benchmarks/bench_attention.py --device cpu --threads 2        # the CPU goals
  python benchmarks/bench_attention.py --device cpu --quick            # smoke test
  python benchmarks/bench_attention.py --device cpu --seqs 1024 --no-memory --no-model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import glm_ext
from benchmarks.common import (
    default_device,
    environment_info,
    interleaved,
    load_averages,
    print_table,
    select_device,
    time_fn,
    write_results,
)
from glm_ext import ops, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_IMPLS = ("glm_ext", "sdpa_dense", "sdpa_math_dense", "flex", "compile")
CUDA_IMPLS = ("glm_ext", "sdpa_dense", "sdpa_split", "flex", "sdpa_flash_causal")
DIFFERENT_MASK = {"sdpa_flash_causal"}  # not the GLM mask: timed, never compared
FORWARD_ONLY_CPU = {"flex"}  # FlexAttention has no CPU backward
DENSE_IMPLS = {"sdpa_dense", "sdpa_math_dense", "compile"}  # materialise L x L (see --dense-max-seq)
GOALS_CPU = {"forward": ("sdpa_dense", "sdpa_math_dense", "flex"), "train": ("sdpa_dense", "sdpa_math_dense")}
GOAL_FORWARD, GOAL_TRAIN, GOAL_MODEL = 2.0, 1.5, 1.15
GOAL_SEQS, GOAL_FRACTION = (1024, 2048, 4096), 0.5
GOAL_MEMORY_EXPONENT = 1.25
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# --------------------------------------------------------------------------------------------
# Implementations: fn(q, k, v) -> out, all [batch, seq, heads, head_dim]


def useful_flops(batch: int, seq: int, heads: int, head_dim: int, sep: int) -> float:
    return 4 * head_dim * heads * batch * (seq * seq + sep * sep + seq - sep) / 2


def _sdpa(q, k, v, **kwargs):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)


_COMPILED: dict[str, Callable] = {}


def make_impl(name: str, sep: torch.Tensor, seq: int, device: torch.device, info: dict[str, Any]) -> Callable:
    """The implementation ``name`` for one case; ``info`` receives one-time costs (mask builds)."""
    if name == "glm_ext":
        return lambda q, k, v: ops.mixed_mask_attention(q, k, v, sep)
    if name in ("sdpa_math_dense", "sdpa_dense"):
        mask = reference.mixed_mask(sep, seq, seq)[:, None]
        if name == "sdpa_dense":
            return lambda q, k, v: _sdpa(q, k, v, attn_mask=mask)

        def math_backend(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return _sdpa(q, k, v, attn_mask=mask)

        return math_backend
    if name == "compile":
        if "compile" not in _COMPILED:  # recompiled per shape, not per sep
            _COMPILED["compile"] = torch.compile(reference.mixed_mask_attention, dynamic=False)
        compiled = _COMPILED["compile"]
        return lambda q, k, v: compiled(q, k, v, sep)
    if name == "sdpa_split":
        from torch.nn.attention.bias import causal_lower_right

        split = int(sep[0])
        assert bool((sep == split).all()), "the two-call split needs one sep for the whole batch"

        def two_calls(q, k, v):
            parts = []
            if split > 0:  # Part A: bidirectional over Part A
                parts.append(_sdpa(q[:, :split], k[:, :split], v[:, :split]))
            if split < seq:  # Part B: all of Part A, causal over Part B (queries are the last L - sep)
                parts.append(_sdpa(q[:, split:], k, v, attn_mask=causal_lower_right(seq - split, seq)))
            return torch.cat(parts, dim=1)

        return two_calls
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        sep_d = sep.to(device)

        def glm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < sep_d[b]) | (kv_idx <= q_idx)

        _sync(device)
        t0 = time.perf_counter()
        block_mask = create_block_mask(glm_mask, B=sep.numel(), H=None, Q_LEN=seq, KV_LEN=seq, device=device)
        _sync(device)
        info["flex_block_mask_build_ms"] = (time.perf_counter() - t0) * 1e3
        if "flex" not in _COMPILED:  # one compiled function: recompiled per shape, not per sep
            _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
        compiled = _COMPILED["flex"]

        def flex(q, k, v):
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
            return out.transpose(1, 2)

        return flex
    if name == "sdpa_flash_causal":
        def flash_causal(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return _sdpa(q, k, v, is_causal=True)

        return flash_causal
    raise ValueError(f"unknown implementation {name!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch, seq, heads, head_dim, fraction, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same inputs on every device
    q, k, v = (
        torch.randn(batch, seq, heads, head_dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    sep = torch.full((batch,), round(fraction * seq), dtype=torch.int32, device=device)
    grad = torch.randn(batch, seq, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, sep, grad


# --------------------------------------------------------------------------------------------
# Peak memory


def memory_probe(impl: str, batch: int, seq: int, heads: int, head_dim: int, fraction: float, device_name: str,
                 dtype: torch.dtype) -> dict[str, float]:
    """Peak memory growth (bytes) of one forward and one backward of ``impl``. On the CPU this
    must run in a fresh process (see the module docstring)."""
    device = torch.device(device_name)
    info: dict[str, Any] = {}
    for warm_seq in (64, 64):  # one-time allocations (thread pools, the autograd engine)
        q, k, v, sep, grad = make_inputs(batch, warm_seq, heads, head_dim, fraction, device, dtype, 1)
        fn = make_impl(impl, sep, warm_seq, device, info)
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    q, k, v, sep, grad = make_inputs(batch, seq, heads, head_dim, fraction, device, dtype, 0)
    fn = make_impl(impl, sep, seq, device, info)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(q, k, v)
        _sync(device)
        forward = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        torch.autograd.grad(out, (q, k, v), grad)
        _sync(device)
        backward = torch.cuda.max_memory_allocated(device) - base
    else:
        before = _reset_peak_rss()
        out = fn(q, k, v)
        forward = _peak_rss() - before
        before = _reset_peak_rss()
        torch.autograd.grad(out, (q, k, v), grad)
        backward = _peak_rss() - before
    return {"forward_bytes": float(forward), "backward_bytes": float(backward)}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets the process's peak resident set to the current one (Linux: clear_refs 5) and
    returns it. Where that is refused, the peak is left alone: the measured growth is then a
    lower bound (zero when the process peaked higher earlier)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def measure_memory(impl, batch, seq, heads, head_dim, fraction, device, dtype, threads) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return memory_probe(impl, batch, seq, heads, head_dim, fraction, str(device), dtype)
    spec = dict(impl=impl, batch=batch, seq=seq, heads=heads, head_dim=head_dim, fraction=fraction,
                device=str(device), dtype=str(dtype).removeprefix("torch."), threads=threads)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)],
        capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run_memory_probe(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = memory_probe(spec["impl"], spec["batch"], spec["seq"], spec["heads"], spec["head_dim"],
                          spec["fraction"], spec["device"], DTYPES[spec["dtype"]])
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# Interleaved timing


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def run_case(cfg: dict[str, Any], impls: Sequence[str], device: torch.device, dtype: torch.dtype,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    batch, seq, heads, head_dim, fraction = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"], cfg["fraction"]
    q, k, v, sep, grad = make_inputs(batch, seq, heads, head_dim, fraction, device, dtype, args.seed)
    sep_value = int(sep[0])
    flops = useful_flops(batch, seq, heads, head_dim, sep_value)
    rows: dict[str, dict[str, Any]] = {}
    measures: dict[str, Callable[[], float]] = {}
    ours_out = ours_grads = None
    for impl in impls:
        row: dict[str, Any] = {"impl": impl, "case": f"b{batch} s{seq} h{heads} d{head_dim} sep{fraction:g}",
                               "seq": seq, "sep": sep_value, "sep_fraction": fraction, "useful_flops": flops}
        rows[impl] = row
        if impl in DENSE_IMPLS and seq > args.dense_max_seq:
            row["skipped"] = f"seq {seq} > --dense-max-seq {args.dense_max_seq}"
            continue
        info: dict[str, Any] = {}
        trains = not (device.type == "cpu" and impl in FORWARD_ONLY_CPU)
        try:
            fn = make_impl(impl, sep, seq, device, info)
            if not trains:  # inputs that require grad are refused
                fn = (lambda f: lambda q, k, v: f(q.detach(), k.detach(), v.detach()))(fn)
            t0 = time.perf_counter()
            out = fn(q, k, v)  # first call (compilation), untimed
            grads = torch.autograd.grad(out, (q, k, v), grad) if trains else None
            _sync(device)
            info["first_call_s"] = time.perf_counter() - t0
            if impl == "glm_ext":
                ours_out, ours_grads = out.detach(), [g.detach() for g in grads]
            elif impl not in DIFFERENT_MASK and ours_out is not None:
                errors = [_rel_err(out.detach(), ours_out)]
                if grads is not None:
                    errors += [_rel_err(g, o) for g, o in zip(grads, ours_grads)]
                row["rel_err_vs_glm_ext"] = max(errors)
                row["correct"] = row["rel_err_vs_glm_ext"] <= REL_TOL.get(dtype, 1e-2)
            del out, grads
            row.update(info)
        except Exception as exc:  # noqa: BLE001  (one failing peer must not lose the others)
            row["error"] = _error_text(exc)
            if args.verbose:
                traceback.print_exc()
            continue

        def forward(fn=fn):
            return time_fn(lambda: fn(q, k, v), device, warmup=0, iters=1)["median_ms"]

        def train(fn=fn):
            return time_fn(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), device, warmup=0,
                           iters=1)["median_ms"]

        forward()  # warm-up
        measures[f"{impl}:forward"] = forward
        if trains:
            train()
            measures[f"{impl}:train"] = train
    timings = interleaved(measures, args.rounds)
    for impl, row in rows.items():
        for kind in ("forward", "train"):
            t = timings.get(f"{impl}:{kind}")
            if t is None:
                continue
            if "error" in t:
                row.setdefault("error", t["error"])
                continue
            row[f"{kind}_ms"], row[f"{kind}_median_ms"], row[f"{kind}_rounds_ms"] = (
                t["best_ms"], t["median_ms"], t["rounds_ms"])
            row[f"{kind}_tflops"] = (1.0 if kind == "forward" else 3.5) * flops / (t["best_ms"] * 1e-3) / 1e12
    ours = rows.get("glm_ext", {})
    if "forward_ms" in ours and "train_ms" in ours:
        # Backward alone over forward alone: 2.5 when both are equally efficient per useful FLOP.
        ours["backward_over_forward"] = (ours["train_ms"] - ours["forward_ms"]) / ours["forward_ms"]
    for impl, row in rows.items():
        if impl == "glm_ext":
            continue
        for kind in ("forward", "train"):
            if f"{kind}_ms" in row and f"{kind}_ms" in ours:
                row[f"glm_{kind}_speedup"] = row[f"{kind}_ms"] / ours[f"{kind}_ms"]
                row[f"glm_{kind}_speedup_median"] = row[f"{kind}_median_ms"] / ours[f"{kind}_median_ms"]
    for row in rows.values():
        text = (f"fwd {row['forward_ms']:9.2f} ms" if "forward_ms" in row else "fwd         -   ")
        text += (f"  fwd+bwd {row['train_ms']:9.2f} ms" if "train_ms" in row else "  fwd+bwd        -   ")
        if "glm_forward_speedup" in row:
            text += f"  glm x{row['glm_forward_speedup']:.2f} fwd"
        if "glm_train_speedup" in row:
            text += f", x{row['glm_train_speedup']:.2f} fwd+bwd"
        if "error" in row or "skipped" in row:
            text = f"{'FAILED: ' + row['error'][:300] if 'error' in row else 'skipped: ' + row['skipped']}"
        print(f"  {row['impl']:16s} {text}", flush=True)
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# Model mode: a small GLM's training step with the fused attention against SDPA


MODEL = dict(vocab_size=1024, hidden_size=512, num_layers=4, num_heads=8, max_sequence_length=1024)
MODEL_BATCH, MODEL_SEQ = 2, 1024


def run_model(rounds: int, seed: int) -> dict[str, Any]:
    from glm_ext.model import GLMConfig, GLMModel, lm_loss

    gen = torch.Generator().manual_seed(seed)
    model = GLMModel(GLMConfig(**MODEL))
    ids = torch.randint(0, MODEL["vocab_size"], (MODEL_BATCH, MODEL_SEQ), generator=gen)
    targets = torch.randint(0, MODEL["vocab_size"], (MODEL_BATCH, MODEL_SEQ), generator=gen)
    sep = torch.full((MODEL_BATCH,), MODEL_SEQ // 2)
    index = torch.arange(MODEL_SEQ).expand(MODEL_BATCH, MODEL_SEQ)
    in_b = index >= sep[:, None]
    positions = torch.stack([torch.where(in_b, sep[:, None] - 1, index), torch.where(in_b, index - sep[:, None] + 1, 0)],
                            dim=1)

    def step(backend: str) -> float:
        model.attention_backend = backend
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        lm_loss(model(ids, positions, sep), targets, in_b.float()).backward()
        return (time.perf_counter() - t0) * 1e3

    for backend in ("fused", "sdpa"):
        step(backend)  # warm-up
    timings = interleaved({backend: (lambda b=backend: step(b)) for backend in ("fused", "sdpa")}, rounds)
    result: dict[str, Any] = {"model": MODEL, "batch": MODEL_BATCH, "seq": MODEL_SEQ, "sep": MODEL_SEQ // 2,
                              "step": "forward + lm_loss + backward, fp32", "timings": timings}
    if all("best_ms" in timings[b] for b in ("fused", "sdpa")):
        result["speedup"] = timings["sdpa"]["best_ms"] / timings["fused"]["best_ms"]
        result["min_of_medians"] = timings["sdpa"]["median_ms"] / timings["fused"]["median_ms"]
    return result


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds, no model step (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/attention_<device-kind>.json)")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default: 1024 2048 4096)")
    p.add_argument("--sep-fractions", type=float, nargs="+", default=[GOAL_FRACTION],
                   help="sep / seq of every row (default: 0.5)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on the CPU, 8 on CUDA)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: 8 on the CPU, 16 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default: 64 on the CPU, 128 on CUDA)")
    p.add_argument("--impls", nargs="+", default=None, help="implementations to run (default: all for the device)")
    p.add_argument("--dense-max-seq", type=int, default=4096,
                   help="longest seq for the peers that materialise seq x seq (default: 4096)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-model", action="store_true", help="skip the model-step comparison (CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds, best kept (default: 9)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory probe
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("case", "case"),
    ("impl", "impl"),
    ("forward_ms", "fwd ms", ".2f"),
    ("train_ms", "fwd+bwd ms", ".2f"),
    ("forward_tflops", "fwd TFLOP/s", ".3f"),
    ("train_tflops", "fwd+bwd TFLOP/s", ".3f"),
    ("glm_forward_speedup", "glm fwd x", ".2f"),
    ("glm_train_speedup", "glm fwd+bwd x", ".2f"),
    ("correct", "ok"),
]
MEMORY_COLUMNS = [
    ("seq", "seq"),
    ("impl", "impl"),
    ("forward_mib", "fwd peak MiB", ".1f"),
    ("backward_mib", "bwd peak MiB", ".1f"),
]


def _growth_exponent(points: list[dict[str, Any]]) -> float | None:
    """Worst of the forward and backward exponents between the shortest and longest sequence."""
    if len(points) < 2 or points[-1]["seq"] <= points[0]["seq"]:
        return None
    exponents = []
    for key in ("forward_mib", "backward_mib"):
        low, high = points[0][key], points[-1][key]
        if low <= 0 or high <= 0:
            return None
        exponents.append(math.log(high / low) / math.log(points[-1]["seq"] / points[0]["seq"]))
    return max(exponents)


def cpu_goals(rows: list[dict[str, Any]], exponent: float | None, model: dict[str, Any] | None) -> dict[str, Any]:
    """Each goal with the worst ratio over the goal's cases that were run, and whether it is met."""
    goals: dict[str, Any] = {}
    for kind, goal in (("forward", GOAL_FORWARD), ("train", GOAL_TRAIN)):
        for peer in GOALS_CPU[kind]:
            cases = [r for r in rows if r["impl"] == peer and r["sep_fraction"] == GOAL_FRACTION and r["seq"] in GOAL_SEQS]
            ratios = {r["seq"]: r.get(f"glm_{kind}_speedup") for r in cases}
            medians = {r["seq"]: r.get(f"glm_{kind}_speedup_median") for r in cases}
            measured = [x for x in ratios.values() if x is not None]
            measured_medians = [x for x in medians.values() if x is not None]
            goals[f"{kind}_vs_{peer}"] = {
                "goal_at_least": goal, "by_seq": ratios, "min": min(measured) if measured else None,
                "median_by_seq": medians, "min_of_medians": min(measured_medians) if measured_medians else None,
                "met": (min(measured) >= goal) if measured else None,
            }
    goals["memory_growth_exponent"] = {"goal_at_most": GOAL_MEMORY_EXPONENT, "glm_ext": exponent,
                                       "met": None if exponent is None else exponent <= GOAL_MEMORY_EXPONENT}
    speedup = (model or {}).get("speedup")
    goals["model_step_fused_vs_sdpa"] = {"goal_at_least": GOAL_MODEL, "speedup": speedup,
                                         "min_of_medians": (model or {}).get("min_of_medians"),
                                         "met": None if speedup is None else speedup >= GOAL_MODEL}
    measured_goals = [g["met"] for g in goals.values() if g["met"] is not None]
    goals["all_measured_met"] = all(measured_goals) if measured_goals else None
    return goals


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        return _run_memory_probe(args.memory_probe)
    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    seqs = args.seqs or ([256, 512] if args.quick else list(GOAL_SEQS))
    batch = args.batch or (8 if on_cuda else 1)
    heads = args.heads or (16 if on_cuda else 8)
    head_dim = args.head_dim or (128 if on_cuda else 64)
    impls = list(args.impls or (CUDA_IMPLS if on_cuda else CPU_IMPLS))
    args.rounds = args.rounds or (2 if args.quick else 9)
    run_model_step = not (on_cuda or args.quick or args.no_model)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "glm_ext::mixed_mask_attention", "CUDA" if on_cuda else "CPU")
    if not has_kernel and "glm_ext" in impls:
        print(f"glm_ext has no {device.type} kernel of mixed_mask_attention yet: timing the peers only", flush=True)
        impls.remove("glm_ext")
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"attention_{device.type}.json"

    env = environment_info(device)
    env["load_average_before"] = load_averages()
    print(f"glm_ext {glm_ext.__version__} mixed-mask attention on {env['device_name']} ({device}), "
          f"{str(dtype).removeprefix('torch.')}, batch {batch}, heads {heads}, head_dim {head_dim}, seqs {seqs}, "
          f"sep fractions {args.sep_fractions}, {args.rounds} interleaved rounds (best kept), "
          f"threads {torch.get_num_threads()}, load average {env['load_average_before']}", flush=True)
    if on_cuda:
        print("NOTE: the CUDA path of this benchmark was written without a GPU and is unverified.", flush=True)

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seq in seqs:
        for fraction in args.sep_fractions:
            cfg = dict(batch=batch, seq=seq, heads=heads, head_dim=head_dim, fraction=fraction)
            print(f"\n[seq {seq}, sep {round(fraction * seq)} ({fraction:g} of seq)]", flush=True)
            rows.extend(run_case(cfg, impls, device, dtype, args))

    model = None
    if run_model_step:
        print(f"\n[model step: {MODEL}, batch {MODEL_BATCH} x seq {MODEL_SEQ}, fused vs sdpa attention]", flush=True)
        model = run_model(args.rounds, args.seed)
        t = model["timings"]
        print("  " + ", ".join(f"{b} {t[b].get('best_ms', float('nan')):.0f} ms" for b in t)
              + (f": fused x{model['speedup']:.2f}" if "speedup" in model else ""), flush=True)

    memory_rows: list[dict[str, Any]] = []
    exponents: dict[str, float | None] = {}
    if not args.no_memory:
        mid = args.sep_fractions[len(args.sep_fractions) // 2]
        method = "CUDA allocator" if on_cuda else "fresh process per point, peak RSS"
        print(f"\nPeak memory (sep {mid:g} of seq; {method})", flush=True)
        for impl in [i for i in impls if i in ("glm_ext", "sdpa_dense")]:
            for seq in seqs:
                row: dict[str, Any] = {"impl": impl, "seq": seq, "sep_fraction": mid}
                try:
                    mem = measure_memory(impl, batch, seq, heads, head_dim, mid, device, dtype, args.threads)
                    row.update(forward_mib=mem["forward_bytes"] / 2**20, backward_mib=mem["backward_bytes"] / 2**20)
                    print(f"  {impl:16s} seq {seq:6d}: forward {row['forward_mib']:9.1f} MiB, "
                          f"backward {row['backward_mib']:9.1f} MiB", flush=True)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = _error_text(exc)
                    print(f"  {impl:16s} seq {seq:6d}: FAILED {row['error'][:300]}", flush=True)
                memory_rows.append(row)
            exponents[impl] = _growth_exponent([r for r in memory_rows if r["impl"] == impl and "error" not in r])

    env["load_average_after"] = load_averages()
    goals = cpu_goals(rows, exponents.get("glm_ext"), model) if not on_cuda else {"applies_to": "cpu"}
    payload = {
        "benchmark": "attention",
        "environment": env,
        "config": {
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch": batch, "heads": heads,
            "head_dim": head_dim, "seqs": seqs, "sep_fractions": args.sep_fractions, "impls": list(impls),
            "rounds": args.rounds, "seed": args.seed, "quick": args.quick, "dense_max_seq": args.dense_max_seq,
            "flops": "useful: 4 * head_dim * heads * sum_b (L^2 + sep^2 + L - sep) / 2 forward, 3.5x forward + backward",
            "timing": ("interleaved rounds (each implementation once per round), best round kept (median too); "
                       + ("CUDA events" if on_cuda else "time.perf_counter, L3 evicted before each call")),
            "train_method": "torch.autograd.grad(fn(q, k, v), (q, k, v), grad): forward + backward in one timed call",
            "memory_method": ("torch.cuda.max_memory_allocated above the allocated memory before the call" if on_cuda
                              else "VmHWM (reset) minus VmRSS around one call, a fresh process per point, "
                                   "after a warm-up"),
            "cuda_path_verified": False, "glm_ext_kernel_on_device": has_kernel,
        },
        "rows": rows,
        "model_step": model,
        "memory": memory_rows,
        "goals": goals,
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\nSummary ({device}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads; "
          f"glm x = peer ms / glm_ext ms, best of {args.rounds} interleaved rounds)")
    print_table(rows, SUMMARY_COLUMNS)
    ours = [r for r in rows if r["impl"] == "glm_ext" and "backward_over_forward" in r]
    if ours:
        print("glm_ext backward / forward time (2.5 = as efficient per useful FLOP): "
              + ", ".join(f"seq {r['seq']} {r['backward_over_forward']:.2f}" for r in ours))
    if memory_rows:
        print()
        print_table(memory_rows, MEMORY_COLUMNS)
        print("memory growth exponents (1 linear, 2 quadratic): "
              + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in exponents.items()))
    if not on_cuda:
        print(f"\nCPU goals (load average {env['load_average_before']} before, {env['load_average_after']} after):")
        for name, goal in goals.items():
            if isinstance(goal, dict):
                state = "MET" if goal["met"] else "NOT MET" if goal["met"] is False else "not measured"
                value = goal.get("min", goal.get("glm_ext", goal.get("speedup")))
                bound = goal.get("goal_at_least", goal.get("goal_at_most"))
                median = goal.get("min_of_medians")
                print(f"  {name:34s} {state:12s} {value if value is None else round(value, 2)} (goal {bound})"
                      + ("" if median is None else f"; ratio of medians {median:.2f}"))
    path = write_results(out_path, payload)
    print(f"results written to {path}")
    return 1 if any("error" in r for r in rows if r["impl"] == "glm_ext") else 0


if __name__ == "__main__":
    sys.exit(main())
