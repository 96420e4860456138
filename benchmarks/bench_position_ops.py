"""Benchmark of glm_ext's 2D position ops (embedding_2d, rotary_2d), forward and backward.

Every case times, in the same run and in interleaved rounds (every implementation's forward and
backward once per round, so that a burst of load on a shared machine hits all of them alike; the
best round is kept, medians too): glm_ext, the eager reference (``glm_ext.reference``) and
``torch.compile`` of that reference. It reports ms, achieved GB/s (minimal bytes the op must move,
below), the percentage of the device copy bandwidth measured in the same run, the speedups
``peer_ms / glm_ext_ms`` and the machine's load averages, prints a summary table last and writes
everything to JSON.

Goals. CUDA (the H100 is the target): forward and backward of both ops reach at least 80% of the
copy bandwidth and beat ``torch.compile`` of the reference. CPU: embedding_2d's forward at least
as fast as ``torch.compile``, its (deterministic) backward at least as fast as eager PyTorch; the
other CPU columns are for information.

Minimal bytes (GB = 1e9 bytes), with T tokens, H hidden, ``es`` the float element size and ``ib``
the id element size:
  embedding_2d forward:  3 gathered rows read + output written + 3 ids  = T*(4*H*es + 3*ib)
  embedding_2d backward: grad_output read + the three dense gradient tables written + 3 ids
                         = T*H*es + (vocab + pos_rows + block_rows)*H*es + 3*T*ib
  rotary_2d fwd/bwd:     x (or grad_output) read + result written + 2 ids = 2*T*heads*hd*es + 2*T*ib
The embedding forward model counts every gathered row once per token, although the small
position/block tables are largely served from cache: its GB/s is an effective rate.

Forward is the training forward (float inputs require grad), the same for all three
implementations, so one compiled graph serves both directions. Backward: before every timed
iteration, untimed, the forward runs afresh (``time_fn``'s setup); the timed region is
``torch.autograd.grad(out, float_inputs, grad_output)`` alone, which runs only the backward nodes
and frees the graph, as in training. This times the three implementations the same way (the eager
and compiled references have no backward op to call directly), and unlike ``retain_graph=True``
on one graph it also works for ``torch.compile``, whose backward donates its saved buffers. For
glm_ext the timed region is the registered ``glm_ext::embedding_2d_backward`` /
``rotary_2d_backward`` op plus the autograd engine's fixed per-call overhead, which the peers pay
as well.

Usage (from the repository root):
  python benchmarks/bench_position_ops.py                       # cuda if available, else cpu
  python benchmarks/bench_position_ops.py --quick --device cpu  # CI / CPU smoke test
  python benchmarks/bench_position_ops.py --ops rotary_2d --no-compile --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import glm_ext
from glm_ext import ops, reference
from benchmarks.common import (
    copy_bandwidth_gbs,
    default_device,
    environment_info,
    interleaved,
    load_averages,
    print_table,
    select_device,
    time_fn,
    write_results,
)

OPS = ("embedding_2d", "rotary_2d")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Relative error (max |ours - eager| / max |eager|) above which a row is flagged as wrong. glm_ext
# sums in float32 and rounds once, the eager reference rounds after every add: 16-bit results
# may differ by a few ulps.
REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}
VOCAB = 50304
BW_GOAL = 0.80

# --------------------------------------------------------------------------------------------
# Shapes


def embedding_cases(device_kind: str, quick: bool) -> list[dict[str, int]]:
    if quick:
        return [dict(batch=2, seq=256, hidden=256, vocab=8192)]
    if device_kind == "cuda":
        return [
            dict(batch=b, seq=s, hidden=h, vocab=VOCAB)
            for (b, s) in ((8, 512), (16, 1024), (4, 4096))
            for h in (1024, 4096)
        ]
    return [dict(batch=4, seq=512, hidden=h, vocab=VOCAB) for h in (1024, 2048)]


def rotary_cases(device_kind: str, quick: bool) -> list[dict[str, Any]]:
    if quick:
        batch_seq, head_cfgs = [(2, 256)], [(16, 128), (32, 64)]
    elif device_kind == "cuda":
        batch_seq, head_cfgs = [(8, 512), (16, 1024), (4, 4096)], [(16, 128), (32, 64)]
    else:
        batch_seq, head_cfgs = [(4, 512)], [(16, 128), (32, 64)]
    cases = []
    for b, s in batch_seq:
        for h, d in head_cfgs:
            cases.append(dict(batch=b, seq=s, heads=h, head_dim=d, qkv_view=False))
        # q of a fused QKV projection [b, s, 3*heads*hd]: a strided view, no copy.
        h, d = head_cfgs[0]
        cases.append(dict(batch=b, seq=s, heads=h, head_dim=d, qkv_view=True))
    return cases


def glm_position_ids(
    batch: int, seq: int, gen: torch.Generator, part_a_fraction: float = 0.75, max_span: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-like 2D positions [batch, seq] (int64, CPU).

    Part A (first ~75%): positions 0..a-1, block position 0. Part B: spans of 1..max_span tokens,
    each repeating the position of its [MASK] in Part A, with block positions 1..len.
    """
    part_a = max(1, min(seq, round(seq * part_a_fraction)))
    pos = torch.empty(batch, seq, dtype=torch.long)
    block = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        pos[b, :part_a] = torch.arange(part_a)
        t = part_a
        while t < seq:
            length = int(torch.randint(1, min(max_span, seq - t) + 1, (1,), generator=gen))
            pos[b, t : t + length] = int(torch.randint(0, part_a, (1,), generator=gen))
            block[b, t : t + length] = torch.arange(1, length + 1)
            t += length
    return pos, block


# --------------------------------------------------------------------------------------------
# One case


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def _gbs(nbytes: int, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One shape of one op: the inputs, the three implementations and the byte counts."""

    def __init__(
        self,
        op: str,
        label: str,
        shape: dict[str, Any],
        inputs: tuple,
        float_inputs: Sequence[int],
        ours: Callable,
        ours_checked: Callable | None,
        ref: Callable,
        bytes_fwd: int,
        bytes_bwd: int,
    ):
        self.op, self.label, self.shape = op, label, shape
        self.inputs, self.float_inputs = inputs, list(float_inputs)
        self.ours, self.ours_checked, self.ref = ours, ours_checked, ref
        self.bytes = {"forward": bytes_fwd, "backward": bytes_bwd}


def make_embedding_case(cfg: dict[str, int], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Case:
    b, s, h, vocab = cfg["batch"], cfg["seq"], cfg["hidden"], cfg["vocab"]
    input_ids = torch.randint(0, vocab, (b, s), generator=gen)
    pos, block = glm_position_ids(b, s, gen)
    ids = [t.to(device) for t in (input_ids, pos, block)]
    rows = (vocab, s + 1, s + 1)
    tables = [
        torch.randn(r, h, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
        for r in rows
    ]
    tokens, es, ib = b * s, dtype.itemsize, ids[0].element_size()
    return Case(
        op="embedding_2d",
        label=f"b{b} s{s} h{h}",
        shape=dict(cfg, position_rows=rows[1], block_position_rows=rows[2], tokens=tokens),
        inputs=(*ids, *tables),
        float_inputs=(3, 4, 5),
        ours=lambda *a: ops.embedding_2d(*a, check_ids=False),
        ours_checked=lambda *a: ops.embedding_2d(*a, check_ids=True),
        ref=reference.embedding_2d,
        bytes_fwd=tokens * (4 * h * es + 3 * ib),
        bytes_bwd=tokens * h * es + sum(rows) * h * es + 3 * tokens * ib,
    )


def make_rotary_case(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Case:
    b, s, h, d = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"]
    pos, block = (t.to(device) for t in glm_position_ids(b, s, gen))
    if cfg["qkv_view"]:
        qkv = torch.randn(b, s, 3 * h * d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        x = qkv[..., : h * d].view(b, s, h, d).detach().requires_grad_()  # strided leaf, no copy
        assert not x.is_contiguous()
    else:
        x = torch.randn(b, s, h, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        x.requires_grad_()
    tokens, es, ib = b * s, dtype.itemsize, pos.element_size()
    moved = 2 * tokens * h * d * es + 2 * tokens * ib
    return Case(
        op="rotary_2d",
        label=f"b{b} s{s} h{h} d{d}" + (" qkv-view" if cfg["qkv_view"] else ""),
        shape=dict(cfg, tokens=tokens),
        inputs=(x, pos, block),
        float_inputs=(0,),
        ours=ops.rotary_2d,
        ours_checked=None,
        ref=reference.rotary_2d,
        bytes_fwd=moved,
        bytes_bwd=moved,
    )


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def run_case(case: Case, device: torch.device, args: argparse.Namespace, copy_gbs: float) -> list[dict[str, Any]]:
    inputs = case.inputs
    wrt = [inputs[i] for i in case.float_inputs]
    errors: dict[str, dict[str, str]] = {"forward": {}, "backward": {}}
    info: dict[str, Any] = {}

    def forward_ms(fn: Callable) -> Callable[[], float]:
        return lambda: time_fn(lambda: fn(*inputs), device, warmup=0, iters=1)["median_ms"]

    def backward_ms(fn: Callable, grad_out: torch.Tensor) -> Callable[[], float]:
        # setup (untimed) runs the forward and hands its output to the timed backward.
        return lambda: time_fn(lambda out: torch.autograd.grad(out, wrt, grad_out), device, warmup=0, iters=1,
                               setup=lambda: (fn(*inputs),))["median_ms"]

    # glm_ext and the eager reference.
    out_ours = case.ours(*inputs)
    out_ref = case.ref(*inputs)
    info["forward_rel_err"] = _rel_err(out_ours.detach(), out_ref.detach())
    grad_out = torch.randn(out_ours.shape, dtype=torch.float32, device="cpu").to(device=device, dtype=out_ours.dtype)
    grads_ours = torch.autograd.grad(case.ours(*inputs), wrt, grad_out)
    grads_ref = torch.autograd.grad(case.ref(*inputs), wrt, grad_out)
    info["backward_rel_err"] = max(_rel_err(a, b) for a, b in zip(grads_ours, grads_ref))
    del out_ours, out_ref, grads_ours, grads_ref
    impls: dict[str, Callable] = {"glm_ext": case.ours, "eager": case.ref}
    if case.ours_checked is not None:
        impls["glm_ext_checked"] = case.ours_checked

    # torch.compile of the reference: compiled once for this shape (static), warmed up first.
    if not args.no_compile:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no shape reuse
        compiled = torch.compile(case.ref, dynamic=False)
        try:
            t0 = time.perf_counter()
            out = compiled(*inputs)
            _sync(device)
            info["compile_forward_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            torch.autograd.grad(out, wrt, grad_out)
            _sync(device)
            info["compile_backward_s"] = time.perf_counter() - t0
            del out
            impls["compile"] = compiled
        except Exception as exc:  # noqa: BLE001  (record and go on)
            errors["forward"]["compile"] = errors["backward"]["compile"] = _error_text(exc)
            if args.verbose:
                traceback.print_exc()

    # Interleaved rounds: every implementation's forward and backward once per round.
    measures: dict[str, Callable[[], float]] = {}
    for name, fn in impls.items():
        measures[f"forward:{name}"] = forward_ms(fn)
        if name != "glm_ext_checked":
            measures[f"backward:{name}"] = backward_ms(fn, grad_out)
    for measure in measures.values():  # warm-up
        for _ in range(args.warmup):
            measure()
    results = interleaved(measures, args.rounds)
    timings: dict[str, dict[str, dict | None]] = {"forward": {}, "backward": {}}
    for key, result in results.items():
        direction, name = key.split(":")
        if "error" in result:
            errors[direction][name] = result["error"]
        else:
            timings[direction][name] = result

    rows = []
    for direction in ("forward", "backward"):
        t = timings[direction]
        nbytes = case.bytes[direction]
        ms = {k: v["best_ms"] for k, v in t.items()}
        ours_ms = ms["glm_ext"]
        ours_gbs = _gbs(nbytes, ours_ms)
        pct = 100.0 * ours_gbs / copy_gbs if ours_gbs and copy_gbs else None
        compile_ms = ms.get("compile")
        rel_err = info[f"{direction}_rel_err"]
        row = {
            "op": case.op,
            "case": case.label,
            "direction": direction,
            "shape": case.shape,
            "bytes": nbytes,
            "glm_ms": ours_ms,
            "glm_checked_ms": ms.get("glm_ext_checked"),
            "eager_ms": ms["eager"],
            "compile_ms": compile_ms,
            "glm_gbs": ours_gbs,
            "eager_gbs": _gbs(nbytes, ms["eager"]),
            "compile_gbs": _gbs(nbytes, compile_ms),
            "glm_pct_copy": pct,
            "speedup_vs_eager": ms["eager"] / ours_ms,
            "speedup_vs_compile": compile_ms / ours_ms if compile_ms else None,
            "median_speedup_vs_eager": t["eager"]["median_ms"] / t["glm_ext"]["median_ms"],
            "median_speedup_vs_compile": (t["compile"]["median_ms"] / t["glm_ext"]["median_ms"]
                                          if "compile" in t else None),
            "rel_err_vs_eager": rel_err,
            "correct": rel_err <= REL_TOL.get(inputs[case.float_inputs[0]].dtype, 1e-2),
            "timings": t,
            "compile_error": errors[direction].get("compile"),
            "compile_first_call_s": info.get(f"compile_{direction}_s"),
            # Goals (apply on CUDA only; computed everywhere, see payload["goals"]).
            "goal_bw": None if pct is None else pct >= 100.0 * BW_GOAL,
            "goal_beats_compile": None if compile_ms is None else compile_ms > ours_ms,
        }
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Main

# CPU goals: embedding_2d's forward at least torch.compile's speed, its deterministic backward at
# least eager PyTorch's.
CPU_GOALS = (("embedding_2d", "forward", "compile", 1.0), ("embedding_2d", "backward", "eager", 1.0))


def cpu_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    for op, direction, peer, bound in CPU_GOALS:
        for r in rows:
            if r["op"] == op and r["direction"] == direction:
                speedup = r[f"speedup_vs_{peer}"]
                goals.append({"op": op, "case": r["case"], "direction": direction, "peer": peer, "goal_at_least": bound,
                              "speedup": speedup, "met": None if speedup is None else speedup >= bound})
    return goals



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="float dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations (CI / CPU smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/position_ops_<device-kind>.json)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to benchmark (default: both)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls of each measure (default depends on device/--quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds, best kept (default depends on device/--quick)")
    p.add_argument("--copy-mib", type=int, default=None, help="buffer size of the copy-bandwidth reference")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of compile failures")
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("op", "op"),
    ("case", "case"),
    ("direction", "dir"),
    ("glm_ms", "glm ms", ".4f"),
    ("glm_checked_ms", "checked ms", ".4f"),
    ("eager_ms", "eager ms", ".4f"),
    ("compile_ms", "compile ms", ".4f"),
    ("glm_gbs", "glm GB/s", ".1f"),
    ("glm_pct_copy", "% copy", ".1f"),
    ("speedup_vs_eager", "x eager", ".2f"),
    ("speedup_vs_compile", "x compile", ".2f"),
    ("goal_bw", ">=80% copy"),
    ("goal_beats_compile", "beats compile"),
    ("correct", "ok"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    on_cuda = device.type == "cuda"
    if args.warmup is None:
        args.warmup = 3 if args.quick else (10 if on_cuda else 3)
    if args.rounds is None:
        args.rounds = 10 if args.quick else (100 if on_cuda else 15)
    copy_mib = args.copy_mib or (1024 if on_cuda else (64 if args.quick else 256))
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"position_ops_{device.type}.json"

    env = environment_info(device)
    env["load_average_before"] = load_averages()
    print(f"glm_ext {glm_ext.__version__} on {env['device_name']} ({device}), dtype {dtype}, torch {torch.__version__}"
          f", {'quick' if args.quick else 'full'} run, warmup {args.warmup}, {args.rounds} interleaved rounds "
          f"(best kept), threads {torch.get_num_threads()}, load average {env['load_average_before']}"
          f"{', no torch.compile' if args.no_compile else ''}", flush=True)

    copy = copy_bandwidth_gbs(device, copy_mib * 2**20, warmup=args.warmup, iters=max(args.rounds // 2, 5))
    print(f"copy bandwidth: {copy['gbs']:.1f} GB/s ({copy['nbytes'] / 2**20:.0f} MiB dst.copy_(src), "
          f"{copy['median_ms']:.3f} ms)", flush=True)

    torch.manual_seed(args.seed)  # grad_output
    gen = torch.Generator().manual_seed(args.seed)  # inputs and ids, on the CPU: same on every device
    builders = []
    if "embedding_2d" in args.ops:
        builders += [(make_embedding_case, cfg) for cfg in embedding_cases(device.type, args.quick)]
    if "rotary_2d" in args.ops:
        builders += [(make_rotary_case, cfg) for cfg in rotary_cases(device.type, args.quick)]

    rows: list[dict[str, Any]] = []
    case_errors: list[dict[str, str]] = []
    t_start = time.perf_counter()
    for build, cfg in builders:
        case = None
        try:
            case = build(cfg, device, dtype, gen)
            print(f"\n[{case.op}] {case.label}", flush=True)
            case_rows = run_case(case, device, args, copy["gbs"])
        except Exception as exc:  # noqa: BLE001  (one broken case must not lose the others)
            name = f"{case.op} {case.label}" if case else f"{build.__name__} {cfg}"
            print(f"  FAILED: {_error_text(exc)}", flush=True)
            if args.verbose:
                traceback.print_exc()
            case_errors.append({"case": name, "error": _error_text(exc)})
            continue
        finally:
            del case
            if on_cuda:
                torch.cuda.empty_cache()
        for r in case_rows:
            extra = f", checked {r['glm_checked_ms']:.4f} ms" if r["glm_checked_ms"] is not None else ""
            comp = (f"compile {r['compile_ms']:.4f} ms (x{r['speedup_vs_compile']:.2f})" if r["compile_ms"]
                    else f"compile: {r['compile_error'] or 'skipped'}"[:200])
            bad = "" if r["correct"] else f" | MISMATCH vs eager, rel err {r['rel_err_vs_eager']:.2e}"
            print(f"  {r['direction']:8s} glm {r['glm_ms']:.4f} ms{extra} | {r['glm_gbs']:.1f} GB/s "
                  f"({r['glm_pct_copy']:.1f}% copy) | eager {r['eager_ms']:.4f} ms (x{r['speedup_vs_eager']:.2f}) | "
                  f"{comp}{bad}", flush=True)
        rows.extend(case_rows)

    env["load_average_after"] = load_averages()
    goal_rows = [
        {"op": r["op"], "case": r["case"], "direction": r["direction"],
         "bw_at_least_80pct_copy": r["goal_bw"], "beats_compile": r["goal_beats_compile"]}
        for r in rows
    ]
    checks = [g[k] for g in goal_rows for k in ("bw_at_least_80pct_copy", "beats_compile")]
    goals = {
        "applies_to": "cuda",
        "applies_here": on_cuda,
        "note": "Goals are set for CUDA (H100) only; on other devices they are reported for information.",
        "bandwidth_fraction_of_copy": BW_GOAL,
        "all_met": bool(checks) and all(c is True for c in checks) if on_cuda else None,
        "rows": goal_rows,
        "cpu": cpu_goals(rows) if not on_cuda else None,
    }
    payload = {
        "benchmark": "position_ops",
        "environment": env,
        "config": {
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "quick": args.quick,
            "ops": args.ops, "compile": not args.no_compile, "warmup": args.warmup, "rounds": args.rounds,
            "seed": args.seed, "threads": torch.get_num_threads(),
            "timing": ("interleaved rounds (every implementation's forward and backward once per round), best "
                       "round kept (medians too); "
                       + ("CUDA events, L2 evicted (2x L2 read) before each call" if on_cuda
                          else "time.perf_counter, L3 evicted (2x L3 read) before each call")),
            "backward_method": ("torch.autograd.grad(out, float_inputs, grad_output) timed alone; "
                                "the forward producing out runs untimed before each iteration"),
            "gb": 1e9,
        },
        "copy_bandwidth": copy,
        "rows": rows,
        "case_errors": case_errors,
        "goals": goals,
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\nSummary ({device}, {str(dtype).removeprefix('torch.')}, copy bandwidth {copy['gbs']:.1f} GB/s; "
          f"speedup = peer ms / glm ms; goal columns {'apply' if on_cuda else 'are CUDA goals, informational here'})")
    print_table(rows, SUMMARY_COLUMNS)
    if case_errors:
        print(f"\n{len(case_errors)} case(s) failed: " + "; ".join(e["case"] for e in case_errors))
    if on_cuda:
        print(f"\nCUDA goals (>= {BW_GOAL:.0%} of copy bandwidth and beats torch.compile, every row): "
              f"{'MET' if goals['all_met'] else 'NOT MET'}")
    else:
        print(f"\nCPU goals (load average {env['load_average_before']} before, {env['load_average_after']} after):")
        for goal in goals["cpu"]:
            state = "MET" if goal["met"] else "NOT MET" if goal["met"] is False else "not measured"
            print(f"  {goal['op']} {goal['case']} {goal['direction']} >= {goal['goal_at_least']}x {goal['peer']}: "
                  f"{state} (x{goal['speedup']:.2f})" if goal["speedup"] else f"  {goal['op']} {goal['case']}: {state}")
    path = write_results(out_path, payload)
    print(f"results written to {path}")
    return 1 if case_errors else 0


if __name__ == "__main__":
    sys.exit(main())
