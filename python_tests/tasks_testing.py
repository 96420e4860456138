"""Shared pieces of the glm_ext.tasks tests: a small tokenizer, random float64 models, a model
whose next-token choices a table dictates, and a direct (one row, one forward pass, no padding)
log-probability oracle written independently of glm_ext.tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glm_ext.model import GLMConfig, GLMModel, pad_vocab_size
from glm_ext.tokenizer import GLMTokenizer

TEXTS = [
    'The "while" statement is used for repeated execution as long as an expression is true.',
    'The "if" statement is used for conditional execution.',
    'A "break" statement executed in the first suite terminates the loop without executing the else clause.',
    'The "for" statement is used to iterate over the elements of a sequence (such as a string, tuple or list).',
    "Is the passage true? Yes. No. Maybe. It was great. It was terrible.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine the threads' spinning makes
    each forward pass ~100x slower: these modules run with one (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_tokenizer() -> GLMTokenizer:
    return GLMTokenizer.train(TEXTS * 4, 600)


def random_model(tokenizer, *, encoding: str = "learned_2d", max_sequence_length: int = 128, seed: int = 0,
                 scale: float = 0.3) -> GLMModel:
    """A float64 GLM with every parameter random (so scores differ clearly from one another)."""
    config = GLMConfig(vocab_size=pad_vocab_size(tokenizer.vocab_size), hidden_size=32, num_layers=2, num_heads=4,
                       max_sequence_length=max_sequence_length, position_encoding=encoding)
    generator = torch.Generator().manual_seed(seed)
    model = GLMModel(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale)
    return model


def direct_log_probs(model, ids, positions, blocks, sep) -> torch.Tensor:
    """``log_softmax`` of the model's logits ``[L, V]`` for one row run alone."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([[positions, blocks]]), torch.tensor([sep]))
    return torch.log_softmax(logits[0].double(), dim=-1)


def blank_input(part_a, answer_inputs, mask_index):
    """(ids, positions, blocks, sep) of Part A followed by ``<sop>``-led Part B inputs."""
    n = len(part_a)
    k = len(answer_inputs)
    return (list(part_a) + list(answer_inputs), list(range(n)) + [mask_index] * k, [0] * n + list(range(1, k + 1)), n)


class TableModel(nn.Module):
    """A stand-in model: at every index its logits favour ``table[previous token]`` (0 elsewhere),
    where the previous token is the input token, or, at a ``<sop>``, the token before the blank's
    mask (found through the position id). Anything the table lacks predicts ``fallback``."""

    def __init__(self, config: GLMConfig, sop_id: int, table: dict[int, int], fallback: int) -> None:
        super().__init__()
        self.config = config
        self.sop_id = sop_id
        self.table = table
        self.fallback = fallback
        self.weight = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls = 0

    def forward(self, input_ids, position_ids, sep, *, kv_cache=None, cu_seqlens=None):
        assert kv_cache is None and cu_seqlens is None
        self.calls += 1
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.config.vocab_size, dtype=torch.float64)
        for b in range(batch):
            for i in range(length):
                token = int(input_ids[b, i])
                if token == self.sop_id:
                    token = int(input_ids[b, int(position_ids[b, 0, i]) - 1])
                logits[b, i, self.table.get(token, self.fallback)] = 10.0
        return logits + self.weight
