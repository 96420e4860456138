"""Benchmark of span-shuffle batching (``glm_ext.data.span_shuffle_batch``, GLM_SPEC section 1).

Times, in the same run and on ONE CPU thread (``torch.set_num_threads(1)``):

* glm_ext's span-shuffle op on CPU tensors: the token-level objective, and for information the
  sentence- and document-level objectives;
* a plain Python/numpy implementation of the token-level objective written for this benchmark
  (``PythonBlankInfilling`` below), done the way the authors' collator does it (THUDM/GLM
  ``blocklm_utils.ConstructBlockStrategy``): a ``random.Random`` rng, ``rng.choices`` over the
  truncated Poisson pmf for span lengths, ``sample_spans`` with ``rng.randrange``, assembly by
  ``np.concatenate`` and padding to the longest row. It differs only where the authors' code is
  wasteful for a reason of its own: padded rows are stacked with ``np.stack`` +
  ``torch.from_numpy`` (the authors call ``torch.tensor`` on a list of arrays, which is slower), so
  the baseline is, if anything, flattered.

Rows are the authors' pretraining format: ``[CLS]``, two documents each ending with ``<eos>``,
random GPT-2-sized token ids, a sentence end about every 16 tokens; batches of 64 rows of 512 and
of 1024 tokens. Every timed call draws a new batch (a new seed for glm_ext; the baseline's rng
runs on). Both implementations pad to the longest row of the batch (``output_length=0``).
Before timing, a few rows of each token-level implementation are checked against the rules
(Part A + spans give the row back; loss mask on Part B only; positions and block positions;
spans never over ``[CLS]``/``<eos>`` and never touching; coverage >= int(0.15 n)), and the mean
number of spans per row of both is reported: the same algorithm does the same amount of work.

Reported per case: median ms per batch (20th/80th percentiles in the JSON), rows/s, tokens/s
(input tokens: batch x length), the speedup over the baseline (token level, same length), spans
per row and the output width. Timing is ``benchmarks.common.time_fn``: median, with the
last-level cache evicted before each iteration (untimed), the benchmarks' convention. That also
leaves Python's and the dispatcher's code and data cold, a roughly fixed cost per call that weighs
on small batches, so glm_ext is timed a second time with back-to-back calls ("warm": the steady
throughput of a collate loop). The goal is judged on the first (cold) figure; both are reported.

Goal (the issue): at least 50 M tokens/s at 512 tokens per row for the token-level objective on
one CPU core (about 100x the authors' Python collator).

With ``--device cuda`` glm_ext runs on CUDA tensors (rows already on the GPU, CUDA events), and
the table also has glm_ext's CPU token-level rows (for the goal) and the CPU baseline (labelled).

Usage (from the repository root):
  python benchmarks/bench_batching.py --device cpu              # full CPU run
  python benchmarks/bench_batching.py --device cpu --quick      # CI smoke run
  python benchmarks/bench_batching.py --device cuda --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import glm_ext
from benchmarks.common import default_device, environment_info, print_table, select_device, time_fn, write_results
from glm_ext.data import BlankInfillingBatch, BlankInfillingConfig, span_shuffle_batch

# GPT-2 layout of GLM's special tokens (GLM_SPEC section 4); text ids are drawn from [100, 50000).
IDS = SimpleNamespace(pad=50256, eos=50256, sop=50257, eop=50258, cls=50259, mask=50260, gmask=50263, smask=50264)
VOCAB = 50304
SENTENCE_ENDS = (13, 30)  # "." and "?" in GPT-2's vocabulary
OBJECTIVE_PROBS = {"token": (1.0, 0.0, 0.0), "sentence": (0.0, 1.0, 0.0), "document": (0.0, 0.0, 1.0)}
GOAL_TOKENS_PER_S = 50e6
GOAL_LENGTH = 512


def make_rows(batch: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``[CLS]`` + two documents, each ending with ``<eos>``; a sentence end every ~16 tokens."""
    rows = rng.integers(100, 50000, size=(batch, length))
    ends = rng.random((batch, length)) < 1 / 16
    rows[ends] = rng.choice(SENTENCE_ENDS, size=int(ends.sum()))
    rows[:, 0] = IDS.cls
    rows[:, length // 2] = IDS.eos
    rows[:, -1] = IDS.eos
    return torch.from_numpy(rows)


# --------------------------------------------------------------------------------------------
# The baseline: the token-level objective in plain Python/numpy, the authors' way


class PythonBlankInfilling:
    """Token-level blank infilling of a batch of 1-D int64 numpy rows (the authors' collator)."""

    def __init__(self, ids: SimpleNamespace, config: BlankInfillingConfig, seed: int):
        self.ids, self.ratio, self.rng = ids, config.mask_ratio, random.Random(seed)
        lam, top = config.poisson_lambda, config.max_span_length
        self.span_lengths = list(range(1, top + 1))  # Poisson(lam) on 1..top; choices() renormalises
        self.weights = [math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in self.span_lengths]

    @staticmethod
    def sample_spans(span_lengths, total_length, rng, offset):
        """Places the spans uniformly in [offset, offset + total_length), in order, one token apart."""
        free = total_length - sum(span_lengths) - len(span_lengths) + 1
        places = sorted(rng.randrange(free + 1) for _ in span_lengths)
        spans = []
        for place, length in zip(places, span_lengths):
            spans.append((offset + place, offset + place + length))
            offset += length + 1
        return spans

    def row_spans(self, row):
        rng, n = self.rng, len(row)
        protected = np.flatnonzero((row == self.ids.cls) | (row == self.ids.eos)).tolist()
        bounds = [-1] + protected + [n]  # segments: runs between [CLS]/<eos>, shortest first
        segments = sorted(((a + 1, b - a - 1) for a, b in zip(bounds, bounds[1:]) if b - a > 1), key=lambda s: s[1])
        target = max(1, int(self.ratio * n))
        while True:  # the authors skip a row whose spans do not fit; here it is drawn again
            lengths, covered = [], 0
            while covered < target:
                lengths.append(rng.choices(self.span_lengths, weights=self.weights)[0])
                covered += lengths[-1]
            rng.shuffle(lengths)
            spans, used = [], 0
            for k, (offset, size) in enumerate(segments):
                longest, budget, count, total = k == len(segments) - 1, int(size * self.ratio), 0, 0
                while used + count < len(lengths):
                    length = lengths[used + count]
                    if (total + length + count > size) if longest else (total + length > budget):
                        break
                    total, count = total + length, count + 1
                if count:
                    spans += self.sample_spans(lengths[used : used + count], size, rng, offset)
                used += count
            if used == len(lengths):
                return sorted(spans)

    def make_row(self, row, spans):
        ids = self.ids
        position_ids = np.ones(len(row), dtype=np.int64)
        for start, end in spans:
            position_ids[start + 1 : end] = 0
        position_ids = np.cumsum(position_ids) - 1  # index in Part A
        source, source_positions, last = [], [], 0
        for start, end in spans:
            source += [row[last:start], [ids.mask]]
            source_positions += [position_ids[last:start], [position_ids[start]]]
            last = end
        source.append(row[last:])
        source_positions.append(position_ids[last:])
        order = list(spans)
        self.rng.shuffle(order)  # Part B in random order
        inputs_b, targets_b, positions_b, blocks_b = [], [], [], []
        for start, end in order:
            inputs_b += [[ids.sop], row[start:end]]
            targets_b += [row[start:end], [ids.eop]]
            positions_b.append(np.full(end - start + 1, position_ids[start]))
            blocks_b.append(np.arange(1, end - start + 2, dtype=np.int64))
        sep = sum(map(len, source))
        tokens = np.concatenate(source + inputs_b)
        targets = np.concatenate(source + targets_b)
        loss_mask = np.ones(len(tokens), dtype=np.int64)
        loss_mask[:sep] = 0
        positions = np.stack([np.concatenate(source_positions + positions_b),
                              np.concatenate([np.zeros(sep, dtype=np.int64)] + blocks_b)])
        return tokens, targets, loss_mask, positions, sep

    def __call__(self, rows: Sequence[np.ndarray]) -> BlankInfillingBatch:
        made = [self.make_row(row, self.row_spans(row)) for row in rows]
        width = max(len(m[0]) for m in made)  # pad_batch: to the longest row

        def pad(arrays, value):
            return torch.from_numpy(np.stack([
                np.concatenate((a, np.full(a.shape[:-1] + (width - a.shape[-1],), value, dtype=np.int64)), axis=-1)
                for a in arrays]))

        return BlankInfillingBatch(
            pad([m[0] for m in made], self.ids.pad), pad([m[1] for m in made], self.ids.pad),
            pad([m[2] for m in made], 0), pad([m[3] for m in made], 0),
            torch.tensor([m[4] for m in made], dtype=torch.int32))


def check_token_rows(batch: BlankInfillingBatch, rows: torch.Tensor, count: int, ratio: float) -> None:
    """Asserts the token-level rules (GLM_SPEC section 1) on the first ``count`` rows."""
    for i in range(min(count, rows.shape[0])):
        row, sep = rows[i].tolist(), int(batch.sep[i])
        tok, tgt, loss = batch.tokens[i].tolist(), batch.targets[i].tolist(), batch.loss_mask[i].tolist()
        pos, blk = batch.position_ids[i].tolist()
        end = sep + sum(loss)
        assert pos[:sep] == list(range(sep)) and not any(blk[:sep]) and not any(loss[:sep]) and tgt[:sep] == tok[:sep]
        assert all(loss[sep:end]) and set(tok[end:]) <= {IDS.pad} and not any(pos[end:] + blk[end:] + loss[end:])
        spans, k = {}, sep  # Part B: <sop> s1..sk -> s1..sk <eop>, at the mask's position
        while k < end:
            e = k + 1
            while e < end and blk[e] != 1:
                e += 1
            assert tok[k] == IDS.sop and blk[k:e] == list(range(1, e - k + 1)) and len(set(pos[k:e])) == 1
            assert tok[k + 1 : e] == tgt[k : e - 1] and tgt[e - 1] == IDS.eop
            spans[pos[k]] = tgt[k : e - 1]
            k = e
        masks = [p for p, t in enumerate(tok[:sep]) if t == IDS.mask]
        assert sorted(spans) == masks and all(b - a > 1 for a, b in zip(masks, masks[1:])), "one mask per span, apart"
        rebuilt = [x for p, t in enumerate(tok[:sep]) for x in (spans[p] if p in spans else [t])]
        assert rebuilt == row, "Part A with its spans filled in is the row"
        assert not any(t in (IDS.cls, IDS.eos) for s in spans.values() for t in s)
        assert sum(map(len, spans.values())) >= max(1, int(ratio * len(row))) and end == len(row) + 2 * len(spans)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="torch device for glm_ext (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="fewer rows and iterations (CI smoke run)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/batching_<device-kind>.json)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="tokens per input row")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 64, --quick 16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the goal is for 1)")
    p.add_argument("--warmup", type=int, default=None, help="glm_ext warm-up iterations")
    p.add_argument("--iters", type=int, default=None, help="glm_ext timed iterations")
    p.add_argument("--baseline-iters", type=int, default=None, help="timed iterations of the Python baseline")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


SUMMARY_COLUMNS = [
    ("impl", "impl"),
    ("device", "device"),
    ("objective", "objective"),
    ("length", "len"),
    ("batch", "rows"),
    ("median_ms", "ms/batch", ".3f"),
    ("rows_per_s", "rows/s", ",.0f"),
    ("mtokens_per_s", "M tok/s", ".2f"),
    ("warm_median_ms", "warm ms", ".3f"),
    ("warm_mtokens_per_s", "warm M tok/s", ".2f"),
    ("speedup_vs_baseline", "x baseline", ".1f"),
    ("spans_per_row", "spans/row", ".2f"),
    ("width", "width"),
    ("goal", "goal >=50M"),
    ("goal_warm", "goal warm"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    torch.set_num_threads(args.threads)
    on_cuda = device.type == "cuda"
    batch = args.batch or (16 if args.quick else 64)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    iters = args.iters or (20 if args.quick else 200)
    baseline_iters = args.baseline_iters or (3 if args.quick else 15)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"batching_{device.type}.json"

    env = environment_info(device)
    print(f"glm_ext {glm_ext.__version__} on {env['device_name']} ({device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s), {'quick' if args.quick else 'full'} run, {batch} rows/batch, "
          f"glm_ext warmup {warmup} iters {iters}, baseline iters {baseline_iters}", flush=True)

    # glm_ext runs on `device`; in a CUDA run its CPU token-level rows are timed as well (the goal).
    glm_cases = [(device, obj) for obj in OBJECTIVE_PROBS]
    if on_cuda:
        glm_cases.append((torch.device("cpu"), "token"))
    seeds = itertools.count(args.seed * 1_000_003 + 1)
    np_rng = np.random.default_rng(args.seed)
    results: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    for length in args.lengths:
        rows_cpu = make_rows(batch, length, np_rng)
        tokens_per_batch = batch * length

        def record(impl: str, dev: torch.device, objective: str, timing: dict, out: BlankInfillingBatch,
                   warm: dict | None = None) -> dict:
            ms = timing["median_ms"]
            row = {
                "impl": impl, "device": str(dev), "objective": objective, "length": length, "batch": batch,
                "median_ms": ms, "p20_ms": timing["p20_ms"], "p80_ms": timing["p80_ms"],
                "rows_per_s": batch / (ms * 1e-3), "tokens_per_s": tokens_per_batch / (ms * 1e-3),
                "mtokens_per_s": tokens_per_batch / (ms * 1e-3) / 1e6,
                "warm_median_ms": warm and warm["median_ms"], "warm_p20_ms": warm and warm["p20_ms"],
                "warm_p80_ms": warm and warm["p80_ms"],
                "warm_tokens_per_s": warm and tokens_per_batch / (warm["median_ms"] * 1e-3),
                "warm_mtokens_per_s": warm and tokens_per_batch / (warm["median_ms"] * 1e-3) / 1e6,
                "spans_per_row": (out.tokens == IDS.sop).sum(1).double().mean().item(),
                "width": int(out.tokens.shape[1]),
                "speedup_vs_baseline": None, "goal": None, "goal_warm": None,
            }
            extra = f" (warm {warm['median_ms']:.3f} ms, {row['warm_mtokens_per_s']:.2f} M tok/s)" if warm else ""
            print(f"  [{length}] {impl:28s} {objective:8s} {ms:9.3f} ms  {row['rows_per_s']:12,.0f} rows/s  "
                  f"{row['mtokens_per_s']:8.2f} M tok/s  {row['spans_per_row']:6.2f} spans/row{extra}", flush=True)
            results.append(row)
            return row

        # The baseline (CPU): rules checked once, then timed.
        config = BlankInfillingConfig()
        baseline = PythonBlankInfilling(IDS, config, seed=args.seed)
        rows_np = [r.numpy() for r in rows_cpu]
        check_rows = min(4, batch)
        check_token_rows(baseline(rows_np[:check_rows]), rows_cpu, check_rows, config.mask_ratio)
        t = time_fn(lambda: baseline(rows_np), "cpu", warmup=1, iters=baseline_iters)
        base = record("python/numpy baseline (CPU)", torch.device("cpu"), "token", t, baseline(rows_np))
        checks.append({"length": length, "impl": "baseline", "rows_checked": check_rows, "ok": True})

        for dev, objective in glm_cases:
            rows_dev = rows_cpu.to(dev)
            cfg = BlankInfillingConfig(objective_probs=OBJECTIVE_PROBS[objective])

            def run(seed: int, rows_dev=rows_dev, cfg=cfg) -> BlankInfillingBatch:
                return span_shuffle_batch(rows_dev, special_ids=IDS, vocab_size=VOCAB, sentence_end_ids=SENTENCE_ENDS,
                                          config=cfg, seed=seed)

            out = run(next(seeds))
            assert out.objective == objective, (out.objective, objective)
            if objective == "token":
                check_token_rows(out.to("cpu"), rows_cpu, 4, cfg.mask_ratio)
                checks.append({"length": length, "impl": f"glm_ext {dev}", "rows_checked": min(4, batch), "ok": True})
            t = time_fn(run, dev, warmup=warmup, iters=iters, setup=lambda: (next(seeds),))
            warm = time_fn(run, dev, warmup=warmup, iters=iters, setup=lambda: (next(seeds),), flush_cache=False)
            row = record(f"glm_ext ({dev.type})", dev, objective, t, out.to("cpu"), warm)
            if objective == "token":
                row["speedup_vs_baseline"] = base["median_ms"] / row["median_ms"]
                if dev.type == "cpu" and length == GOAL_LENGTH:
                    row["goal"] = row["tokens_per_s"] >= GOAL_TOKENS_PER_S
                    row["goal_warm"] = row["warm_tokens_per_s"] >= GOAL_TOKENS_PER_S

    goal_rows = [r for r in results if r["goal"] is not None]
    goal = {
        "description": f"glm_ext token level, {GOAL_LENGTH} tokens/row, one CPU thread: "
                       f">= {GOAL_TOKENS_PER_S / 1e6:.0f} M tokens/s (about 100x the authors' Python collator)",
        "threads": torch.get_num_threads(),
        "applies_here": bool(goal_rows) and torch.get_num_threads() == 1,
        "tokens_per_s": goal_rows[0]["tokens_per_s"] if goal_rows else None,
        "speedup_vs_baseline": goal_rows[0]["speedup_vs_baseline"] if goal_rows else None,
        "met": goal_rows[0]["goal"] if goal_rows else None,
        "warm_tokens_per_s": goal_rows[0]["warm_tokens_per_s"] if goal_rows else None,
        "met_warm": goal_rows[0]["goal_warm"] if goal_rows else None,
        "note": "met: caches evicted before each call (the benchmarks' convention); met_warm: back-to-back calls",
    }
    payload = {
        "benchmark": "batching",
        "environment": env,
        "config": {
            "device": str(device), "quick": args.quick, "lengths": args.lengths, "batch": batch,
            "threads": torch.get_num_threads(), "warmup": warmup, "iters": iters, "baseline_iters": baseline_iters,
            "seed": args.seed, "vocab_size": VOCAB, "special_ids": vars(IDS), "sentence_end_ids": SENTENCE_ENDS,
            "rows": ("[CLS] + 2 documents ending with <eos>, random ids in [100, 50000), "
                     "a sentence end every ~16 tokens"),
            "output_length": "longest row of the batch (both implementations)",
            "tokens_per_s": "input tokens (batch x length) per second",
            "timing": ("CUDA events per iteration (glm_ext on CUDA), time.perf_counter on the CPU; median; "
                       "last-level cache evicted before each iteration, untimed"),
            "baseline": "Python/numpy token-level collator written for this benchmark (the authors' method), CPU",
        },
        "rule_checks": checks,
        "rows": results,
        "goal": goal,
        "elapsed_s": time.perf_counter() - t_start,
    }

    print(f"\nSummary ({device}, {torch.get_num_threads()} CPU thread(s), {batch} rows/batch; tokens = input tokens; "
          f"x baseline = baseline ms / glm_ext ms at the same length; the baseline always runs on the CPU)")
    print_table(results, SUMMARY_COLUMNS)
    if goal["met"] is None:
        print(f"\nGoal ({goal['description']}): not measured (no {GOAL_LENGTH}-token rows)")
    else:
        note = "" if goal["applies_here"] else f" [measured with {goal['threads']} threads: informational]"
        verdict = {True: "MET", False: "NOT MET"}
        print(f"\nGoal ({goal['description']}): {goal['tokens_per_s'] / 1e6:.1f} M tokens/s with caches evicted "
              f"before each call (x{goal['speedup_vs_baseline']:.0f} the baseline): {verdict[goal['met']]}; "
              f"back-to-back calls: {goal['warm_tokens_per_s'] / 1e6:.1f} M tokens/s: "
              f"{verdict[goal['met_warm']]}{note}")
    path = write_results(out_path, payload)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
