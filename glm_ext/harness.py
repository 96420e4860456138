"""lm-evaluation-harness adapter: importing this module registers the ``lm_eval`` model ``glm_ext``.

    python -m glm_ext.harness --model_args path=RUN_DIR --tasks lambada_openai ...
    glm-ext evaluate harness RUN_DIR --tasks lambada_openai ...
    lm_eval --model glm_ext ...            (after ``import glm_ext.harness`` in the same process)

``python -m glm_ext.harness`` takes ``lm_eval``'s flags (``--model`` defaults to ``glm_ext``). Model
arguments (``--model_args key=value,...``): ``path`` (a run directory, a ``checkpoints/step-N``
directory or a checkpoint), ``tokenizer`` (tokenizer.json, default: the run's), ``mode``
(``bidirectional`` or ``unidirectional``, GLM_SPEC 6), ``mask`` (``[MASK]`` or ``[gMASK]``),
``max_tokens`` (tokens per batch). The device is lm-eval's ``--device`` (its default ``cuda:0``
falls back to the CPU, with a warning, where no GPU is visible). Requires the optional extra:
``pip install glm_ext[eval]``.

The requests map onto :mod:`glm_ext.tasks.language_model`:

* ``loglikelihood(context, continuation)``: the continuation decoded in a blank after the context
  (the LAMBADA layout, :func:`~glm_ext.tasks.language_model.continuation_spans`); is-greedy is
  whether every token is the argmax. Spaces at the end of the context move to the continuation
  (as lm-eval's own models do), and contexts too long lose their first tokens.
* ``loglikelihood_rolling(text)``: the perplexity windows with every token scored
  (``score_first_token``: the first token from an empty context).
* ``generate_until(context, gen_kwargs)``: the context with ``[gMASK]`` appended, filled by
  :func:`glm_ext.generation.fill_blanks` (greedy unless ``do_sample``; ``max_gen_toks``, default
  256), cut at the first ``until`` string.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("glm_ext.harness needs lm-evaluation-harness: pip install 'glm_ext[eval]'") from exc

from glm_ext.tasks.language_model import MODES, continuation_spans, document_log_likelihoods
from glm_ext.tasks.rows import score_spans

__all__ = ["GLMExtLM", "main"]

DEFAULT_MAX_GEN_TOKS = 256


class GLMExtLM(LM):
    """An lm-eval model over a glm_ext checkpoint (or an in-memory ``model`` and ``tokenizer``).

    ``batch_size`` / ``max_batch_size`` from lm-eval are accepted and ignored: requests are
    batched by tokens (``max_tokens``)."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer: Any = None,
        device: str | None = None,
        mode: str = "bidirectional",
        mask: str = "[MASK]",
        max_tokens: int = 4096,
        model: Any = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (path is None) == (model is None):
            raise ValueError("glm_ext needs model_args path=RUN_OR_CHECKPOINT (or an in-memory model)")
        if model is None:
            from glm_ext.run_dir import load_model

            loaded = load_model(path, tokenizer, _available(device))
            model, tokenizer = loaded.model, loaded.tokenizer
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("an in-memory model needs its tokenizer object")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.mask = mask
        self.mask_id = tokenizer.token_to_id(mask)
        self.max_tokens = int(max_tokens)
        self.max_length = model.config.max_sequence_length

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        return self.tokenizer.encode(context), self.tokenizer.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        empty = [i for i, (_, continuation) in enumerate(pairs) if not continuation]
        if empty:
            raise ValueError(f"loglikelihood requests {empty[:5]} have an empty continuation")
        spans = continuation_spans(pairs, self.tokenizer.special_ids, mode=self.mode, mask_id=self.mask_id,
                                   max_length=self.max_length)
        results = score_spans(self.model, spans, self.tokenizer.special_ids.eos, max_tokens=self.max_tokens)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents = [self.tokenizer.encode(request.args[0]) for request in requests]
        totals = document_log_likelihoods(self.model, self.tokenizer, documents, mode=self.mode,
                                          mask_token=self.mask, score_first_token=True,
                                          max_tokens=self.max_tokens)
        results = [log_likelihood for log_likelihood, _ in totals]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from glm_ext.generation import fill_blanks

        special = self.tokenizer.special_ids
        outputs = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
            sampling = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 1.0 if sampling else 0.0)) if sampling else 0.0
            ids = self.tokenizer.encode(context)[-(self.max_length - 2):] + [special.gmask]
            result = fill_blanks(self.model, self.tokenizer, ids, max_new_tokens=max_new, temperature=temperature,
                                 top_k=options.pop("top_k", None), top_p=options.pop("top_p", None))
            text = result.blanks[0].text
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


# Registered by name, not by the class object: under ``python -m glm_ext.harness`` this file also
# runs as ``__main__``, and lm-eval refuses a second, different class under the same name.
model_registry.register("glm_ext", target="glm_ext.harness:GLMExtLM")


def _available(device: str | None) -> str:
    """lm-eval passes ``cuda:0`` unless told otherwise: on a machine without a GPU use the CPU."""
    if device is None:
        return "auto"
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but no CUDA device is visible: evaluating on the CPU")
        return "cpu"
    return device


def lm_eval_argv(arguments: list[str]) -> list[str]:
    """``lm_eval run`` arguments with ``--model glm_ext`` unless a model is named."""
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in arguments):
        arguments = ["--model", "glm_ext", *arguments]
    return ["run", *arguments]


def main(argv: list[str] | None = None) -> None:
    """``python -m glm_ext.harness [lm_eval flags]``: lm-eval's command line with ``glm_ext`` registered."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    arguments = lm_eval_argv(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]  # HarnessCLI reads sys.argv
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
