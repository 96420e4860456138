"""Benchmark of multi-token cloze scoring in its two layouts (``glm_ext.tasks.cloze.score_encoded``):
the authors' one row per candidate (Part A repeated, many examples per batch) against Part A of
many examples encoded in one pass and then shared, per example, by all its candidates through
``SharedContextCache`` (one extra pass per example: a candidate pass cannot mix examples).

Both run in the same process on the same examples (random ids, a random float32 model, hidden
256, 4 layers) and must give the same scores (``max diff``). Workloads: COPA-like (16 examples,
24-token context, 2 candidates of 6 tokens) and ReCoRD-like (16 examples, 320-token passage, 16
entity candidates of 3 tokens). Reports median ms, the tokens each layout runs through the model,
and ``shared/rows`` (above 1: the authors' layout is faster).

Figures (CPU, one thread, on a loaded 2-core machine; rerun to refresh)::

    workload      rows ms  shared ms  rows tokens  shared tokens  shared/rows  max diff
    copa-like       256.0      329.3         1088            656         1.29   2.4e-06
    record-like   28816.5     2051.5        83712           6192         0.07   0.0e+00

On the CPU the time follows the tokens, plus a per-pass cost that makes the per-example passes
lose where candidates are few (COPA); on a GPU that per-pass cost (kernel launches) is larger.
Sharing wins by the token ratio where many candidates read a long passage (ReCoRD: 14x). Hence
the default: the authors' rows, and a shared Part A for examples whose rows would run at least
``SHARE_CONTEXT_RATIO`` (3) times the tokens.

Usage: python benchmarks/bench_cloze.py [--device cpu] [--threads 1] [--iters 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import default_device, environment_info, print_table, select_device, time_fn, write_results
from glm_ext.model import GLMConfig, GLMModel
from glm_ext.tasks.cloze import EncodedCloze, build_cloze_batch, score_encoded

SPECIAL = dict(pad=0, eos=1, cls=2, sep=3, mask=4, smask=5, gmask=6, sop=7, eop=8, unk=9)


class _Special:
    def __init__(self) -> None:
        self.__dict__.update(SPECIAL)


def make_examples(count, context, candidates, answer, vocab, generator):
    examples = []
    for _ in range(count):
        part_a = [SPECIAL["cls"], *torch.randint(10, vocab, (context,), generator=generator).tolist(),
                  SPECIAL["mask"], SPECIAL["eos"]]
        answers = [(*torch.randint(10, vocab, (answer,), generator=generator).tolist(), SPECIAL["eop"])
                   for _ in range(candidates)]
        examples.append(EncodedCloze(tuple(part_a), len(part_a) - 2, tuple(answers), True, None, False))
    return examples


WORKLOADS = {  # name: (examples, context tokens, candidates, answer tokens)
    "copa-like": (16, 24, 2, 6),
    "record-like": (16, 320, 16, 3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.manual_seed(0)
    config = GLMConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, max_sequence_length=512)
    model = GLMModel(config).to(device)
    generator = torch.Generator().manual_seed(0)
    special = _Special()
    results = []
    for name, (count, context, candidates, answer) in WORKLOADS.items():
        examples = make_examples(count, context, candidates, answer, config.vocab_size, generator)
        rows_tokens = build_cloze_batch(examples, special).scoring.input_ids.numel()

        def rows():
            return score_encoded(model, examples, special, share_context=False, max_tokens=1 << 20)

        def shared():
            return score_encoded(model, examples, special, share_context=True, max_tokens=1 << 20)

        difference = max(abs(a - b) for x, y in zip(rows(), shared()) for a, b in zip(x.scores, y.scores))
        rows_time = time_fn(rows, device, warmup=1, iters=args.iters)["median_ms"]
        shared_time = time_fn(shared, device, warmup=1, iters=args.iters)["median_ms"]
        shared_tokens = sum(len(x.part_a) + len(x.answers) * max(len(a) for a in x.answers) for x in examples)
        result = dict(workload=name, rows_ms=rows_time, shared_ms=shared_time, rows_tokens=rows_tokens,
                      shared_tokens=shared_tokens, ratio=shared_time / rows_time, max_score_difference=difference)
        results.append(result)
    print_table(results, ["workload", ("rows_ms", "rows ms", ".1f"), ("shared_ms", "shared ms", ".1f"),
                          ("rows_tokens", "rows tokens"), ("shared_tokens", "shared tokens"),
                          ("ratio", "shared/rows", ".2f"), ("max_score_difference", "max diff", ".1e")])
    if args.out:
        write_results(args.out, {"environment": environment_info(device), "results": results})


if __name__ == "__main__":
    main()
