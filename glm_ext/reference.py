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
