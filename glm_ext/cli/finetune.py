"""``glm-ext finetune cloze|seq2seq MODEL``: finetune a pretrained GLM on a task through the trainer
(:mod:`glm_ext.tasks.finetune`).

* ``cloze MODEL --task boolq|cb|copa|rte|wic|wsc|multirc|record|custom --train FILE [--dev FILE]``:
  cross-entropy over the label scores (the authors' cloze finetuning), the task's metrics on the dev
  file at every evaluation;
* ``seq2seq MODEL --train FILE [--dev FILE] [--task cnn_dm|xsum|gigaword|squad_generation|summarization]``:
  the target in Part B, the loss on it only, label smoothing; the dev loss at every evaluation and,
  with ``--dev-decode N``, ROUGE of N dev examples decoded by beam search.

MODEL is a run directory, a ``checkpoints/step-N`` directory or a checkpoint carrying its tokenizer
(e.g. an authors' checkpoint converted by ``glm-ext convert --tokenizer-files``), else with
``--tokenizer``. The run goes to ``--output-dir`` (a run directory of its own: checkpoints,
``metrics.jsonl``, ``best/``, ``finetune_config.json``); running the same command again resumes it.
The training options are ``glm-ext train``'s (from ``TrainConfig``) but those of pretraining data,
with finetuning's defaults; under ``torchrun`` each process is one rank, as for ``train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from glm_ext.cli.common import add_model_arguments, error, reports_errors
from glm_ext.cli.config_options import add_dataclass_options, option_values

#: TrainConfig fields of pretraining only (the data, the architecture, the blank-infilling rows).
PRETRAINING_ONLY = ("train_data", "tokenizer", "eval_data", "preset", "position_encoding", "model_overrides",
                    "objectives", "max_length", "packing", "eval_batches")
#: Finetuning's TrainConfig defaults: the authors' (``config_tasks/task_*.sh``, ``seq_*.sh``; a
#: cosine to 0 stands in for their linear decay); steps and warmup follow --epochs and --warmup-ratio.
DEFAULTS = {"output_dir": "glm-finetune", "lr": 1e-5, "dropout": 0.1, "min_lr_ratio": 0.0, "batch_size": 16,
            "steps": dataclasses.MISSING, "warmup": dataclasses.MISSING}
WARMUP_RATIO = {"cloze": 0.1, "seq2seq": 0.06}
DEFAULT_EPOCHS = 3


def _common(parser: argparse.ArgumentParser, mode: str) -> None:
    from glm_ext.training import TrainConfig

    add_model_arguments(parser)  # the pretrained model
    parser.add_argument("--train", required=True, metavar="FILE", help="the training data")
    parser.add_argument("--dev", metavar="FILE", help="held-out data: its metrics at every evaluation "
                        "(--eval-every) in metrics.jsonl; the best model goes to OUTPUT_DIR/best")
    parser.add_argument("--epochs", type=float, help=f"passes over the training data (sets --steps; default: "
                        f"{DEFAULT_EPOCHS} when --steps is not given)")
    parser.add_argument("--warmup-ratio", type=float, default=WARMUP_RATIO[mode],
                        help=f"warmup steps as a share of the steps, unless --warmup (default: {WARMUP_RATIO[mode]})")
    add_dataclass_options(parser.add_argument_group("training configuration (TrainConfig, as glm-ext train)"),
                          TrainConfig, exclude=PRETRAINING_ONLY, defaults=DEFAULTS)


def add_parser(commands) -> None:
    from glm_ext.cli.task_options import add_cloze_task_options, add_decoding_options
    from glm_ext.tasks.seq2seq import MASK_TOKENS
    from glm_ext.tasks.seq2seq_data import SEQ2SEQ_TASKS

    parser = commands.add_parser(
        "finetune", help="finetune a pretrained GLM: cloze classification or seq2seq",
        description="Finetunes a pretrained GLM (GLM_SPEC 6) through the trainer: its checkpoints, resume, "
        "metrics.jsonl and torchrun support. Running the same command again resumes the run.",
    )
    modes = parser.add_subparsers(dest="finetuning", required=True, metavar="{cloze,seq2seq}")

    cloze = modes.add_parser("cloze", help="classification as cloze (SuperGLUE tasks or a custom pattern)")
    _common(cloze, "cloze")
    add_cloze_task_options(cloze.add_argument_group("the task (as glm-ext evaluate cloze)"))
    cloze.set_defaults(run=run_cloze)

    seq2seq = modes.add_parser("seq2seq", help="sequence to sequence (summarisation, question generation)")
    _common(seq2seq, "seq2seq")
    task = seq2seq.add_argument_group("the task")
    task.add_argument("--task", choices=tuple(SEQ2SEQ_TASKS), default="summarization",
                      help="the layout and the authors' lengths and cleaning: cnn_dm, xsum, gigaword (summaries), "
                           "squad_generation (questions); summarization: any .jsonl/.source data, CNN/DM's lengths "
                           "(default: summarization)")
    task.add_argument("--source-length", type=int, help="tokens of Part A, padded (default: the task's)")
    task.add_argument("--target-length", type=int, help="target tokens, <eop> included (default: the task's)")
    task.add_argument("--mask-token", choices=MASK_TOKENS, default="[MASK]",
                      help="the blank in the source ([sMASK] for models pretrained with task masks)")
    task.add_argument("--label-smoothing", type=float, default=0.1, help="(default: 0.1, the authors')")
    task.add_argument("--dev-decode", type=int, default=0, metavar="N",
                      help="decode the first N dev examples at each evaluation for ROUGE (then the best model is "
                           "the best ROUGE-1, else the lowest dev loss)")
    add_decoding_options(seq2seq.add_argument_group("decoding of --dev-decode (default: the task's beam search)"))
    seq2seq.set_defaults(run=run_seq2seq)


def _train_config(args: argparse.Namespace, mode: str, num_examples: int, tokenizer: Path, run):
    """The TrainConfig of a finetuning run: the flags, finetuning's defaults, steps from --epochs,
    warmup from --warmup-ratio (a run that resumes keeps its warmup, whatever its new steps)."""
    from glm_ext.training import TrainConfig

    values = {name: value for name, value in DEFAULTS.items() if value is not dataclasses.MISSING}
    values.update(option_values(args, TrainConfig))
    if args.epochs is not None and "steps" in values:
        raise ValueError("give --epochs or --steps, not both")
    if "steps" not in values:
        epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
        if not epochs > 0:
            raise ValueError(f"--epochs must be positive, got {epochs}")
        values["steps"] = max(1, math.ceil(epochs * num_examples / values["batch_size"]))
    if "warmup" not in values and run.config_file.is_file():
        values["warmup"] = json.loads(run.config_file.read_text(encoding="utf-8"))["warmup"]
    if "warmup" not in values:
        if not 0 <= args.warmup_ratio <= 1:
            raise ValueError(f"--warmup-ratio must lie in [0, 1], got {args.warmup_ratio}")
        values["warmup"] = round(args.warmup_ratio * values["steps"])
    values.update(train_data=str(Path(args.train).absolute()), tokenizer=str(tokenizer.absolute()),
                  eval_data=str(Path(args.dev).absolute()) if args.dev else None)
    return TrainConfig.from_dict(values)


def _finetune(args: argparse.Namespace, mode: str, make_settings, make_task) -> int:
    from glm_ext.cli.train import run_trainer
    from glm_ext.devices import resolve_device
    from glm_ext.distributed import close_distributed, init_distributed
    from glm_ext.progress import is_main_process
    from glm_ext.run_dir import FINETUNE_CONFIG_FILE, RunDirectory, load_model
    from glm_ext.tasks.finetune import settings_to_dict
    from glm_ext.training import TrainConfig, Trainer

    pretrained = load_model(args.model, args.tokenizer)  # on the CPU: the trainer places it
    model, model_dir = pretrained.model, pretrained.model_dir
    output = Path(vars(args).get("output_dir", DEFAULTS["output_dir"])).absolute()
    if output == model_dir.absolute() or output in model_dir.absolute().parents:
        raise ValueError(f"--output-dir {output} holds the pretrained model {model_dir}: finetune into a run "
                         "directory of its own")
    run = RunDirectory(output)
    if run.checkpoints() and not (run.path / FINETUNE_CONFIG_FILE).is_file():
        raise ValueError(f"--output-dir {output} holds a training run that is not a finetuning one; finetune into "
                         "another directory")
    settings = make_settings(str(Path(args.model).absolute()))
    seed = vars(args).get("seed", TrainConfig.seed)
    task = make_task(settings, pretrained.tokenizer,
                     max_sequence_length=model.config.max_sequence_length, seed=seed)
    config = _train_config(args, mode, task.order.count, pretrained.tokenizer_path, run)
    init_distributed(resolve_device(config.device))  # joins torchrun's process group (nothing without torchrun)
    try:
        trainer = Trainer(config, task=task, init_from=model)

        def write_settings() -> None:  # once the checkpoint (if any) accepted these settings
            if is_main_process():
                text = json.dumps(settings_to_dict(settings), indent=2) + "\n"
                RunDirectory(config.output_dir).write_text(FINETUNE_CONFIG_FILE, text)

        epochs = config.steps * config.batch_size / task.order.count
        summary = run_trainer(trainer, f"{config.batch_size} examples a step ({epochs:.3g} epochs of "
                              f"{task.order.count} {mode} examples)", after_resume=write_settings)
        if summary.get("best") and is_main_process():
            best = summary["best"]
            print(f"best {best['metric']}: {best['value']:.4f} at step {best['step']}, model in "
                  f"{RunDirectory(config.output_dir).best_dir}")
        return 0
    finally:
        close_distributed()


@reports_errors
def run_cloze(args: argparse.Namespace) -> int:
    from glm_ext.tasks.custom import parse_verbalizer
    from glm_ext.tasks.finetune import ClozeFinetuning, ClozeSettings

    if args.pattern is not None and args.pattern_function is not None:
        return error("give --pattern or --pattern-function, not both", 2)

    def settings(pretrained: str) -> ClozeSettings:
        return ClozeSettings(
            task=args.task, train=str(Path(args.train).absolute()),
            dev=str(Path(args.dev).absolute()) if args.dev else None, pretrained=pretrained,
            pattern_id=args.pattern_id, pattern=args.pattern, pattern_function=args.pattern_function,
            verbalizer=parse_verbalizer(args.verbalizer), label_field=args.label_field, max_length=args.max_length,
            length_penalty=args.length_penalty)

    return _finetune(args, "cloze", settings, ClozeFinetuning)


@reports_errors
def run_seq2seq(args: argparse.Namespace) -> int:
    from glm_ext.cli.task_options import decoding_overrides
    from glm_ext.tasks.finetune import Seq2SeqFinetuning, Seq2SeqSettings
    from glm_ext.tasks.seq2seq import Seq2SeqLayout

    def settings(pretrained: str) -> Seq2SeqSettings:
        layout = Seq2SeqLayout.for_task(args.task, source_length=args.source_length,
                                        target_length=args.target_length, mask_token=args.mask_token)
        return Seq2SeqSettings(
            train=str(Path(args.train).absolute()), dev=str(Path(args.dev).absolute()) if args.dev else None,
            pretrained=pretrained, layout=layout, label_smoothing=args.label_smoothing, dev_decode=args.dev_decode,
            generation=decoding_overrides(args))

    return _finetune(args, "seq2seq", settings, Seq2SeqFinetuning)
