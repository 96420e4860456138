"""The rows of one training step: shared out to ranks and micro-batches, padded or packed.

A step trains on ``world_size x grad_accum x micro_batch_size`` consecutive rows of a
:class:`~glm_ext.data.PackedRowStream`, numbered in stream order: the step's global batch. Rank
``k`` takes the ``grad_accum x micro_batch_size`` rows starting at ``k x grad_accum x
micro_batch_size`` and cuts them into ``grad_accum`` micro-batches, so no two ranks or
micro-batches share a row. All rows of a step are drawn as one blank-infilling batch (one collator
seed per step; global row ``r`` drawn as row ``r`` of that batch, see
:meth:`BlankInfillingCollator.collate`), so the step's data do not depend on how it is split:
2 ranks x 2 micro-batches x 4 rows train on exactly the rows of one process with one batch of 16.

Every rank's stream and collator advance past the whole step, so their states (what a checkpoint
saves) are the same on every rank, and they stay valid for another split of the same global batch.

Packed rows: :func:`pack_batch` concatenates a batch's rows without their padding into one
varlen row (``cu_seqlens``, a ``sep`` per sample) for the model's packed path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from glm_ext.data.blank_infilling import BlankInfillingBatch
from glm_ext.data.collate import BlankInfillingCollator, PackedBatch, pack_samples, unpad_rows
from glm_ext.data.datasets import PackedRowStream

__all__ = ["StepLayout", "batch_logits", "batch_to", "next_step_batches", "pack_batch", "padding_share", "real_tokens"]


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """How one step's rows are shared out: ``world_size`` ranks, each ``grad_accum`` micro-batches
    of ``micro_batch_size`` rows; this process is ``rank``."""

    micro_batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), got {self.rank!r}")

    @classmethod
    def for_global_batch(cls, global_batch_size: int, *, grad_accum: int, world_size: int, rank: int) -> StepLayout:
        """The layout giving ``global_batch_size`` rows a step (ValueError unless it divides evenly)."""
        parts = grad_accum * world_size
        if global_batch_size < 1 or global_batch_size % parts:
            raise ValueError(
                f"the global batch of {global_batch_size} rows (batch_size) does not split into "
                f"grad_accum={grad_accum} x world_size={world_size} equal micro-batches: choose a multiple of {parts}"
            )
        return cls(global_batch_size // parts, grad_accum, world_size, rank)

    @property
    def rows_per_rank(self) -> int:
        return self.grad_accum * self.micro_batch_size

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.rows_per_rank

    @property
    def first_row(self) -> int:
        """This rank's first row within the step."""
        return self.rank * self.rows_per_rank


def next_step_batches(
    stream: PackedRowStream, collator: BlankInfillingCollator, layout: StepLayout
) -> list[BlankInfillingBatch]:
    """This rank's ``grad_accum`` micro-batches of the next step (padded rows, on the CPU).

    Reads this rank's rows and skips the others' (the stream ends past the whole step); draws one
    collator seed for the step."""
    seed = collator.next_seed()
    stream.skip(layout.first_row)
    rows = [stream.next_row() for _ in range(layout.rows_per_rank)]
    stream.skip(layout.rows_per_step - layout.first_row - layout.rows_per_rank)
    batch = collator.collate(rows, seed=seed, first_row=layout.first_row)
    size = layout.micro_batch_size
    fields = (batch.tokens, batch.targets, batch.loss_mask, batch.position_ids, batch.sep)
    return [
        BlankInfillingBatch(*(t[start : start + size] for t in fields), batch.objective)
        for start in range(0, layout.rows_per_rank, size)
    ]


def pack_batch(batch: BlankInfillingBatch, *, pad_id: int) -> PackedBatch:
    """The rows of a padded batch without their padding, concatenated into one packed row (every
    row a sample with its own ``sep``): the model's packed input, holding no padding at all."""
    samples = unpad_rows(batch)
    total = sum(sample.tokens.shape[-1] for sample in samples)
    (packed,) = pack_samples(samples, total, pad_id=pad_id, pad_to_max_tokens=False)
    return packed


def real_tokens(batch: BlankInfillingBatch | PackedBatch) -> torch.Tensor:
    """How many of a batch's token positions are not padding (every sample's Part A and Part B), as
    an int64 scalar on the batch's device (reading it waits for the device)."""
    if isinstance(batch, PackedBatch):
        return batch.cu_seqlens[-1].to(torch.int64)
    return batch.sep.to(torch.int64).sum() + batch.loss_mask.sum(dtype=torch.int64)


def padding_share(batch: BlankInfillingBatch | PackedBatch) -> float:
    """The share of a batch's token positions that are padding (what the model computes for nothing)."""
    return 1.0 - int(real_tokens(batch)) / batch.tokens.numel()


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """A padded or packed batch with its tensors moved to ``device``."""
    moved = {
        field.name: value.to(device)
        for field in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, field.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def batch_logits(model: torch.nn.Module, batch: BlankInfillingBatch | PackedBatch) -> torch.Tensor:
    """The model's logits for a padded (``[B, L, V]``) or packed (``[T, V]``) batch; the loss takes
    them with ``batch.targets`` and ``batch.loss_mask``."""
    if isinstance(batch, PackedBatch):
        return model(batch.tokens, batch.position_ids, batch.sep, cu_seqlens=batch.cu_seqlens)
    return model(batch.tokens, batch.position_ids, batch.sep)
