"""Plain PyTorch references for every glm_ext op.

These are the readable specification of what each op computes and the oracle the tests compare
against (usually run in float64). They favour clarity over speed and never call ``torch.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_2d(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    block_position_weight: torch.Tensor,
) -> torch.Tensor:
    """GLM's input embedding: word + position + block-position rows, summed (GLM_SPEC section 3)."""
    return (
        F.embedding(input_ids, word_weight)
        + F.embedding(position_ids, position_weight)
        + F.embedding(block_position_ids, block_position_weight)
    )


def rotary_2d_cos_sin(
    positions: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM's cos/sin table for one half: ``[*positions.shape, rot_dim]``.

    ``inv_freq[j] = base ** (-2j / rot_dim)``; the angle table is duplicated over both halves of
    ``rot_dim`` (non-interleaved rotate-half). Computed in ``dtype`` (float32 for 16/32-bit inputs).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=dtype) / rot_dim))
    angles = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_2d(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    block_position_ids: torch.Tensor,
    base: float = 10000.0,
) -> torch.Tensor:
    """2D rotary embedding (ChatGLM-6B style, GLM_SPEC section 3).

    ``x`` is ``[batch, seq, heads, head_dim]`` with ids ``[batch, seq]``, or packed
    ``[tokens, heads, head_dim]`` with ids ``[tokens]``. The first half of ``head_dim`` is rotated by
    ``position_ids``, the second half by ``block_position_ids``, each with rotate-half over its pairs.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    first, second = x.to(compute_dtype).chunk(2, dim=-1)
    rot_dim = first.shape[-1]
    rotated = []
    for half, ids in ((first, position_ids), (second, block_position_ids)):
        cos, sin = rotary_2d_cos_sin(ids, rot_dim, base, compute_dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        rotated.append(half * cos + _rotate_half(half) * sin)
    return torch.cat(rotated, dim=-1).to(x.dtype)


def mixed_mask(sep: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """GLM's attention mask as booleans ``[batch, seq_q, seq_k]`` (True = may attend).

    Query ``i`` (absolute position ``seq_k - seq_q + i``) sees key ``j`` iff ``j < sep`` or
    ``j <= position``: bidirectional over Part A, causal over Part B (GLM_SPEC section 2).
    """
    query_pos = torch.arange(seq_k - seq_q, seq_k, device=sep.device)[:, None]
    key_pos = torch.arange(seq_k, device=sep.device)[None, :]
    return (key_pos < sep.view(-1, 1, 1)) | (key_pos <= query_pos)


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
):
    """Softmax attention under GLM's mixed mask, materialised (the oracle, not a fast path).

    The signature is that of ``glm_ext.ops.mixed_mask_attention``; ``max_seqlen_q`` and
    ``max_seqlen_k`` (a launch hint of the fused kernels) are accepted and ignored.

    Padded layout: ``q [batch, seq_q, heads_q, dim]``, ``k, v [batch, seq_k, heads_kv, dim]``,
    ``sep [batch]``. Packed layout: ``q [total_q, heads_q, dim]`` with ``cu_seqlens_q [n + 1]``
    (likewise for k/v) and ``sep [n]``, every sample independent. ``heads_q`` is a multiple of
    ``heads_kv`` (grouped-query attention). Computed in float32 (float64 for float64 input); returns
    the output in q's dtype and, if asked, the float32 log-sum-exp ``[batch, heads_q, seq_q]``
    (``[heads_q, total_q]`` packed).
    """
    if cu_seqlens_q is not None:
        outputs, lses = [], []
        for i in range(len(sep)):
            qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            out, lse = mixed_mask_attention(
                q[None, qs], k[None, ks], v[None, ks], sep[i : i + 1], softmax_scale=softmax_scale, return_lse=True
            )
            outputs.append(out[0])
            lses.append(lse[0])
        out, lse = torch.cat(outputs), torch.cat(lses, dim=-1)
        return (out, lse) if return_lse else out

    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    groups = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mixed_mask(sep, q.shape[1], k.shape[1])[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.softmax(scores, dim=-1) @ vf).transpose(1, 2).to(q.dtype)
    return (out, lse.float() if compute_dtype != torch.float64 else lse) if return_lse else out


def blank_infilling(
    tokens: list[int], spans: list[tuple[int, int]], order: list[int], mask_id: int, sop_id: int, eop_id: int
) -> dict[str, list]:
    """One blank-infilling row, literally as GLM_SPEC section 1 states it.

    ``spans`` are half-open ``(start, end)`` in text order; ``order`` lists span indices in Part B
    order. Returns lists ``tokens``, ``targets``, ``loss_mask``, ``position_ids`` (two rows) and
    the int ``sep``.
    """
    part_a, mask_index, last = [], {}, 0
    for index, (start, end) in enumerate(spans):
        part_a += tokens[last:start]
        mask_index[index] = len(part_a)
        part_a.append(mask_id)
        last = end
    part_a += tokens[last:]
    inputs_b, targets_b, position_b, block_b = [], [], [], []
    for index in order:
        start, end = spans[index]
        span = tokens[start:end]
        inputs_b += [sop_id] + span
        targets_b += span + [eop_id]
        position_b += [mask_index[index]] * (len(span) + 1)
        block_b += list(range(1, len(span) + 2))
    return {
        "tokens": part_a + inputs_b,
        "targets": part_a + targets_b,
        "loss_mask": [0] * len(part_a) + [1] * len(inputs_b),
        "position_ids": [list(range(len(part_a))) + position_b, [0] * len(part_a) + block_b],
        "sep": len(part_a),
    }
