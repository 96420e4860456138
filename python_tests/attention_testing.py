"""Inputs and PyTorch's own attention for the mixed-mask attention tests (test_attention.py and
test_flash_emulation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from glm_ext import reference


def make_qkv(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype=torch.float64, device="cpu"):
    q = torch.randn(batch, seq_q, heads_q, dim, dtype=dtype, device=device)
    k = torch.randn(batch, seq_k, heads_kv, dim, dtype=dtype, device=device)
    v = torch.randn(batch, seq_k, heads_kv, dim, dtype=dtype, device=device)
    return q, k, v


def cu_seqlens(lengths, device="cpu"):
    offsets = [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()]
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def make_packed(lengths_q, lengths_k, heads_q, heads_kv, dim, dtype=torch.float64):
    q = torch.randn(sum(lengths_q), heads_q, dim, dtype=dtype)
    k = torch.randn(sum(lengths_k), heads_kv, dim, dtype=dtype)
    v = torch.randn(sum(lengths_k), heads_kv, dim, dtype=dtype)
    return q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def sdpa_math(q, k, v, sep, cu_seqlens_q=None, cu_seqlens_k=None):
    """PyTorch's own attention in q's dtype: SDPA's math backend with the dense mixed mask (one
    sample at a time in the packed layout)."""
    if cu_seqlens_q is not None:
        pieces = []
        for i in range(len(sep)):
            qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            if qs.stop > qs.start:
                pieces.append(sdpa_math(q[None, qs], k[None, ks], v[None, ks], sep[i : i + 1])[0])
        return torch.cat(pieces)
    mask = reference.mixed_mask(sep, q.shape[1], k.shape[1])[:, None]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
    return out.transpose(1, 2)


def attention_in_dtype(q, k, v, sep, cu_seqlens_q=None, cu_seqlens_k=None):
    """The mixed-mask attention written out in PyTorch ops in q's dtype, nothing upcast (scores,
    softmax and products rounded to the dtype, as flash-attention's tests' ``attention_ref`` with
    ``upcast=False``): the "PyTorch in the same dtype" of flash-attention's tolerance rule for
    kernels that round P and dS to the input dtype. Packed samples one at a time."""
    if cu_seqlens_q is not None:
        pieces = []
        for i in range(len(sep)):
            qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            pieces.append(attention_in_dtype(q[None, qs], k[None, ks], v[None, ks], sep[i : i + 1])[0])
        return torch.cat(pieces)
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    scores = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = reference.mixed_mask(sep.to(q.device), q.shape[1], k.shape[1])[:, None]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ vt).transpose(1, 2)
