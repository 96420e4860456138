"""Typed Python face of the compiled ops (``torch.ops.glm_ext``).

This is the only module of the package that touches ``torch.ops``. For every op it adds the fake
(meta) kernel used by ``torch.compile`` and the autograd formula, whose backward calls the
registered backward op. Schemas are in ``csrc/registration.cpp``; plain PyTorch equivalents in
``glm_ext.reference``.
"""

from __future__ import annotations

import torch

from glm_ext import _C  # noqa: F401  (loads the library: registers torch.ops.glm_ext)

__all__ = ["blank_infilling", "embedding_2d", "rotary_2d", "span_shuffle_batch"]

_ops = torch.ops.glm_ext


# --------------------------------------------------------------------------------------------
# embedding_2d


def embedding_2d(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    block_position_weight: torch.Tensor,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """GLM's input embedding in one pass: ``word[ids] + position[pos] + block_position[bpos]``.

    Ids (int32 or int64) share one shape ``S``; the tables are ``[rows, hidden]`` of one floating
    dtype; the result is ``[*S, hidden]`` in that dtype, summed in float32 and rounded once. The
    backward accumulates into all three tables deterministically (fixed summation order).

    ``check_ids``: ids outside their table raise ``IndexError``. On the CPU the kernel checks as it
    reads; on other devices this costs one host synchronisation, so hot loops that already trust
    their ids (and CUDA graphs) may pass ``False``. Unchecked out-of-range ids never read outside a
    table: their output row is NaN and they add nothing to the gradients. The check is skipped
    while ``torch.compile`` traces.
    """
    if check_ids:
        _check_index_ranges(
            (input_ids, word_weight, "input_ids", "word_weight"),
            (position_ids, position_weight, "position_ids", "position_weight"),
            (block_position_ids, block_position_weight, "block_position_ids", "block_position_weight"),
        )
    return _ops.embedding_2d(
        input_ids, position_ids, block_position_ids, word_weight, position_weight, block_position_weight
    )


def _check_index_ranges(*checks: tuple[torch.Tensor, torch.Tensor, str, str]) -> None:
    ids = [c[0] for c in checks]
    if torch.compiler.is_compiling() or any(t.device.type == "cpu" for t in ids):
        return  # the CPU kernel checks while it gathers
    if not all(isinstance(t, torch.Tensor) and not t.is_floating_point() and t.numel() > 0 for t in ids):
        return  # empty or mistyped ids: the op itself reports what is wrong
    # One synchronisation for all three tensors.
    bounds = torch.stack([torch.stack(t.aminmax()).to(torch.int64) for t in ids]).tolist()
    for (low, high), (_, table, name, table_name) in zip(bounds, checks):
        rows = table.shape[0]
        if low < 0 or high >= rows:
            raise IndexError(
                f"{name} must lie in [0, {rows}) ({table_name} has {rows} rows), "
                f"got values in [{low}, {high}]"
            )


@torch.library.register_fake("glm_ext::embedding_2d")
def _embedding_2d_fake(input_ids, position_ids, block_position_ids, word_weight, position_weight, block_position_weight):
    return word_weight.new_empty((*input_ids.shape, word_weight.shape[1]))


@torch.library.register_fake("glm_ext::embedding_2d_backward")
def _embedding_2d_backward_fake(
    grad_output, input_ids, position_ids, block_position_ids, num_words, num_positions, num_block_positions
):
    hidden = grad_output.shape[-1]
    return (
        grad_output.new_empty((num_words, hidden)),
        grad_output.new_empty((num_positions, hidden)),
        grad_output.new_empty((num_block_positions, hidden)),
    )


def _embedding_2d_setup_context(ctx, inputs, output):
    input_ids, position_ids, block_position_ids, word_weight, position_weight, block_position_weight = inputs
    ctx.save_for_backward(input_ids, position_ids, block_position_ids)
    ctx.num_rows = (word_weight.shape[0], position_weight.shape[0], block_position_weight.shape[0])


def _embedding_2d_backward(ctx, grad_output):
    input_ids, position_ids, block_position_ids = ctx.saved_tensors
    grad_word, grad_position, grad_block = _ops.embedding_2d_backward(
        grad_output, input_ids, position_ids, block_position_ids, *ctx.num_rows
    )
    needs = ctx.needs_input_grad
    return (
        None,
        None,
        None,
        grad_word if needs[3] else None,
        grad_position if needs[4] else None,
        grad_block if needs[5] else None,
    )


torch.library.register_autograd(
    "glm_ext::embedding_2d", _embedding_2d_backward, setup_context=_embedding_2d_setup_context
)


# The backward is linear in grad_output and its adjoint is the forward gather: double backward.
def _embedding_2d_backward_setup_context(ctx, inputs, output):
    _, input_ids, position_ids, block_position_ids, *_ = inputs
    ctx.save_for_backward(input_ids, position_ids, block_position_ids)


def _embedding_2d_double_backward(ctx, grad_word, grad_position, grad_block):
    input_ids, position_ids, block_position_ids = ctx.saved_tensors
    grad_grad_output = _ops.embedding_2d(input_ids, position_ids, block_position_ids, grad_word, grad_position, grad_block)
    return grad_grad_output, None, None, None, None, None, None


torch.library.register_autograd(
    "glm_ext::embedding_2d_backward",
    _embedding_2d_double_backward,
    setup_context=_embedding_2d_backward_setup_context,
)


# --------------------------------------------------------------------------------------------
# rotary_2d


def rotary_2d(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor,
    base: float = 10000.0,
) -> torch.Tensor:
    """2D rotary embedding (ChatGLM-6B style) of ``x`` ``[batch, seq, heads, head_dim]`` (ids
    ``[batch, seq]``) or packed ``[tokens, heads, head_dim]`` (ids ``[tokens]``).

    The first half of ``head_dim`` is rotated by ``position_ids``, the second by
    ``block_position_ids`` (rotate-half pairs, ``inv_freq[j] = base ** (-4j / head_dim)``, angles
    in float32, float64 for float64 input). ``head_dim`` must be a multiple of 4; ``x`` needs only
    a contiguous last dimension, so the q/k views of a fused QKV projection go in without a copy.
    Returns a new contiguous tensor.
    """
    return _ops.rotary_2d(x, position_ids, block_position_ids, float(base))


@torch.library.register_fake("glm_ext::rotary_2d")
def _rotary_2d_fake(x, position_ids, block_position_ids, base=10000.0):
    return x.new_empty(x.shape)


@torch.library.register_fake("glm_ext::rotary_2d_backward")
def _rotary_2d_backward_fake(grad_output, position_ids, block_position_ids, base=10000.0):
    return grad_output.new_empty(grad_output.shape)


def _rotary_2d_setup_context(ctx, inputs, output):
    _, position_ids, block_position_ids, base = inputs
    ctx.save_for_backward(position_ids, block_position_ids)
    ctx.base = base


def _rotary_2d_backward(ctx, grad_output):
    position_ids, block_position_ids = ctx.saved_tensors
    grad_x = _ops.rotary_2d_backward(grad_output, position_ids, block_position_ids, ctx.base)
    return grad_x, None, None, None


torch.library.register_autograd("glm_ext::rotary_2d", _rotary_2d_backward, setup_context=_rotary_2d_setup_context)


# rotary_2d_backward is the inverse rotation, so its gradient is the forward rotation.
def _rotary_2d_double_backward(ctx, grad):
    position_ids, block_position_ids = ctx.saved_tensors
    return _ops.rotary_2d(grad, position_ids, block_position_ids, ctx.base), None, None, None


torch.library.register_autograd(
    "glm_ext::rotary_2d_backward", _rotary_2d_double_backward, setup_context=_rotary_2d_setup_context
)


# --------------------------------------------------------------------------------------------
# Blank-infilling batches (no gradients: data pipeline ops)


def span_shuffle_batch(
    tokens: torch.Tensor,
    lengths: torch.Tensor | None,
    sentence_end_ids: torch.Tensor,
    *,
    seed: int,
    objective_probs: tuple[float, float, float],
    mask_ratio: float,
    poisson_lambda: float,
    max_span_length: int,
    min_document_ratio: float,
    cls_id: int,
    eos_id: int,
    pad_id: int,
    mask_id: int,
    smask_id: int,
    gmask_id: int,
    sop_id: int,
    eop_id: int,
    vocab_size: int,
    output_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blank-infilling rows from a batch of token rows ``[batch, length]`` (GLM_SPEC section 1).

    Returns ``tokens, targets, loss_mask`` (int64 ``[batch, width]``), ``position_ids``
    (``[batch, 2, width]``), ``sep`` (int32 ``[batch]``) and the objective drawn for the batch (a
    0-dim int64: 0 token, 1 sentence, 2 document level). ``width`` is ``output_length``, or the
    longest assembled row when 0. Same seed, same batch, on every device. ``glm_ext.data`` has the
    friendly interface.
    """
    return _ops.span_shuffle_batch(
        tokens, lengths, sentence_end_ids, int(seed) & 0x7FFFFFFFFFFFFFFF, [float(p) for p in objective_probs],
        float(mask_ratio), float(poisson_lambda), int(max_span_length), float(min_document_ratio),
        cls_id, eos_id, pad_id, mask_id, smask_id, gmask_id, sop_id, eop_id, vocab_size, output_length,
    )


@torch.library.register_fake("glm_ext::span_shuffle_batch")
def _span_shuffle_batch_fake(
    tokens, lengths, sentence_end_ids, seed, objective_probs, mask_ratio, poisson_lambda, max_span_length,
    min_document_ratio, cls_id, eos_id, pad_id, mask_id, smask_id, gmask_id, sop_id, eop_id, vocab_size,
    output_length=0,
):
    width = output_length if output_length > 0 else torch.library.get_ctx().new_dynamic_size()
    batch = tokens.shape[0]
    long = dict(dtype=torch.int64, device=tokens.device)
    return (
        torch.empty(batch, width, **long),
        torch.empty(batch, width, **long),
        torch.empty(batch, width, **long),
        torch.empty(batch, 2, width, **long),
        torch.empty(batch, dtype=torch.int32, device=tokens.device),
        torch.empty((), **long),
    )


def blank_infilling(
    tokens: torch.Tensor, spans: torch.Tensor, order: torch.Tensor, *, mask_id: int, sop_id: int, eop_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One blank-infilling row from explicit spans ``[k, 2]`` (half-open, text order) and the Part B
    order ``[k]``: ``tokens, targets, loss_mask, position_ids [2, L], sep`` (0-dim)."""
    return _ops.blank_infilling(tokens, spans, order, mask_id, sop_id, eop_id)


@torch.library.register_fake("glm_ext::blank_infilling")
def _blank_infilling_fake(tokens, spans, order, mask_id, sop_id, eop_id):
    width = tokens.shape[0] + 2 * spans.shape[0]
    long = dict(dtype=torch.int64, device=tokens.device)
    return (
        torch.empty(width, **long),
        torch.empty(width, **long),
        torch.empty(width, **long),
        torch.empty(2, width, **long),
        torch.empty((), **long),
    )
