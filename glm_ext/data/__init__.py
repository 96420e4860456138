"""The blank-infilling data pipeline (GLM_SPEC sections 1 and 4): token files and row streams,
span-shuffle batching with GLM's three objectives, collation and varlen packing."""

from glm_ext.data.blank_infilling import (
    OBJECTIVES,
    BlankInfillingBatch,
    BlankInfillingConfig,
    blank_infilling,
    span_shuffle_batch,
)
from glm_ext.data.collate import BlankInfillingCollator, PackedBatch, pack_samples, unpad_rows
from glm_ext.data.corpus import default_corpus
from glm_ext.data.datasets import PackedRowStream, TokenFile, prepare_token_file

__all__ = [
    "OBJECTIVES",
    "BlankInfillingBatch",
    "BlankInfillingCollator",
    "BlankInfillingConfig",
    "PackedBatch",
    "PackedRowStream",
    "TokenFile",
    "blank_infilling",
    "default_corpus",
    "pack_samples",
    "prepare_token_file",
    "span_shuffle_batch",
    "unpad_rows",
]
