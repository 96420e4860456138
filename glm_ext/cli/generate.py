"""``glm-ext generate``: fill the blanks of contexts with a trained GLM (GLM_SPEC section 5).

Contexts come from the TEXT arguments, from ``--input FILE`` (``-``: stdin) or, when neither is
given, from stdin; ``--interactive`` asks for them one at a time instead. Input files: plain text
holds one context per line; JSONL (``.jsonl`` / ``.ndjson``, or ``--input-format jsonl``) one JSON
object per line whose ``text`` field is the context (its other fields are kept). Empty lines are
skipped. Every context is checked before any is decoded (errors name the line).

Output: ``--output FILE`` (``-``: stdout) writes one JSON object per context, in input order: the
input's fields (``text``: the context) plus ``filled`` (the text with every blank filled) and
``blanks`` (each blank's ``text``, ``token_ids``, ``stop``, ``mask``, ``position`` in the encoded
context and, with beam search, ``score``). The file appears complete or not at all (an existing
file is replaced only with ``--overwrite``). Without ``--output`` the results are printed for
reading; on a terminal each blank's text appears as it is decoded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from glm_ext.cli.common import error, reports_errors

JSONL_SUFFIXES = (".jsonl", ".ndjson")

#: GenerationConfig field -> the option that sets it (used to name options in error messages).
SETTING_OPTIONS = {
    "max_new_tokens": "--max-new-tokens",
    "min_new_tokens": "--min-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "stop_strings": "--stop",
    "stop_token_ids": "--stop-token-id",
    "num_beams": "--num-beams",
    "length_penalty": "--length-penalty",
    "early_stopping": "--early-stopping",
    "seed": "--seed",
}


def _limits(text: str) -> int | tuple[int, ...]:
    """``--max-new-tokens``: one int, or comma-separated ints (one per blank)."""
    values = [int(part) for part in text.split(",")]
    return values[0] if len(values) == 1 else tuple(values)


def add_parser(commands) -> None:
    from glm_ext.generation import GENERATION_PRESETS

    parser = commands.add_parser(
        "generate", help="fill [MASK] blanks with a trained GLM",
        description="Fills every [MASK], [sMASK] and [gMASK] of each context, in text order (GLM_SPEC 5).",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (glm-ext train --output-dir), a checkpoints/step-N directory "
                             "or a checkpoint (then with --tokenizer)")
    parser.add_argument("text", metavar="TEXT", nargs="*", help="contexts holding one or more mask tokens")
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", metavar="FILE", help="contexts, one per line (text or JSONL); - reads stdin")
    io.add_argument("--input-format", choices=("auto", "text", "jsonl"), default="auto",
                    help="auto: JSONL for .jsonl/.ndjson files, else text (default: auto)")
    io.add_argument("--output", metavar="FILE", help="write JSONL results there (- for stdout)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    io.add_argument("--interactive", action="store_true", help="ask for contexts one at a time")
    io.add_argument("--batch-size", type=int, default=8, help="contexts decoded together (default: 8)")
    io.add_argument("--special-tokens-as-text", action="store_true",
                    help="read special-token texts typed in a context ([CLS], <|endofpiece|>, ...) as plain "
                         "text; [MASK], [sMASK] and [gMASK] still mark blanks")
    io.add_argument("--tokenizer", help="tokenizer.json (default: the run's copy)")
    decoding = parser.add_argument_group("decoding (an option left out keeps the --preset's or the default value)")
    decoding.add_argument("--preset", choices=sorted(GENERATION_PRESETS),
                          help="the authors' decoding settings of a finetuning task")
    decoding.add_argument("--max-new-tokens", type=_limits, metavar="N[,N...]",
                          help="per blank; a list gives the i-th blank's (default: 32)")
    decoding.add_argument("--min-new-tokens", type=int,
                          help="per blank: no stop is drawn before (default: 1; 0 allows empty blanks)")
    decoding.add_argument("--temperature", type=float, help="0: greedy (default: 0)")
    decoding.add_argument("--top-k", type=int, help="sample from the k most likely tokens (needs --temperature)")
    decoding.add_argument("--top-p", type=float, help="nucleus sampling (needs --temperature)")
    decoding.add_argument("--seed", type=int, help="repeatable sampling: every context draws from its own "
                                                   "generator seeded with it (needs --temperature)")
    decoding.add_argument("--num-beams", type=int, help="beam search with this many beams (default: 1, none)")
    decoding.add_argument("--length-penalty", type=float, help="beam score = log-prob sum / length ** this")
    decoding.add_argument("--early-stopping", action="store_const", const=True,
                          help="beam search: a blank is done once num_beams hypotheses are finished")
    decoding.add_argument("--no-repeat-ngram-size", type=int, help="no n-gram of this size twice in a blank")
    decoding.add_argument("--repetition-penalty", type=float, help="> 1 makes a blank's repeats less likely")
    decoding.add_argument("--stop", action="append", metavar="STRING", help="end a blank once its text holds STRING")
    decoding.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                          help="end a blank at this token (like <eop>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything for every token")
    parser.set_defaults(run=run)
    _allow_options_before_texts(parser)


def _allow_options_before_texts(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser`` parse intermixed options and positionals, so that ``MODEL --opt X TEXT``
    works: plain argparse binds the optional TEXT list to its first run of positionals (MODEL
    alone) and then refuses the later TEXT. The intermixed parse calls ``parse_known_args`` itself,
    so the plain one is restored around it."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = plain
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args

    parser.parse_known_args = parse_known_args


def load_for_generation(path: str, tokenizer_path: str | None, device: str):
    """(model in eval mode, tokenizer) from a run directory, a checkpoints/step-N directory or a
    checkpoint; a tokenizer other than the one the run recorded is refused."""
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
    return model.eval(), tokenizer


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


# --------------------------------------------------------------------------------------------
# Options


def _name_options(message: str) -> str:
    """A GenerationConfig / fill_blanks message with its setting names replaced by the options."""
    pattern = r"\b(" + "|".join(SETTING_OPTIONS) + r")\b"
    return re.sub(pattern, lambda match: SETTING_OPTIONS[match.group(1)], message)


def generation_config(args: argparse.Namespace):
    """The GenerationConfig of the options; ValueError naming the option for a bad or ignored one."""
    import dataclasses

    from glm_ext.generation import GENERATION_PRESETS, GenerationConfig

    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    settings = {
        "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "stop_strings": tuple(args.stop) if args.stop else None,
        "stop_token_ids": tuple(args.stop_token_id) if args.stop_token_id else None,
        "num_beams": args.num_beams, "length_penalty": args.length_penalty, "early_stopping": args.early_stopping,
    }
    base = GENERATION_PRESETS[args.preset] if args.preset else GenerationConfig()
    temperature = args.temperature if args.temperature is not None else base.temperature
    if temperature == 0:
        ignored = [option for option, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                                ("--seed", args.seed)) if value is not None]
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            raise ValueError(f"{' and '.join(ignored)} only {verb} to sampling: add --temperature > 0 (0 is greedy)")
    try:
        return dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None})
    except ValueError as exc:
        raise ValueError(_name_options(str(exc))) from None


# --------------------------------------------------------------------------------------------
# Contexts in, results out


def _read_contexts(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(where, record) for every context: ``where`` names it in messages, ``record`` is the input's
    JSON object (``{"text": line}`` for text)."""
    if args.input is None and args.text:
        return [(f"TEXT argument {i}", {"text": text}) for i, text in enumerate(args.text, 1)]
    if args.input is not None and args.text:
        raise ValueError("give contexts either as TEXT arguments or with --input, not both")
    if args.input in (None, "-"):
        if args.input is None and sys.stdin.isatty():
            raise ValueError("no contexts: pass TEXT arguments, --input FILE, pipe them to stdin, or use --interactive")
        name, lines = "stdin", sys.stdin.read().splitlines()
    else:
        name = args.input
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    jsonl = args.input_format == "jsonl" or (args.input_format == "auto" and name.endswith(JSONL_SUFFIXES))
    contexts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        if not jsonl:
            contexts.append((where, {"text": line}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{where}: expected a JSON object with a string field 'text'")
        contexts.append((where, record))
    return contexts


def _record(record: dict, result) -> dict:
    blanks = []
    for blank in result.blanks:
        entry = {"text": blank.text, "token_ids": list(blank.token_ids), "stop": blank.stop,
                 "mask": blank.mask_token, "position": blank.position}
        if blank.score is not None:
            entry["score"] = blank.score
        blanks.append(entry)
    return {**record, "filled": result.text, "blanks": blanks}


class _LivePrinter:
    """Prints results for reading as they are decoded: the earliest unfinished context of the batch
    token by token, the later ones (buffered) when their turn comes, so the output keeps input order."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts
        self.head = 0  # the context being shown live
        self.buffered: dict[int, list] = {}
        self.shown_blank: dict[int, int] = {}

    def feed(self, update) -> None:
        self.buffered.setdefault(update.context, []).append(update)
        while self.head in self.buffered:
            updates = self.buffered.pop(self.head)
            for item in updates:
                self._show(item)
            if not updates[-1].result:
                break
            self.head += 1

    def _show(self, update) -> None:
        if update.context not in self.shown_blank:
            print(f"  context: {_one_line(self.texts[update.context])}")
            self.shown_blank[update.context] = -1
        if self.shown_blank[update.context] != update.blank:
            print(f"           blank {update.blank + 1}: ", end="")
            self.shown_blank[update.context] = update.blank
        print(_one_line(update.text), end="", flush=True)
        if update.finished is not None:
            print(f"  (ended by {update.finished.stop})")
        if update.result is not None:
            print(f"  filled:  {_one_line(update.result.text)}", flush=True)


def _decode_batches(model, tokenizer, ids: list[list[int]], texts: list[str], config, args, live: bool) -> Iterator:
    """The FillResult of every context, in order, decoding ``--batch-size`` contexts at a time;
    with ``live`` each blank is printed as it is decoded."""
    from glm_ext.generation import stream_blanks

    for start in range(0, len(ids), args.batch_size):
        batch = ids[start : start + args.batch_size]
        printer = _LivePrinter(texts[start : start + args.batch_size]) if live else None
        results = [None] * len(batch)
        for update in stream_blanks(model, tokenizer, batch, config, seed=args.seed, use_cache=not args.no_cache):
            if printer is not None:
                printer.feed(update)
            if update.result is not None:
                results[update.context] = update.result
        yield from results


def _interactive(model, tokenizer, config, args) -> int:
    from glm_ext.generation import fill_blanks, prepare_context

    live = sys.stdout.isatty()
    print("Type a context with [MASK], [sMASK] or [gMASK] blanks; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input("context> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not text.strip():
            return 0
        try:
            ids = prepare_context(tokenizer, text, max_sequence_length=model.config.max_sequence_length,
                                  special_tokens_as_text=args.special_tokens_as_text)
            if live:
                for _ in _decode_batches(model, tokenizer, [ids], [text], config, args, live=True):
                    pass
            else:
                result = fill_blanks(model, tokenizer, ids, config, seed=args.seed, use_cache=not args.no_cache)
                print_fill(text, result)
        except ValueError as exc:
            error(_name_options(str(exc)))


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.generation import prepare_context

    if args.batch_size < 1:
        return error(f"--batch-size must be at least 1, got {args.batch_size}", 2)
    config = generation_config(args)
    if args.interactive and (args.text or args.input or args.output):
        return error("--interactive reads contexts from the terminal: drop TEXT, --input and --output", 2)
    if args.output not in (None, "-") and Path(args.output).is_dir():
        return error(f"--output {args.output} is a directory; name a file", 2)
    if args.output not in (None, "-") and Path(args.output).exists() and not args.overwrite:
        return error(f"--output {args.output} exists; pass --overwrite to replace it", 2)
    contexts = [] if args.interactive else _read_contexts(args)

    model, tokenizer = load_for_generation(args.model, args.tokenizer, args.device)
    if args.interactive:
        return _interactive(model, tokenizer, config, args)
    ids = []
    for where, record in contexts:
        try:
            ids.append(prepare_context(tokenizer, record["text"], max_sequence_length=model.config.max_sequence_length,
                                       special_tokens_as_text=args.special_tokens_as_text))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        return _generate(model, tokenizer, ids, contexts, config, args)
    except ValueError as exc:  # settings the model refuses (max_new_tokens beyond its positions, ...)
        raise ValueError(_name_options(str(exc))) from None
    except KeyboardInterrupt:
        return error("interrupted" + ("" if args.output in (None, "-") else f"; {args.output} was not written"), 130)


def _generate(model, tokenizer, ids: list[list[int]], contexts: list[tuple[str, dict]], config, args) -> int:
    from glm_ext.files import write_file_atomically

    texts = [record["text"] for _, record in contexts]
    if args.output is None:
        live = sys.stdout.isatty()
        for text, result in zip(texts, _decode_batches(model, tokenizer, ids, texts, config, args, live)):
            if not live:
                print_fill(text, result)
        return 0

    def write(file) -> None:
        results = _decode_batches(model, tokenizer, ids, texts, config, args, live=False)
        for (_, record), result in zip(contexts, results):
            file.write(json.dumps(_record(record, result), ensure_ascii=False) + "\n")
            file.flush()

    if args.output == "-":
        write(sys.stdout)
    else:
        write_file_atomically(Path(args.output), write)
        print(f"wrote {len(contexts)} results to {args.output}", file=sys.stderr)
    return 0
