"""Finetuning and evaluation tasks (GLM_SPEC section 6), following the authors' ``tasks/``.

=================  ==============================================================================
module             what it holds
=================  ==============================================================================
``rows``           model input rows in GLM's layout, picks of token log-probabilities, batched
                   scoring: what every task below runs through
``records``        task files (JSON lines) with errors naming file, line and field
``cloze``          cloze scoring (candidates in a blank), ``ClozeTask``, ``evaluate_cloze``, the
                   finetuning batch (``build_cloze_batch``) and loss (``cloze_loss``)
``superglue``      BoolQ, CB, COPA, RTE, WiC, WSC, MultiRC, ReCoRD: the authors' patterns,
                   verbalizers and metrics
``custom``         cloze tasks from a pattern string or function and a verbalizer
``metrics``        accuracy, F1, macro-F1, MultiRC EM, SQuAD-style EM/F1, ROUGE (percentages)
``language_model`` perplexity with overlapping windows, LAMBADA-style last-word accuracy
``seq2seq``        seq2seq source/target layouts, the label-smoothed loss, beam-search evaluation
                   with ROUGE (``evaluate_seq2seq``)
``seq2seq_data``   seq2seq data files: the authors' CNN/DailyMail, Gigaword, XSum and SQuAD
                   layouts, and JSON lines
``finetune``       cloze and seq2seq finetuning as tasks of the trainer (``glm-ext finetune``)
=================  ==============================================================================

:func:`cloze_task` resolves a task by name (as ``glm-ext evaluate cloze --task`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from glm_ext.tasks.cloze import ClozeTask, evaluate_cloze, score_cloze
from glm_ext.tasks.custom import custom_task
from glm_ext.tasks.language_model import lambada, perplexity
from glm_ext.tasks.superglue import SUPERGLUE_TASKS, superglue_task

__all__ = ["CLOZE_TASK_NAMES", "ClozeTask", "cloze_task", "evaluate_cloze", "lambada", "perplexity", "score_cloze"]

CLOZE_TASK_NAMES: tuple[str, ...] = (*SUPERGLUE_TASKS, "custom")


def cloze_task(
    name: str,
    *,
    pattern_id: int | None = None,
    pattern: str | Callable[[dict], Any] | None = None,
    verbalizer: Mapping[str, str] | None = None,
    label_field: str = "label",
) -> ClozeTask:
    """A SuperGLUE task (``pattern_id`` None: the authors' default pattern) or ``"custom"``
    (``pattern`` and ``verbalizer`` required, see :mod:`glm_ext.tasks.custom`)."""
    if name == "custom":
        if pattern is None or not verbalizer:
            raise ValueError("the custom task needs a pattern (--pattern or --pattern-function) and a verbalizer")
        if pattern_id is not None:
            raise ValueError("--pattern-id applies to the SuperGLUE tasks, not to custom")
        return custom_task(pattern, verbalizer, label_field=label_field)
    if pattern is not None or verbalizer:
        raise ValueError(f"a pattern and verbalizer apply to the custom task only, not to {name!r}")
    return superglue_task(name, pattern_id)
