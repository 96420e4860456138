"""Batches for training: the DataLoader collate function, and packing of independent samples into
one row for the varlen (``cu_seqlens``) attention."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from glm_ext.data.blank_infilling import BlankInfillingBatch, BlankInfillingConfig, span_shuffle_batch


class BlankInfillingCollator:
    """A ``collate_fn`` turning token rows into :class:`BlankInfillingBatch` es of fixed width.

    Rows are 1-D integer token sequences in the authors' format (``[CLS]`` then text; documents end with
    ``<eos>``), at most :attr:`input_length` long: the longest row whose blank-infilling row always
    fits in ``max_length`` (each span adds two tokens). Every batch is ``max_length`` wide, so
    shapes stay static for ``torch.compile`` and CUDA graphs.

    Batch ``k`` of DataLoader worker ``w`` is drawn with a seed derived from ``(seed, w, k)``:
    reproducible, and different across workers. :meth:`state_dict` / :meth:`load_state_dict`
    carry ``k`` for resumed runs.

    Row ``r`` of a batch with seed ``s`` is drawn from the random stream ``(s, r)`` alone. A batch
    split into parts (micro-batches, ranks) is drawn as one by :meth:`collate` with one seed from
    :meth:`next_seed` and each part's ``first_row``: its row ``i`` is then drawn as row
    ``first_row + i`` of the whole.
    """

    def __init__(self, tokenizer, max_length: int, *, config: BlankInfillingConfig = BlankInfillingConfig(), seed: int = 0):
        if max_length < 4:
            raise ValueError(f"max_length must be at least 4, got {max_length}")
        self.special_ids = tokenizer.special_ids
        self.vocab_size = tokenizer.vocab_size
        self.sentence_end_ids = torch.as_tensor(tokenizer.sentence_end_ids, dtype=torch.int64)
        self.max_length = max_length
        self.config = config
        self.input_length = config.max_input_length(max_length)
        self.seed = seed
        self.batches_drawn = 0

    def __call__(self, rows: Sequence[Any]) -> BlankInfillingBatch:
        return self.collate(rows, seed=self.next_seed())

    def collate(self, rows: Sequence[Any], *, seed: int, first_row: int = 0) -> BlankInfillingBatch:
        """``rows`` drawn as rows ``first_row, first_row + 1, ...`` of a batch with ``seed``."""
        if len(rows) == 0:
            raise ValueError("cannot collate an empty list of rows")
        if first_row < 0:
            raise ValueError(f"first_row must be non-negative, got {first_row}")
        arrays = [np.asarray(row) for row in rows]
        not_ids = [i for i, a in enumerate(arrays) if a.size and a.dtype.kind not in "iu"]
        if not_ids:  # casting would truncate 3.7 to 3 without a word
            raise TypeError(
                f"rows must hold integer token ids; rows {not_ids[:5]} hold {arrays[not_ids[0]].dtype} values"
            )
        tensors = [torch.as_tensor(a, dtype=torch.int64).reshape(-1) for a in arrays]
        too_long = [i for i, t in enumerate(tensors) if len(t) > self.input_length]
        if too_long:
            raise ValueError(
                f"rows {too_long[:5]} are longer than input_length={self.input_length} (the longest input "
                f"whose blank-infilling row fits max_length={self.max_length}); cut rows to that length"
            )
        lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
        padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=self.special_ids.pad)
        return span_shuffle_batch(
            padded,
            special_ids=self.special_ids,
            vocab_size=self.vocab_size,
            sentence_end_ids=self.sentence_end_ids,
            config=self.config,
            seed=seed,
            lengths=lengths,
            output_length=self.max_length,
            row_offset=first_row,
        )

    def next_seed(self) -> int:
        """The seed of the next batch (advances :meth:`state_dict`'s batch count)."""
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        seed = np.random.SeedSequence([self.seed, worker_id, self.batches_drawn]).generate_state(1, np.uint64)[0]
        self.batches_drawn += 1
        return int(seed) & 0x7FFFFFFFFFFFFFFF

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"state was saved with seed {state.get('seed')}, this collator has seed {self.seed}")
        self.batches_drawn = int(state["batches_drawn"])


@dataclasses.dataclass
class PackedBatch:
    """Independent samples concatenated into one row for the varlen attention.

    ``tokens``, ``targets``, ``loss_mask``: int64 ``[total]``; ``position_ids``: int64
    ``[2, total]`` (positions restart at 0 in every sample); ``sep``: int32 ``[n]``, Part A's
    length within each sample; ``cu_seqlens``: int32 ``[n + 1]`` sample boundaries;
    ``max_seqlen``: the longest sample. Tokens past ``cu_seqlens[-1]`` are padding.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def unpad_rows(batch: BlankInfillingBatch) -> list[BlankInfillingBatch]:
    """The rows of a padded batch without their padding. A row's length is ``sep`` plus its Part B,
    which is exactly where ``loss_mask`` is 1."""
    lengths = batch.sep.to(torch.int64) + batch.loss_mask.sum(dim=1)
    return [
        BlankInfillingBatch(
            batch.tokens[i, :n], batch.targets[i, :n], batch.loss_mask[i, :n], batch.position_ids[i, :, :n],
            batch.sep[i], batch.objective,
        )
        for i, n in enumerate(lengths.tolist())
    ]


def pack_samples(
    samples: Iterable[BlankInfillingBatch], max_tokens: int, *, pad_id: int, pad_to_max_tokens: bool = True
) -> list[PackedBatch]:
    """Packs single-row samples (see :func:`unpad_rows`) into rows of at most ``max_tokens``, in
    order (a sample that does not fit starts the next row), each sample keeping its own ``sep``."""
    packs: list[list[BlankInfillingBatch]] = [[]]
    used = 0
    for sample in samples:
        length = sample.tokens.shape[-1]
        if length > max_tokens:
            raise ValueError(f"a sample of {length} tokens cannot fit max_tokens={max_tokens}")
        if used + length > max_tokens:
            packs.append([])
            used = 0
        packs[-1].append(sample)
        used += length
    return [_pack(group, max_tokens if pad_to_max_tokens else None, pad_id) for group in packs if group]


def _pack(group: Sequence[BlankInfillingBatch], width: int | None, pad_id: int) -> PackedBatch:
    lengths = [s.tokens.shape[-1] for s in group]
    total = sum(lengths)
    pad = (width or total) - total

    def cat(name: str, fill: int) -> torch.Tensor:
        parts = [getattr(s, name) for s in group]
        tail = parts[0].new_full((*parts[0].shape[:-1], pad), fill)
        return torch.cat([*parts, tail], dim=-1)

    cu_seqlens = torch.zeros(len(group) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    return PackedBatch(
        tokens=cat("tokens", pad_id),
        targets=cat("targets", pad_id),
        loss_mask=cat("loss_mask", 0),
        position_ids=cat("position_ids", 0),
        sep=torch.stack([s.sep.to(torch.int32).reshape(()) for s in group]),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
    )
