"""Benchmark of glm_ext's mixed-mask attention (``ops.mixed_mask_attention``), forward and backward.

Every case (batch, seq, heads, head_dim, ``sep = round(fraction * seq)`` for every row) times
glm_ext and its peers in the same run, reports median ms, useful TFLOP/s and the speedups
``peer_ms / glm_ext_ms``, plus peak memory, and writes everything to JSON.

Peers. On the CPU:
  sdpa_math_dense  ``scaled_dot_product_attention`` forced to its math backend, dense boolean mask
                   (the issue's CPU peer: what plain PyTorch computes);
  sdpa_dense       SDPA with the dense mask and PyTorch's own choice of backend (its CPU flash
                   kernel), for information.
On CUDA (this path has NOT been run yet: written without a GPU, to be verified by the first GPU
session):
  sdpa_dense         SDPA with the dense boolean mask (PyTorch picks the backend);
  sdpa_split         the exact two-call split of the GLM mask for one ``sep`` per batch: Part A
                     queries over Part A keys without a mask, then Part B queries over all keys
                     with a lower-right causal mask (``torch.nn.attention.bias.causal_lower_right``);
  flex               FlexAttention (``torch.compile(flex_attention)``) with a block mask from
                     ``create_block_mask`` (its build time is reported separately, not timed);
  sdpa_flash_causal  SDPA's flash backend with ``is_causal=True``: a different (plain causal) mask,
                     the speed of light for comparison, not checked for correctness.
The dense mask is built once outside the timed region (the model builds it once per forward pass
for all layers).

Useful FLOPs (the visible part of the score matrix only, the same count for every implementation):
``4 * head_dim * heads * sum_b (L^2 + sep^2 + L - sep) / 2`` forward; backward 2.5x that.

Timing: ``benchmarks.common.time_fn`` (median; L2 / L3 evicted before every iteration). Backward:
the forward runs untimed before each iteration and ``torch.autograd.grad(out, (q, k, v), grad)``
is timed alone, as in bench_position_ops.

Peak memory: CUDA, ``torch.cuda.max_memory_allocated`` above the inputs; CPU, the peak resident
set (VmHWM, reset before the call through /proc/self/clear_refs) above the resident set before
one call, each implementation and sequence length in a fresh process after a warm-up (memory a
process freed earlier and kept would hide allocations). Memory does
not depend on ``sep`` for any implementation, so it is measured at the middle fraction only. The
growth exponent ``log(mem(seq_max) / mem(seq_min)) / log(seq_max / seq_min)`` is 1 for memory
linear in the sequence length and 2 for quadratic.

Goals: CPU, glm_ext's forward at least 2x faster than sdpa_math_dense at seq 1024 for every sep,
with memory that does not grow as seq^2 (growth exponent at most 1.25). The CUDA numbers are
reported for information here.

Usage (from the repository root):
  python benchmarks/bench_attention.py                        # cuda if available, else cpu
  python benchmarks/bench_attention.py --device cpu --quick   # smoke test
  python benchmarks/bench_attention.py --device cpu --no-memory --seqs 1024
"""

from __future__ import annotations

import argparse
import contextlib
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
from benchmarks.common import default_device, environment_info, print_table, select_device, time_fn, write_results
from glm_ext import ops, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_IMPLS = ("glm_ext", "sdpa_math_dense", "sdpa_dense")
CUDA_IMPLS = ("glm_ext", "sdpa_dense", "sdpa_split", "flex", "sdpa_flash_causal")
DIFFERENT_MASK = {"sdpa_flash_causal"}  # not the GLM mask: timed, never compared
GOAL_SPEEDUP_CPU = 2.0
GOAL_SPEEDUP_SEQ = 1024
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

        def math(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return _sdpa(q, k, v, attn_mask=mask)

        return math
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
# One case


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
    rows, ours_out, ours_grads = [], None, None
    for impl in impls:
        info: dict[str, Any] = {}
        row: dict[str, Any] = {"impl": impl, "case": f"b{batch} s{seq} h{heads} d{head_dim} sep{fraction:g}",
                               "seq": seq, "sep": sep_value, "sep_fraction": fraction, "useful_flops": flops}
        try:
            fn = make_impl(impl, sep, seq, device, info)
            t0 = time.perf_counter()
            out = fn(q, k, v)  # first call (compilation for flex), untimed
            grads = torch.autograd.grad(out, (q, k, v), grad)
            _sync(device)
            info["first_call_s"] = time.perf_counter() - t0
            if impl == "glm_ext":
                ours_out, ours_grads = out.detach(), [g.detach() for g in grads]
            elif impl not in DIFFERENT_MASK and ours_out is not None:
                row["rel_err_vs_glm_ext"] = max([_rel_err(out.detach(), ours_out)] +
                                                [_rel_err(g, o) for g, o in zip(grads, ours_grads)])
            del out, grads
            fwd = time_fn(lambda: fn(q, k, v), device, warmup=args.warmup, iters=args.iters)
            bwd = time_fn(lambda out: torch.autograd.grad(out, (q, k, v), grad), device, warmup=args.warmup,
                          iters=args.iters, setup=lambda: (fn(q, k, v),))
            row.update(forward_ms=fwd["median_ms"], backward_ms=bwd["median_ms"],
                       timings={"forward": fwd, "backward": bwd},
                       forward_tflops=flops / (fwd["median_ms"] * 1e-3) / 1e12,
                       backward_tflops=2.5 * flops / (bwd["median_ms"] * 1e-3) / 1e12, **info)
        except Exception as exc:  # noqa: BLE001  (one failing peer must not lose the others)
            row["error"] = _error_text(exc)
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        status = (f"fwd {row['forward_ms']:9.3f} ms ({row['forward_tflops']:.3f} TFLOP/s)  "
                  f"bwd {row['backward_ms']:9.3f} ms ({row['backward_tflops']:.3f} TFLOP/s)"
                  if "error" not in row else f"FAILED: {row['error'][:300]}")
        print(f"  {impl:18s} {status}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = next((r for r in rows if r["impl"] == "glm_ext" and "error" not in r), None)
    for row in rows:
        if ours is not None and "error" not in row and row["impl"] != "glm_ext":
            row["glm_forward_speedup"] = row["forward_ms"] / ours["forward_ms"]
            row["glm_backward_speedup"] = row["backward_ms"] / ours["backward_ms"]
        if "rel_err_vs_glm_ext" in row:
            row["correct"] = row["rel_err_vs_glm_ext"] <= REL_TOL.get(dtype, 1e-2)
    return rows


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/attention_<device-kind>.json)")
    p.add_argument("--seqs", type=int, nargs="+", default=None,
                   help="sequence lengths (default: 512 1024 2048 on the CPU, 1024 2048 4096 on CUDA)")
    p.add_argument("--sep-fractions", type=float, nargs="+", default=[0.0, 0.5, 0.85, 1.0],
                   help="sep / seq of every row (default: 0 0.5 0.85 1)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 2 on the CPU, 8 on CUDA)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: 8 on the CPU, 16 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default: 64 on the CPU, 128 on CUDA)")
    p.add_argument("--impls", nargs="+", default=None, help="implementations to run (default: all for the device)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: 1 CPU, 5 CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 5 CPU, 30 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory probe
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("case", "case"),
    ("impl", "impl"),
    ("forward_ms", "fwd ms", ".2f"),
    ("backward_ms", "bwd ms", ".2f"),
    ("forward_tflops", "fwd TFLOP/s", ".3f"),
    ("backward_tflops", "bwd TFLOP/s", ".3f"),
    ("glm_forward_speedup", "glm fwd x", ".2f"),
    ("glm_backward_speedup", "glm bwd x", ".2f"),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        return _run_memory_probe(args.memory_probe)
    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    seqs = args.seqs or ([256, 512] if args.quick else ([1024, 2048, 4096] if on_cuda else [512, 1024, 2048]))
    fractions = [0.0, 0.5] if args.quick and args.sep_fractions == [0.0, 0.5, 0.85, 1.0] else args.sep_fractions
    batch = args.batch or (8 if on_cuda else 2)
    heads = args.heads or (16 if on_cuda else 8)
    head_dim = args.head_dim or (128 if on_cuda else 64)
    impls = list(args.impls or (CUDA_IMPLS if on_cuda else CPU_IMPLS))
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "glm_ext::mixed_mask_attention", "CUDA" if on_cuda else "CPU")
    if not has_kernel and "glm_ext" in impls:
        print(f"glm_ext has no {device.type} kernel of mixed_mask_attention yet: timing the peers only", flush=True)
        impls.remove("glm_ext")
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    args.iters = args.iters or ((10 if args.quick else 30) if on_cuda else (3 if args.quick else 5))
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"attention_{device.type}.json"

    env = environment_info(device)
    print(f"glm_ext {glm_ext.__version__} mixed-mask attention on {env['device_name']} ({device}), "
          f"{str(dtype).removeprefix('torch.')}, batch {batch}, heads {heads}, head_dim {head_dim}, "
          f"seqs {seqs}, sep fractions {fractions}, warmup {args.warmup}, iters {args.iters}, "
          f"threads {torch.get_num_threads()}", flush=True)
    if on_cuda:
        print("NOTE: the CUDA path of this benchmark was written without a GPU and is unverified.", flush=True)

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seq in seqs:
        for fraction in fractions:
            cfg = dict(batch=batch, seq=seq, heads=heads, head_dim=head_dim, fraction=fraction)
            print(f"\n[seq {seq}, sep {round(fraction * seq)} ({fraction:g} of seq)]", flush=True)
            rows.extend(run_case(cfg, impls, device, dtype, args))

    memory_rows: list[dict[str, Any]] = []
    exponents: dict[str, float | None] = {}
    if not args.no_memory:
        mid = fractions[len(fractions) // 2]
        method = "CUDA allocator" if on_cuda else "fresh process per point, peak RSS"
        print(f"\nPeak memory (sep {mid:g} of seq; {method})", flush=True)
        for impl in impls:
            for seq in seqs:
                row: dict[str, Any] = {"impl": impl, "seq": seq, "sep_fraction": mid}
                try:
                    mem = measure_memory(impl, batch, seq, heads, head_dim, mid, device, dtype, args.threads)
                    row.update(forward_mib=mem["forward_bytes"] / 2**20, backward_mib=mem["backward_bytes"] / 2**20)
                    print(f"  {impl:18s} seq {seq:6d}: forward {row['forward_mib']:9.1f} MiB, "
                          f"backward {row['backward_mib']:9.1f} MiB", flush=True)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = _error_text(exc)
                    print(f"  {impl:18s} seq {seq:6d}: FAILED {row['error'][:300]}", flush=True)
                memory_rows.append(row)
            points = [r for r in memory_rows if r["impl"] == impl and "error" not in r]
            exponents[impl] = _growth_exponent(points)

    # Goals (CPU): forward >= 2x sdpa_math_dense at seq 1024 for every sep; memory growth exponent.
    speedups = [r["glm_forward_speedup"] for r in rows
                if r["impl"] == "sdpa_math_dense" and r["seq"] == GOAL_SPEEDUP_SEQ and "glm_forward_speedup" in r]
    exponent = exponents.get("glm_ext")
    goals = {
        "applies_to": "cpu",
        "applies_here": not on_cuda,
        "forward_speedup_vs_sdpa_math_dense_at_seq_1024": {
            "goal": GOAL_SPEEDUP_CPU, "min": min(speedups) if speedups else None,
            "met": (min(speedups) >= GOAL_SPEEDUP_CPU) if speedups else None,
        },
        "memory_growth_exponent": {
            "goal_at_most": GOAL_MEMORY_EXPONENT, "glm_ext": exponent, "peers": exponents,
            "met": None if exponent is None else exponent <= GOAL_MEMORY_EXPONENT,
        },
    }
    checks = [goals["forward_speedup_vs_sdpa_math_dense_at_seq_1024"]["met"], goals["memory_growth_exponent"]["met"]]
    goals["all_met"] = all(c is True for c in checks) if not on_cuda else None
    payload = {
        "benchmark": "attention",
        "environment": env,
        "config": {
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch": batch, "heads": heads,
            "head_dim": head_dim, "seqs": seqs, "sep_fractions": fractions, "impls": list(impls),
            "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "quick": args.quick,
            "flops": "useful: 4 * head_dim * heads * sum_b (L^2 + sep^2 + L - sep) / 2 forward, 2.5x backward",
            "timing": ("CUDA events per iteration, L2 evicted before each, median" if on_cuda
                       else "time.perf_counter per iteration, L3 evicted before each, median"),
            "backward_method": "torch.autograd.grad(out, (q, k, v), grad) timed alone; the forward runs untimed before",
            "memory_method": ("torch.cuda.max_memory_allocated above the allocated memory before the call" if on_cuda
                              else "VmHWM (reset) minus VmRSS around one call, a fresh process per point, "
                                   "after a warm-up"),
            "cuda_path_verified": False, "glm_ext_kernel_on_device": has_kernel,
        },
        "rows": rows,
        "memory": memory_rows,
        "goals": goals,
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\nSummary ({device}, {str(dtype).removeprefix('torch.')}; glm x = peer ms / glm_ext ms)")
    print_table(rows, SUMMARY_COLUMNS)
    if memory_rows:
        print()
        print_table(memory_rows, MEMORY_COLUMNS)
        print("memory growth exponents (1 linear, 2 quadratic): "
              + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in exponents.items()))
    if not on_cuda:
        s = goals["forward_speedup_vs_sdpa_math_dense_at_seq_1024"]
        m = goals["memory_growth_exponent"]
        print(f"\nCPU goals: forward >= {GOAL_SPEEDUP_CPU}x sdpa_math_dense at seq {GOAL_SPEEDUP_SEQ}: "
              f"{'MET' if s['met'] else 'NOT MET' if s['met'] is False else 'not measured'} (min {s['min']}); "
              f"memory growth exponent <= {GOAL_MEMORY_EXPONENT}: "
              f"{'MET' if m['met'] else 'NOT MET' if m['met'] is False else 'not measured'} ({m['glm_ext']})")
    path = write_results(out_path, payload)
    print(f"results written to {path}")
    return 1 if any("error" in r for r in rows if r["impl"] == "glm_ext") else 0


if __name__ == "__main__":
    sys.exit(main())
