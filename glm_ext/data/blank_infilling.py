"""Autoregressive blank infilling (GLM_SPEC section 1): one row from explicit spans, and whole
batches by the span-shuffle op with GLM's three objectives."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from glm_ext import ops

OBJECTIVES = ("token", "sentence", "document")
# The roles of ops.span_shuffle_batch's special_ids, in its order.
SPECIAL_ID_ORDER = ("cls", "eos", "pad", "mask", "smask", "gmask", "sop", "eop")


@dataclasses.dataclass(frozen=True)
class BlankInfillingConfig:
    """How blanks are drawn. Defaults are GLM-Base/Large's (token-level only);
    :meth:`glm_10b` is the released 10B mix.

    - ``mask_ratio``: token- and sentence-level spans cover at least ``int(mask_ratio * len)``
      tokens of a row (at least one); token-level spans keep a token between each other, so a row
      whose documents are too short for the ratio (many short documents, or a ratio near 0.5 or
      above) covers what fits instead: its segments are filled until no span fits;
    - ``poisson_lambda``, ``max_span_length``: token-level span lengths are Poisson(lambda)
      restricted to ``1..max_span_length`` and renormalised;
    - ``min_document_ratio``: the document-level suffix covers a uniform share of the row between
      this and all of it (the source keeps ``[CLS]`` and at least one more token);
    - ``objective_probs``: per-batch probabilities of the token, sentence and document objectives.
    """

    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    max_span_length: int = 40
    min_document_ratio: float = 0.5
    objective_probs: tuple[float, float, float] = (1.0, 0.0, 0.0)

    @classmethod
    def glm_10b(cls) -> BlankInfillingConfig:
        """GLM-10B's multi-task mix: 0.5 token / 0.3 sentence / 0.2 document, minimum ratio 0.25."""
        return cls(min_document_ratio=0.25, objective_probs=(0.5, 0.3, 0.2))

    def max_output_length(self, input_length: int) -> int:
        """The longest row any objective can assemble from ``input_length`` tokens: each span adds
        two tokens, and at most ``max(1, int(mask_ratio * n))`` spans are drawn."""
        return input_length + 2 * max(1, int(self.mask_ratio * input_length))

    def max_input_length(self, output_length: int) -> int:
        """The longest input row whose blank-infilling row always fits in ``output_length``."""
        n = output_length
        while n > 0 and self.max_output_length(n) > output_length:
            n -= 1
        if n < 3:
            raise ValueError(f"output_length={output_length} leaves no room for a blank-infilling row")
        return n


@dataclasses.dataclass
class BlankInfillingBatch:
    """Model-ready arrays (GLM_SPEC section 1). Rows are right-padded with ``pad``; padding has
    ``loss_mask`` 0 and position 0. For a single row (:func:`blank_infilling`) the batch dimension
    is absent and ``sep`` is 0-dim.

    ``tokens``, ``targets``, ``loss_mask``: int64 ``[batch, L]``; ``position_ids``: int64
    ``[batch, 2, L]`` (positions, block positions); ``sep``: int32 ``[batch]``, the length of Part
    A; ``objective``: which objective built the batch ("token", "sentence" or "document").
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    objective: str = "token"

    def to(self, device: torch.device | str) -> BlankInfillingBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return BlankInfillingBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def blank_infilling(
    tokens: Sequence[int] | torch.Tensor,
    spans: Sequence[tuple[int, int]],
    *,
    order: Sequence[int] | None = None,
    mask_id: int,
    sop_id: int,
    eop_id: int,
) -> BlankInfillingBatch:
    """One row from explicit half-open ``spans`` (in text order, not overlapping) and the Part B
    ``order`` (a permutation of span indices; default: text order). Deterministic: this is the
    assembly the batch op applies after drawing spans."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    span_tensor = torch.as_tensor(list(spans), dtype=torch.int64).reshape(-1, 2)
    order_tensor = torch.as_tensor(list(range(len(span_tensor))) if order is None else list(order), dtype=torch.int64)
    out_tokens, targets, loss_mask, position_ids, sep = ops.blank_infilling(
        tokens.cpu(), span_tensor, order_tensor, mask_id=mask_id, sop_id=sop_id, eop_id=eop_id
    )
    return BlankInfillingBatch(out_tokens, targets, loss_mask, position_ids, sep.to(torch.int32))


def span_shuffle_batch(
    rows: torch.Tensor,
    *,
    special_ids,
    vocab_size: int,
    sentence_end_ids: torch.Tensor | Sequence[int] = (),
    config: BlankInfillingConfig = BlankInfillingConfig(),
    seed: int,
    lengths: torch.Tensor | None = None,
    output_length: int = 0,
    row_offset: int = 0,
) -> BlankInfillingBatch:
    """Blank-infilling rows from token rows ``[batch, length]`` (CPU or CUDA tensors; row ``i``
    is ``rows[i, :lengths[i]]``). ``special_ids`` is a :class:`glm_ext.tokenizer.SpecialIds` (or
    anything with its fields). Rows are padded to ``output_length`` (0: the longest row); an empty
    row stays empty. The same seed gives the same batch, on every device. Row ``i`` is drawn as row
    ``row_offset + i`` of a batch with this seed (the parts of a batch split over ranks are then
    drawn as the whole would be)."""
    sentence_end_ids = torch.as_tensor(sentence_end_ids, dtype=torch.int64, device=rows.device)
    tokens, targets, loss_mask, position_ids, sep, objective = ops.span_shuffle_batch(
        rows,
        lengths,
        sentence_end_ids,
        seed=seed,
        objective_probs=config.objective_probs,
        mask_ratio=config.mask_ratio,
        poisson_lambda=config.poisson_lambda,
        max_span_length=config.max_span_length,
        min_document_ratio=config.min_document_ratio,
        special_ids=[getattr(special_ids, role) for role in SPECIAL_ID_ORDER],
        vocab_size=vocab_size,
        output_length=output_length,
        row_offset=row_offset,
    )
    return BlankInfillingBatch(tokens, targets, loss_mask, position_ids, sep, OBJECTIVES[int(objective)])
