"""``glm-ext generate``: fill the blanks of contexts with a trained GLM (GLM_SPEC section 5)."""

from __future__ import annotations

import argparse

from glm_ext.cli.common import reports_errors


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="fill [MASK] blanks with a trained GLM",
        description="Fills every [MASK], [sMASK] and [gMASK] of each TEXT, in text order (GLM_SPEC 5).",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a run directory (glm-ext train --output-dir), a checkpoints/step-N directory "
                             "or a checkpoint (then with --tokenizer)")
    parser.add_argument("text", metavar="TEXT", nargs="+", help="context holding one or more mask tokens")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the run's copy)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per blank (default: 32)")
    parser.add_argument("--min-new-tokens", type=int, default=1,
                        help="per blank: <eop>/<eos> are not drawn before (default: 1; 0 allows empty blanks)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything for every token")
    parser.set_defaults(run=run)


def load_for_generation(path: str, tokenizer_path: str | None, device: str):
    """(model, tokenizer) from a run directory, a checkpoints/step-N directory or a checkpoint."""
    from glm_ext.checkpoint import load_checkpoint
    from glm_ext.run_dir import check_tokenizer, resolve_model_source
    from glm_ext.tokenizer import GLMTokenizer
    from glm_ext.training import resolve_device

    model_dir, default_tokenizer = resolve_model_source(path)
    tokenizer_path = tokenizer_path or default_tokenizer
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path} is a bare checkpoint: pass --tokenizer")
    tokenizer = GLMTokenizer.from_file(tokenizer_path)
    check_tokenizer(model_dir, tokenizer.sha256, tokenizer_path)
    model = load_checkpoint(model_dir, map_location=resolve_device(device))
    return model, tokenizer


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def print_fill(context: str, result, expected: str | None = None) -> None:
    """Prints a context, its filled text and each blank (and, in the demo, what the corpus has there)."""
    print(f"  context: {_one_line(context)}")
    print(f"  filled:  {_one_line(result.text)}")
    for i, blank in enumerate(result.blanks, 1):
        print(f"           blank {i}: {blank.text!r} (ended by {blank.stop})")
    if expected is not None:
        print(f"           the corpus has: {expected!r}")


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.generation import fill_blanks

    model, tokenizer = load_for_generation(args.model, args.tokenizer, args.device)
    for text in args.text:
        result = fill_blanks(
            model, tokenizer, text, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            use_cache=not args.no_cache,
        )
        print_fill(text, result)
    return 0
