"""The task options that ``glm-ext evaluate`` and ``glm-ext finetune`` share: a cloze task
(:func:`add_cloze_task_options`) and the beam search of seq2seq decoding
(:func:`add_decoding_options`, read by :func:`decoding_overrides`)."""

from __future__ import annotations

import argparse


#: Decoding flags -> GenerationConfig fields (add_decoding_options).
DECODING_OPTIONS = ("num_beams", "length_penalty", "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens",
                    "early_stopping")


def add_decoding_options(group) -> None:
    """The beam-search flags of ``evaluate seq2seq`` and ``finetune seq2seq --dev-decode``; unset
    ones keep the task's settings (:meth:`glm_ext.tasks.seq2seq.Seq2SeqLayout.decoding`)."""
    group.add_argument("--decoding-preset", metavar="NAME", help="a decoding preset of glm_ext.generation.GENERATION_PRESETS "
                       "(cnn_dailymail: the authors' CNN/DailyMail beam search); the flags below override it")
    group.add_argument("--num-beams", type=int, help="beams (1: greedy)")
    group.add_argument("--length-penalty", type=float, help="beam scores are divided by length ** this")
    group.add_argument("--no-repeat-ngram-size", type=int, help="no n-gram of this size twice in a target (0: off)")
    group.add_argument("--min-new-tokens", type=int, help="<eop> is not chosen before this many tokens")
    group.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: the target length)")
    group.add_argument("--early-stopping", action=argparse.BooleanOptionalAction,
                       help="end a beam search once num_beams hypotheses are done")


def decoding_overrides(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields the decoding flags (and ``--decoding-preset``) set."""
    settings = {}
    if args.decoding_preset is not None:
        from glm_ext.generation import GENERATION_PRESETS

        if args.decoding_preset not in GENERATION_PRESETS:
            raise ValueError(f"--decoding-preset: unknown preset {args.decoding_preset!r}; choose one of "
                             f"{', '.join(GENERATION_PRESETS)}")
        preset = GENERATION_PRESETS[args.decoding_preset]
        settings = {name: getattr(preset, name) for name in DECODING_OPTIONS}
    settings.update({name: getattr(args, name) for name in DECODING_OPTIONS if getattr(args, name) is not None})
    return settings


def add_cloze_task_options(group) -> None:
    """The task options of ``evaluate cloze`` and ``finetune cloze``."""
    from glm_ext.tasks import CLOZE_TASK_NAMES
    from glm_ext.tasks.superglue import DEFAULT_PATTERNS

    group.add_argument("--task", required=True, choices=CLOZE_TASK_NAMES)
    group.add_argument("--pattern-id", type=int, help="SuperGLUE pattern (default: the authors' "
                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_PATTERNS.items()) + ")")
    group.add_argument("--pattern", help='custom: e.g. "{text} It was [MASK]." ({field} from the record)')
    group.add_argument("--pattern-function", metavar="MODULE:FUNCTION",
                       help="custom: a function of the record returning the filled pattern")
    group.add_argument("--verbalizer", action="append", default=[], metavar="LABEL=TEXT",
                       help="custom: the text of a label in the blank (repeat for each label)")
    group.add_argument("--label-field", default="label", help="custom: the record field holding the label")
    group.add_argument("--length-penalty", type=float,
                       help="multi-token scores are divided by len ** this (default: the task's; WSC 1, others 0)")
    group.add_argument("--max-length", type=int, help="longest row (default: the model's max_sequence_length)")
