"""Typed Python face of the compiled ops (``torch.ops.glm_ext``).

This is the only module of the package that touches ``torch.ops``. For every op it adds the fake
(meta) kernel used by ``torch.compile`` and the autograd formula, whose backward calls the
registered backward op. Schemas are in ``csrc/registration.cpp``; plain PyTorch equivalents in
``glm_ext.reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glm_ext import _C  # noqa: F401  (loads the library: registers torch.ops.glm_ext)

__all__ = ["blank_infilling", "embedding_2d", "mixed_mask_attention", "rotary_2d", "span_shuffle_batch"]

_ops = torch.ops.glm_ext


def _check_same_device(prefix: str, first_name: str, first: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """The kernels' device check, repeated by every fake kernel: a fake (meta) kernel runs instead
    of the device kernels whenever any input is a meta tensor, and would otherwise hand back
    uninitialised outputs for a meta tensor among CPU tensors."""
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{prefix}{name} must be on the device of {first_name} ({first.device}), got {t.device}")


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
    _check_same_device(
        "", "input_ids", input_ids, position_ids=position_ids, block_position_ids=block_position_ids,
        word_weight=word_weight, position_weight=position_weight, block_position_weight=block_position_weight,
    )
    return word_weight.new_empty((*input_ids.shape, word_weight.shape[1]))


@torch.library.register_fake("glm_ext::embedding_2d_backward")
def _embedding_2d_backward_fake(
    grad_output, input_ids, position_ids, block_position_ids, num_words, num_positions, num_block_positions
):
    _check_same_device(
        "", "input_ids", input_ids, position_ids=position_ids, block_position_ids=block_position_ids,
        grad_output=grad_output,
    )
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
    _check_same_device("", "x", x, position_ids=position_ids, block_position_ids=block_position_ids)
    return x.new_empty(x.shape)


@torch.library.register_fake("glm_ext::rotary_2d_backward")
def _rotary_2d_backward_fake(grad_output, position_ids, block_position_ids, base=10000.0):
    _check_same_device("", "grad_output", grad_output, position_ids=position_ids, block_position_ids=block_position_ids)
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
# mixed_mask_attention


def mixed_mask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under GLM's mixed mask (GLM_SPEC section 2), never materialising it.

    Query ``i`` (absolute position ``seq_k - seq_q + i``) sees key ``j`` iff ``j < sep`` or
    ``j <= position``: bidirectional over Part A, causal over Part B.

    Padded layout: ``q [batch, seq_q, heads_q, head_dim]``, ``k, v [batch, seq_k, heads_kv,
    head_dim]``, ``sep`` (int32 or int64) ``[batch]`` with values in ``[0, seq_k]``. ``seq_q <
    seq_k`` is decoding with a key/value cache: the queries are the last ``seq_q`` positions.
    Packed layout (flash-attention's "varlen"): ``q [total_q, heads_q, head_dim]`` with int32
    ``cu_seqlens_q [n + 1]`` (sample ``i`` is rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``), the same
    for ``k, v`` with ``cu_seqlens_k``, and ``sep [n]``: independent samples, each with its own
    ``sep``. ``heads_q`` must be a multiple of ``heads_kv`` (grouped-query / multi-query attention).
    Inputs may be strided views (e.g. of a fused QKV projection) as long as ``head_dim`` is
    contiguous. On the CPU: float32, float16, bfloat16 and float64, any ``head_dim`` in 1..256.

    ``max_seqlen_q`` / ``max_seqlen_k`` (packed only): the longest sample; computed from
    ``cu_seqlens`` with one host synchronisation when not given (not under ``torch.compile``, where
    the kernel finds them). ``softmax_scale`` defaults to ``head_dim ** -0.5``.

    Returns the output (like ``q``; accumulated in float32, float64 for float64) and, with
    ``return_lse``, the natural log-sum-exp of each query row's scaled scores: float32 (float64 for
    float64 inputs), ``[batch, heads_q, seq_q]`` padded, ``[heads_q, total_q]`` packed. Both are
    differentiable; the backward is deterministic. On the CPU a masked pair never enters the
    arithmetic: a NaN in a row of ``q``, ``k`` or ``v`` reaches only the outputs and gradients of
    the rows that see it (a dense ``softmax(...) @ v``, like ``glm_ext.reference``, spreads it
    further through ``0 * NaN``).
    """
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("mixed_mask_attention: pass both cu_seqlens_q and cu_seqlens_k (packed) or neither (padded)")
    if softmax_scale is None:
        # head_dim 0 is not divided by here: the op refuses it ("head_dim must lie in [1, 256]").
        softmax_scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    if cu_seqlens_q is None:
        max_seqlen_q = max_seqlen_k = 0  # the padded layout takes its lengths from the shapes
    elif max_seqlen_q is None or max_seqlen_k is None:
        found = _max_seqlens(cu_seqlens_q, cu_seqlens_k)
        max_seqlen_q = found[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = found[1] if max_seqlen_k is None else max_seqlen_k
    out, lse = _ops.mixed_mask_attention(
        q, k, v, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale)
    )
    return (out, lse) if return_lse else out


def _max_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> tuple[int, int]:
    """The longest query and key sample (one host synchronisation); 0, i.e. "unknown, the kernel
    finds it", under ``torch.compile`` or for arguments the op will reject anyway."""
    valid = all(
        isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() >= 2 and not t.is_floating_point()
        for t in (cu_seqlens_q, cu_seqlens_k)
    )
    if torch.compiler.is_compiling() or not valid or cu_seqlens_q.device != cu_seqlens_k.device:
        return 0, 0
    lengths = torch.stack([cu_seqlens_q.diff().max(), cu_seqlens_k.diff().max()]).tolist()
    return max(lengths[0], 0), max(lengths[1], 0)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("glm_ext::mixed_mask_attention")
def _mixed_mask_attention_fake(q, k, v, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    _check_same_device(
        "mixed_mask_attention: ", "q", q, k=k, v=v, sep=sep, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k
    )
    if cu_seqlens_q is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        lse_shape = (q.shape[1], q.shape[0])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=_lse_dtype(q))


@torch.library.register_fake("glm_ext::mixed_mask_attention_backward")
def _mixed_mask_attention_backward_fake(
    grad_out, grad_lse, q, k, v, out, lse, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
):
    _check_same_device(
        "mixed_mask_attention: ", "q", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out, lse=lse, sep=sep,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _mixed_mask_attention_setup_context(ctx, inputs, output):
    q, k, v, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sep, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.softmax_scale = softmax_scale


def _mixed_mask_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, sep, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = _ops.mixed_mask_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, sep, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, ctx.softmax_scale
    )
    needs = ctx.needs_input_grad
    return (
        grad_q if needs[0] else None,
        grad_k if needs[1] else None,
        grad_v if needs[2] else None,
        None, None, None, None, None, None,
    )


torch.library.register_autograd(
    "glm_ext::mixed_mask_attention", _mixed_mask_attention_backward, setup_context=_mixed_mask_attention_setup_context
)


# No double backward; registering one that refuses makes it an error instead of PyTorch's warning
# about a missing autograd kernel (and silently zero gradients).
def _mixed_mask_attention_double_backward(ctx, *grads):
    raise NotImplementedError("mixed_mask_attention: double backward (gradients of the gradients) is not supported")


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "glm_ext::mixed_mask_attention_backward", _mixed_mask_attention_double_backward, setup_context=_no_context
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
    special_ids: Sequence[int],
    vocab_size: int,
    output_length: int = 0,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blank-infilling rows from a batch of token rows ``[batch, length]`` (GLM_SPEC section 1).

    ``special_ids``: the ids of ``[CLS]``, ``<eos>``, pad, ``[MASK]``, ``[sMASK]``, ``[gMASK]``,
    ``<sop>`` and ``<eop>``, in this order. Returns ``tokens, targets, loss_mask`` (int64 ``[batch,
    width]``), ``position_ids`` (``[batch, 2, width]``), ``sep`` (int32 ``[batch]``) and the
    objective drawn for the batch (a 0-dim int64: 0 token, 1 sentence, 2 document level). ``width``
    is ``output_length``, or the longest assembled row when 0. Same seed, same batch, on every
    device; row ``i`` draws from its own generator, seeded from a hash of ``(seed, row_offset +
    i)``, so a batch split into parts (ranks, micro-batches) is drawn as one when each part passes
    the index of its first row as ``row_offset``; the objective depends on the seed alone. An empty
    row (length 0) stays empty (all
    padding, ``sep`` 0). A row that cannot be built raises ``ValueError`` naming the row: nothing
    but ``[CLS]``/``<eos>`` to mask, too short for the document level, or token-level spans that do
    not fit with a token between them (possible above ``mask_ratio`` 0.5) in 16 draws.
    ``glm_ext.data`` has the friendly interface.
    """
    return _ops.span_shuffle_batch(
        tokens, lengths, sentence_end_ids, int(seed) & 0x7FFFFFFFFFFFFFFF, [float(p) for p in objective_probs],
        float(mask_ratio), float(poisson_lambda), int(max_span_length), float(min_document_ratio),
        [int(i) for i in special_ids], vocab_size, output_length, row_offset,
    )


@torch.library.register_fake("glm_ext::span_shuffle_batch")
def _span_shuffle_batch_fake(
    tokens, lengths, sentence_end_ids, seed, objective_probs, mask_ratio, poisson_lambda, max_span_length,
    min_document_ratio, special_ids, vocab_size, output_length=0, row_offset=0,
):
    _check_same_device("", "tokens", tokens, lengths=lengths, sentence_end_ids=sentence_end_ids)
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
    _check_same_device("", "tokens", tokens, spans=spans, order=order)
    width = tokens.shape[0] + 2 * spans.shape[0]
    long = dict(dtype=torch.int64, device=tokens.device)
    return (
        torch.empty(width, **long),
        torch.empty(width, **long),
        torch.empty(width, **long),
        torch.empty(2, width, **long),
        torch.empty((), **long),
    )
