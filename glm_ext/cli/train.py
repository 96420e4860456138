"""``glm-ext train``: pretrain (or resume) a GLM with blank infilling on a token file.

The options are generated from ``TrainConfig`` (:mod:`glm_ext.cli.config_options`): every field is
an option, with the field's help and default. ``--config FILE`` reads field values from a JSON or
YAML file (e.g. a run's ``train_config.json``); flags override it.

Under ``torchrun`` (``torchrun --nproc-per-node N -m glm_ext train ...``) each process joins the
process group torchrun describes (:func:`glm_ext.distributed.init_distributed`) and trains as one
rank of the run; only rank 0 prints and writes the run's files.
"""

from __future__ import annotations

import argparse
import dataclasses

from glm_ext.cli.common import error, reports_errors
from glm_ext.cli.config_options import add_dataclass_options, option_values, read_config_file


def _epilog() -> str:
    from glm_ext.model import PRESETS
    from glm_ext.training import OBJECTIVE_MIXES

    lines = ["presets (--preset; the vocabulary comes from the tokenizer):"]
    for name, preset in PRESETS.items():
        lines.append(f"  {name:<6} {preset['num_layers']:>2} layers, hidden {preset['hidden_size']:>4}, "
                     f"{preset['num_heads']:>2} heads, positions up to {preset['max_sequence_length']}")
    lines.append("objective mixes (--objectives):")
    for name, mix in OBJECTIVE_MIXES.items():
        probs = " / ".join(f"{p:g}" for p in mix.objective_probs)
        lines.append(f"  {name:<8} token / sentence / document probabilities {probs}, "
                     f"min_document_ratio {mix.min_document_ratio:g}")
    return "\n".join(lines)


def add_parser(commands) -> None:
    from glm_ext.training import TrainConfig

    parser = commands.add_parser(
        "train", help="pretrain a GLM with blank infilling on a token file",
        description="Trains (or resumes: the newest checkpoint in --output-dir) a GLM on a token file made by "
        "prepare-data. Writes OUTPUT_DIR/checkpoints/step-N, OUTPUT_DIR/latest, a copy of the tokenizer (so that "
        "`glm-ext generate OUTPUT_DIR ...` works), OUTPUT_DIR/metrics.jsonl and, at the end, OUTPUT_DIR/loss.png.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TrainConfig field values from a .json or .yaml file (e.g. a run's train_config.json); "
                             "flags override them")
    add_dataclass_options(parser.add_argument_group("training configuration (TrainConfig)"), TrainConfig)
    parser.set_defaults(run=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.devices import resolve_device
    from glm_ext.distributed import close_distributed, init_distributed
    from glm_ext.training import TrainConfig

    values = read_config_file(args.config) if args.config else {}
    values.update(option_values(args, TrainConfig))
    if "train_data" in values:
        values.setdefault("tokenizer", f"{values['train_data']}.tokenizer.json")
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        return error(f"train needs {', '.join(missing)}: --data PREFIX (or train_data in --config)", 2)
    config = TrainConfig.from_dict(values)
    init_distributed(resolve_device(config.device))  # joins torchrun's process group (nothing without torchrun)
    try:
        return _train(config)
    finally:
        close_distributed()


def _train(config) -> int:
    from glm_ext.plot import plot_runs
    from glm_ext.progress import is_main_process
    from glm_ext.run_dir import RunDirectory
    from glm_ext.training import Trainer

    say = print if is_main_process() else (lambda line: None)
    trainer = Trainer(config)
    if trainer.resume():
        say(f"resumed {config.output_dir} at step {trainer.step}")
    if trainer.step < config.steps:
        parameters = sum(p.numel() for p in trainer.model.parameters())
        layout = trainer.layout
        shared = (f" on {layout.world_size} processes ({config.parallel})" if layout.world_size > 1 else "") + (
            f", {layout.grad_accum} micro-batches of {layout.micro_batch_size} rows per process"
            if layout.grad_accum > 1 else "")
        say(f"training {parameters:,} parameters ({trainer.model.config}) on {trainer.device} from step "
            f"{trainer.step} to {config.steps}, {config.batch_size} x {config.max_length} tokens a step{shared}")
    summary = trainer.fit()
    if not summary["complete"] and is_main_process():
        plot = plot_runs([config.output_dir], RunDirectory(config.output_dir).loss_plot_file)
        say(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}, curves {plot}")
    return 0
