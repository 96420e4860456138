"""``glm-ext evaluate cloze|seq2seq|lm|harness``: evaluate a trained GLM (GLM_SPEC section 6).

* ``cloze MODEL --task boolq|cb|copa|rte|wic|wsc|multirc|record|custom --data FILE.jsonl``: scores
  the candidates of every record (:mod:`glm_ext.tasks.cloze`), prints the task's metrics;
  ``--predictions FILE`` writes one JSON line per example (``source``, ``prediction``, ``label``,
  ``scores``).
* ``seq2seq MODEL --data FILE``: decodes every source's target with beam search (the task's settings
  of the authors, or the flags) and prints ROUGE-1/2/L against the references
  (:func:`glm_ext.tasks.seq2seq.evaluate_seq2seq`); on a finetuning run (or its ``best/`` or a
  checkpoint of it) the task, lengths and mask token default to the run's;
  ``--predictions FILE`` writes one JSON line per example (``source``, ``prediction``, ``target``).
* ``lm MODEL --data FILE [--mode bidirectional|unidirectional]``: perplexity with overlapping
  windows, and (for ``.jsonl`` files, one text per record) LAMBADA-style last-word accuracy
  (:mod:`glm_ext.tasks.language_model`).
* ``harness MODEL [lm-eval flags]``: runs lm-evaluation-harness with the model (:mod:`glm_ext.harness`).

MODEL is a run directory, a ``checkpoints/step-N`` directory or a checkpoint directory, with the
tokenizer it carries or ``--tokenizer`` (:func:`glm_ext.run_dir.load_model`). ``--output FILE`` writes the results as JSON (cloze, seq2seq and lm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from glm_ext.cli.common import MODEL_HELP, add_model_arguments, error, reports_errors
from glm_ext.cli.task_options import add_cloze_task_options, add_decoding_options, decoding_overrides

SHARE_CONTEXT = {"auto": None, "always": True, "never": False}


def _common(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="tokens per batch (rows x padded length; default: 4096)")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON")


def add_parser(commands) -> None:
    from glm_ext.tasks.language_model import MODES
    from glm_ext.tasks.seq2seq import MASK_TOKENS
    from glm_ext.tasks.seq2seq_data import SEQ2SEQ_TASKS, XSUM_SPLITS

    parser = commands.add_parser(
        "evaluate", help="evaluate a trained GLM: cloze tasks, perplexity/LAMBADA, lm-evaluation-harness",
        description="Evaluates a trained GLM (GLM_SPEC 6): classification as cloze (SuperGLUE or custom "
        "patterns), perplexity and LAMBADA-style last-word accuracy, or lm-evaluation-harness tasks.",
    )
    modes = parser.add_subparsers(dest="evaluation", required=True, metavar="{cloze,seq2seq,lm,harness}")

    cloze = modes.add_parser("cloze", help="classification as cloze (SuperGLUE tasks or a custom pattern)")
    _common(cloze)
    cloze.add_argument("--data", required=True, metavar="FILE", help="JSON lines in the task's layout")
    add_cloze_task_options(cloze)
    cloze.add_argument("--share-context", choices=tuple(SHARE_CONTEXT), default="auto",
                       help="encode Part A once for all candidates of an example (same scores; auto: where it "
                            "saves tokens)")
    cloze.add_argument("--predictions", metavar="FILE", help="write one JSON line per example")
    cloze.set_defaults(run=run_cloze)

    seq2seq = modes.add_parser("seq2seq", help="beam-search decoding scored by ROUGE (summaries, questions)")
    _common(seq2seq)
    seq2seq.add_argument("--data", required=True, metavar="FILE",
                         help=".jsonl, .source (with .target) or .json (SQuAD, XSum's split file), as finetune reads")
    seq2seq.add_argument("--task", choices=tuple(SEQ2SEQ_TASKS),
                         help="the layout, lengths, cleaning and decoding of the authors' task (default: the "
                              "finetuning run's, else summarization)")
    seq2seq.add_argument("--split", choices=XSUM_SPLITS, default="test", help="XSum's split file: the part to read")
    seq2seq.add_argument("--source-length", type=int, help="tokens of Part A (default: the run's, else the task's)")
    seq2seq.add_argument("--target-length", type=int,
                         help="target tokens (default: the run's, else the task's): at most this many are decoded")
    seq2seq.add_argument("--mask-token", choices=MASK_TOKENS, help="(default: the run's, else [MASK])")
    seq2seq.add_argument("--batch-size", type=int, default=8, help="sources decoded together (default: 8)")
    seq2seq.add_argument("--predictions", metavar="FILE", help="write one JSON line per example")
    add_decoding_options(seq2seq.add_argument_group("decoding (default: the task's beam search)"))
    seq2seq.set_defaults(run=run_seq2seq)

    lm = modes.add_parser("lm", help="perplexity and LAMBADA-style last-word accuracy")
    _common(lm)
    lm.add_argument("--data", required=True, metavar="FILE",
                    help=".jsonl: one text per record (perplexity and last-word accuracy); other: one text")
    lm.add_argument("--mode", choices=MODES, default="bidirectional")
    lm.add_argument("--text-field", default="text", help="the record field holding the text (.jsonl)")
    lm.add_argument("--window", type=int, help="tokens per perplexity window (default: max_sequence_length - 2)")
    lm.add_argument("--stride", type=int, help="new tokens per window (default: half the window)")
    lm.add_argument("--mask-token", choices=("[MASK]", "[gMASK]"), default="[MASK]",
                    help="[gMASK] for models pretrained with task masks (the authors' GLM-10B)")
    lm.set_defaults(run=run_lm)

    harness = modes.add_parser(
        "harness", help="run lm-evaluation-harness (pip install glm_ext[eval])",
        description="Runs lm-eval with the model: every argument after MODEL is lm-eval's (--tasks, --limit, "
        "--num_fewshot, --output_path, --include_path, ...), except --tokenizer, --mode, --mask-token, "
        "--max-tokens, which configure the model.",
    )
    harness.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    harness.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS")
    harness.set_defaults(run=run_harness)


def _write_json(path: str, payload: dict) -> None:
    from glm_ext.files import write_file_atomically

    write_file_atomically(Path(path), lambda f: f.write(json.dumps(payload, indent=2, default=str) + "\n"))


def _print_metrics(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        print(f"{name}: {value:.2f}")


@reports_errors
def run_cloze(args: argparse.Namespace) -> int:
    from glm_ext.run_dir import load_model
    from glm_ext.tasks import cloze_task
    from glm_ext.tasks.cloze import evaluate_cloze
    from glm_ext.tasks.custom import load_callable, parse_verbalizer

    if args.pattern is not None and args.pattern_function is not None:
        return error("give --pattern or --pattern-function, not both", 2)
    pattern = load_callable(args.pattern_function) if args.pattern_function else args.pattern
    task = cloze_task(args.task, pattern_id=args.pattern_id, pattern=pattern,
                      verbalizer=parse_verbalizer(args.verbalizer), label_field=args.label_field)
    examples = task.read(args.data)
    loaded = load_model(args.model, args.tokenizer, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    evaluation = evaluate_cloze(model, tokenizer, task, examples, max_length=args.max_length,
                                length_penalty=args.length_penalty, max_tokens=args.max_tokens,
                                share_context=SHARE_CONTEXT[args.share_context])
    cut = f", {evaluation.num_truncated} cut to fit" if evaluation.num_truncated else ""
    print(f"{task.name} on {args.data}: {evaluation.num_examples} examples, {evaluation.num_labelled} labelled{cut}")
    _print_metrics(evaluation.metrics)
    if args.predictions:
        from glm_ext.files import write_file_atomically

        def write(file) -> None:
            for example, result, prediction in zip(evaluation.examples, evaluation.results, evaluation.predictions):
                file.write(json.dumps({"source": example.source, "prediction": prediction, "label": example.label,
                                       "scores": list(result.scores)}, default=str) + "\n")

        write_file_atomically(Path(args.predictions), write)
    if args.output:
        _write_json(args.output, {
            "evaluation": "cloze", "task": task.name, "pattern_id": args.pattern_id, "data": args.data,
            "model": args.model, "num_examples": evaluation.num_examples,
            "num_labelled": evaluation.num_labelled, "num_truncated": evaluation.num_truncated,
            "metrics": evaluation.metrics,
        })
    return 0


def _run_settings(model: str) -> dict:
    """The task settings of the finetuning run that ``model`` (the run, its ``best/`` or one of its
    checkpoints) belongs to, or {} (not a finetuning run)."""
    from glm_ext.run_dir import BEST_DIR, CHECKPOINTS_DIR, FINETUNE_CONFIG_FILE

    path = Path(model)
    if path.name == BEST_DIR:
        path = path.parent
    elif path.parent.name == CHECKPOINTS_DIR:
        path = path.parent.parent
    file = path / FINETUNE_CONFIG_FILE
    if not file.is_file():
        return {}
    settings = json.loads(file.read_text(encoding="utf-8"))
    return settings if settings.get("mode") == "seq2seq" else {}


@reports_errors
def run_seq2seq(args: argparse.Namespace) -> int:
    from glm_ext.run_dir import load_model
    from glm_ext.generation import GenerationConfig
    from glm_ext.progress import Progress
    from glm_ext.tasks.seq2seq import Seq2SeqLayout, evaluate_seq2seq
    from glm_ext.tasks.seq2seq_data import read_seq2seq

    run = _run_settings(args.model).get("layout", {})
    task = args.task or run.get("task", "summarization")
    same_task = task == run.get("task")
    layout = Seq2SeqLayout.for_task(
        task, source_length=args.source_length or (run.get("source_length") if same_task else None),
        target_length=args.target_length or (run.get("target_length") if same_task else None),
        mask_token=args.mask_token or run.get("mask_token", "[MASK]"))
    generation = GenerationConfig(**layout.decoding(decoding_overrides(args)))
    examples = read_seq2seq(args.data, task, split=args.split)
    loaded = load_model(args.model, args.tokenizer, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    with Progress("decoding", len(examples), unit="example", leave=False) as progress:
        evaluation = evaluate_seq2seq(model, tokenizer, examples, layout, generation, batch_size=args.batch_size,
                                      progress=lambda done: progress.advance(done - progress.position))
    print(f"{task} on {args.data}: {len(examples)} examples, {evaluation.num_labelled} with a reference "
          f"({generation.num_beams} beams, source {layout.source_length} tokens, at most "
          f"{max(generation.limits)} new tokens)")
    _print_metrics(evaluation.metrics)
    if args.predictions:
        from glm_ext.files import write_file_atomically

        def write(file) -> None:
            for example, prediction in zip(examples, evaluation.predictions):
                file.write(json.dumps({"source": example.where, "prediction": prediction,
                                       "target": example.target}) + "\n")

        write_file_atomically(Path(args.predictions), write)
    if args.output:
        _write_json(args.output, {
            "evaluation": "seq2seq", "task": task, "data": args.data, "model": args.model,
            "num_examples": len(examples), "num_labelled": evaluation.num_labelled,
            "layout": dataclasses.asdict(layout), "generation": dataclasses.asdict(generation),
            "metrics": evaluation.metrics,
        })
    return 0


@reports_errors
def run_lm(args: argparse.Namespace) -> int:
    from glm_ext.run_dir import load_model
    from glm_ext.tasks.language_model import lambada, perplexity, read_texts

    texts = read_texts(args.data, text_field=args.text_field)
    loaded = load_model(args.model, args.tokenizer, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    documents = [tokenizer.encode(text) for text in texts]
    result = perplexity(model, tokenizer, documents, mode=args.mode, window=args.window, stride=args.stride,
                        mask_token=args.mask_token, max_tokens=args.max_tokens)
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"  ({args.mode}: loss {result.loss:.4f} nats over {result.num_tokens} tokens, "
          f"{result.num_windows} windows, {len(documents)} texts)")
    payload = {"evaluation": "lm", "mode": args.mode, "data": args.data, "model": args.model,
               "perplexity": result.perplexity, "loss": result.loss, "num_tokens": result.num_tokens,
               "num_windows": result.num_windows, "num_texts": len(texts)}
    if args.data.endswith(".jsonl"):
        last_word = lambada(model, tokenizer, texts, mode=args.mode, mask_token=args.mask_token,
                            max_tokens=args.max_tokens)
        print(f"accuracy: {last_word.accuracy:.2f}")
        print(f"  (last word of each text right in every token: {sum(last_word.correct)} of {len(texts)})")
        payload.update(accuracy=last_word.accuracy, num_correct=sum(last_word.correct))
    if args.output:
        _write_json(args.output, payload)
    return 0


@reports_errors
def run_harness(args: argparse.Namespace) -> int:
    from glm_ext.tasks.language_model import MODES
    from glm_ext.training import resolve_device

    own = argparse.ArgumentParser(prog="glm-ext evaluate harness", add_help=False)
    own.add_argument("--tokenizer")
    own.add_argument("--mode", choices=MODES, default="bidirectional")
    own.add_argument("--mask-token", choices=("[MASK]", "[gMASK]"), default="[MASK]")
    own.add_argument("--max-tokens", type=int, default=4096)
    options, rest = own.parse_known_args(args.lm_eval_args)
    if any(a in ("--model", "-M", "--model_args", "-a") or a.startswith(("--model=", "--model_args="))
           for a in rest):
        return error("glm-ext evaluate harness sets --model and --model_args itself (use MODEL and --tokenizer, "
                     "--mode, --mask-token, --max-tokens)", 2)
    if not rest:
        return error("name the lm-eval tasks: glm-ext evaluate harness MODEL --tasks TASK[,TASK...]", 2)
    try:
        from glm_ext.harness import main
    except ImportError as exc:
        return error(str(exc))
    model_args = {"path": args.model, "tokenizer": options.tokenizer, "mode": options.mode,
                  "mask": options.mask_token, "max_tokens": options.max_tokens}
    arguments = ["--model_args", ",".join(f"{k}={v}" for k, v in model_args.items() if v is not None)]
    if not any(a == "--device" or a.startswith("--device=") for a in rest):
        arguments += ["--device", str(resolve_device("auto"))]
    main([*arguments, *rest])
    return 0
