"""glm_ext.data.collate and the objective mixes, against expectations written by hand from GLM_SPEC
(section 1's worked example, section 2's released mixes), not read back from the code under test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from glm_ext.data import BlankInfillingBatch, BlankInfillingCollator, BlankInfillingConfig, unpad_rows
from glm_ext.tokenizer import SpecialIds

SPECIAL = SpecialIds(pad=0, eos=5, cls=1, sep=8, mask=2, smask=6, gmask=7, sop=3, eop=4, unk=9)
TOKENIZER = SimpleNamespace(special_ids=SPECIAL, vocab_size=200, sentence_end_ids=[20, 21])


def test_glm_10b_mix_is_the_released_one():
    # GLM_SPEC 2: "GLM-10B used 0.5 token / 0.3 sentence / 0.2 document (minimum ratio 0.25)".
    config = BlankInfillingConfig.glm_10b()
    assert config.objective_probs == (0.5, 0.3, 0.2)
    assert config.min_document_ratio == 0.25
    assert (config.mask_ratio, config.poisson_lambda) == (BlankInfillingConfig().mask_ratio,
                                                          BlankInfillingConfig().poisson_lambda)


def test_unpad_rows_keeps_every_token_of_each_row():
    # Row 0: GLM_SPEC 1's worked example (x1..x6 = 11..16, spans [x2] and [x4 x5]); 11 tokens, Part A 6.
    # Row 1: [CLS] 31 32 33 with the span [32]: Part A [CLS] 31 [MASK] 33, Part B <sop> 32; 6 tokens.
    pad = 0
    tokens = torch.tensor([[1, 11, 2, 13, 2, 16, 3, 14, 15, 3, 12, pad, pad],
                           [1, 31, 2, 33, 3, 32, pad, pad, pad, pad, pad, pad, pad]])
    targets = torch.tensor([[1, 11, 2, 13, 2, 16, 14, 15, 4, 12, 4, pad, pad],
                            [1, 31, 2, 33, 32, 4, pad, pad, pad, pad, pad, pad, pad]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0],
                              [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    position_ids = torch.tensor([[[0, 1, 2, 3, 4, 5, 4, 4, 4, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2, 0, 0]],
                                 [[0, 1, 2, 3, 2, 2, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0]]])
    batch = BlankInfillingBatch(tokens, targets, loss_mask, position_ids, torch.tensor([6, 4], dtype=torch.int32))
    rows = unpad_rows(batch)
    assert [row.tokens.tolist() for row in rows] == [[1, 11, 2, 13, 2, 16, 3, 14, 15, 3, 12], [1, 31, 2, 33, 3, 32]]
    assert [row.targets.tolist() for row in rows] == [[1, 11, 2, 13, 2, 16, 14, 15, 4, 12, 4], [1, 31, 2, 33, 32, 4]]
    assert [row.loss_mask.tolist() for row in rows] == [[0] * 6 + [1] * 5, [0] * 4 + [1] * 2]
    assert rows[1].position_ids.tolist() == [[0, 1, 2, 3, 2, 2], [0, 0, 0, 0, 1, 2]]
    assert [int(row.sep) for row in rows] == [6, 4]


def rows(count: int, length: int) -> list[np.ndarray]:
    """Identical rows: [CLS] then text tokens 22.., a sentence end every 7 tokens."""
    row = np.array([1] + [20 if i % 7 == 6 else 22 + i % 50 for i in range(length - 1)], dtype=np.int64)
    return [row.copy() for _ in range(count)]


class SameRows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> np.ndarray:
        return rows(1, 40)[0]


def test_dataloader_workers_draw_different_blanks():
    collator = BlankInfillingCollator(TOKENIZER, 64, seed=11)

    def batches():
        loader = torch.utils.data.DataLoader(SameRows(), batch_size=2, num_workers=2, collate_fn=collator)
        return [batch.tokens for batch in loader]

    first = batches()
    # Batches 0 and 1 are the first batch of worker 0 and of worker 1: the same rows, the same batch
    # count, so only the worker id can tell their blanks apart.
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[2], first[3])
    assert all(torch.equal(a, b) for a, b in zip(first, batches()))  # and each worker is reproducible


@pytest.mark.parametrize("row", [
    np.array([1, 22, 23.7, 24]),
    torch.tensor([1.0, 22.0, 23.0, 24.0]),
    [1, 22, 23.5, 24],
])
def test_float_ids_are_refused(row):
    collator = BlankInfillingCollator(TOKENIZER, 16, seed=0)
    with pytest.raises(TypeError, match=r"integer token ids; rows \[1\] hold float"):
        collator([np.array([1, 22, 23, 24]), row])
    assert collator([np.array([1, 22, 23, 24], dtype=np.uint16), torch.tensor([1, 22, 23])]).tokens.shape == (2, 16)
