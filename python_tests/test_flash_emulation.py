"""The CUDA kernels of csrc/ (flash attention, rotary_2d, span_shuffle_batch), run unchanged on
the CPU.

``flash_emulator/`` runs every CUDA thread of a block as a fiber and replaces the few PTX
instructions the attention kernels use (mma.m16n8k16, ldmatrix, cp.async) with CPU versions written
from the PTX ISA's definitions. What this checks without a GPU: fragment layouts, the swizzle, tile
walks and masks, the online softmax, the two-stage copy pipeline (copies landing at issue or as
late as cp.async.wait_group allows), barriers (a divergent one is a reported deadlock), shared
memory bounds, every output element being written, and the index arithmetic of the rotary and
span-shuffle kernels (vector widths, head groups, grid-stride loops, one thread per row). What only
a GPU checks: real timing, races between warps that the fiber order hides, and the speed (see
scripts/gpu_check.sh).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_within_pytorch_error

from attention_testing import attention_in_dtype, leaves, make_packed, make_qkv
from glm_ext import reference

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = Path(__file__).resolve().parent / "flash_emulator"


def cuda_headers() -> Path | None:
    """A directory with cuda_fp16.h and the headers it includes (the CUDA toolkit's)."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for home in filter(None, candidates):
        include = Path(home, "include")
        if (include / "cuda_fp16.h").exists() and (include / "crt" / "host_defines.h").exists():
            return include
    return None


@pytest.fixture(scope="module")
def emulator():
    include = cuda_headers()
    if include is None or shutil.which("c++") is None:
        pytest.skip("needs the CUDA toolkit's headers (cuda_fp16.h) and a C++ compiler")
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="glm_ext_flash_emulator",
        sources=[str(EMULATOR / "harness.cpp"), str(ROOT / "csrc" / "attention" / "attention.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc" / "attention" / "cuda"), str(EMULATOR),
                             str(include)],
        extra_cflags=["-O2", "-std=c++20"],
        verbose=False,
    )


@pytest.fixture(scope="module")
def kernels():
    """The rotary_2d and span_shuffle_batch kernels under the emulator (kernels_harness.cpp)."""
    include = cuda_headers()
    if include is None or shutil.which("c++") is None:
        pytest.skip("needs the CUDA toolkit's headers (cuda_fp16.h) and a C++ compiler")
    from torch.utils import cpp_extension

    csrc = ROOT / "csrc"
    return cpp_extension.load(
        name="glm_ext_kernels_emulator",
        sources=[str(EMULATOR / "kernels_harness.cpp"), str(csrc / "position" / "position_ops.cpp"),
                 str(csrc / "batching" / "batching.cpp")],
        extra_include_paths=[str(csrc), str(EMULATOR), str(include)],
        extra_cflags=["-O2", "-std=c++20"],
        verbose=False,
    )


def run(emulator, q, k, v, sep, grad, deferred=False, grad_lse=None, max_seqlen=(0, 0), **layout):
    """out, lse and the gradients of q, k, v through the emulated kernels."""
    cu_q, cu_k = layout.get("cu_seqlens_q"), layout.get("cu_seqlens_k")
    scale = q.shape[-1] ** -0.5
    out, lse = emulator.forward(q, k, v, sep, cu_q, cu_k, *max_seqlen, scale, deferred)
    grads = emulator.backward(grad, grad_lse, q, k, v, out, lse, sep, cu_q, cu_k, *max_seqlen, scale, deferred)
    return out, lse, grads


def assert_matches_reference(emulator, q, k, v, sep, dtype, deferred=False, **layout):
    """Flash-attention's rule (2x PyTorch's error for the output, 3x for gradients, PyTorch being
    the same attention written in PyTorch ops in the same dtype), lse against the float64 reference."""
    low = [t.to(dtype) for t in (q, k, v)]
    exact_in, pytorch_in = leaves(*(t.double() for t in low)), leaves(*low)
    exact, exact_lse = reference.mixed_mask_attention(*exact_in, sep, return_lse=True, **layout)
    pytorch = attention_in_dtype(*pytorch_in, sep, **layout)
    grad = torch.randn(exact.shape).to(dtype)
    out, lse, grads = run(emulator, *low, sep.to(torch.int32), grad, deferred, **layout)
    assert_within_pytorch_error(out, pytorch.detach(), exact.detach())
    torch.testing.assert_close(lse.double(), exact_lse.detach(), rtol=1e-4, atol=1e-4)
    for ours, theirs, want in zip(
        grads,
        torch.autograd.grad(pytorch, pytorch_in, grad),
        torch.autograd.grad(exact, exact_in, grad.double()),
    ):
        assert_within_pytorch_error(ours, theirs, want, factor=3.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_padded_grouped_heads(emulator, dtype, dim):
    q, k, v = make_qkv(2, 90, 90, 4, 2, dim, dtype=torch.float32)
    assert_matches_reference(emulator, q, k, v, torch.tensor([0, 37]), dtype, deferred=dtype == torch.float16)


def test_sep_edge_cases(emulator):
    seq = 65  # one full tile and one row past it
    q, k, v = make_qkv(5, seq, seq, 2, 2, 64, dtype=torch.float32)
    assert_matches_reference(emulator, q, k, v, torch.tensor([0, 1, seq // 2, seq - 1, seq]), torch.bfloat16)


@pytest.mark.parametrize("seq_q", [0, 1, 70])  # 0: no queries, the keys' gradients are zeros
def test_decoding_queries_are_the_last_positions(emulator, seq_q):
    q, k, v = make_qkv(2, seq_q, 130, 4, 1, 64, dtype=torch.float32)
    assert_matches_reference(emulator, q, k, v, torch.tensor([5, 130]), torch.float16, deferred=True)


def test_packed_samples(emulator):
    # A sample with keys but no queries (its keys get zero gradients), an empty one, one of a
    # single token, and lengths on both sides of the 64-row tiles.
    lengths_q, lengths_k = [70, 0, 0, 1, 129, 64], [70, 5, 0, 1, 129, 66]
    q, k, v, cu_q, cu_k = make_packed(lengths_q, lengths_k, 4, 2, 128, dtype=torch.float32)
    sep = torch.tensor([20, 3, 0, 1, 0, 66])
    assert_matches_reference(emulator, q, k, v, sep, torch.bfloat16, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_lse_gradient_and_unknown_max_seqlen(emulator):
    q, k, v, cu_q, cu_k = make_packed([40, 90], [40, 90], 2, 2, 64, dtype=torch.float32)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    sep = torch.tensor([40, 17], dtype=torch.int32)
    exact_in = leaves(q.double(), k.double(), v.double())
    layout = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    exact = reference.mixed_mask_attention(*exact_in, sep, return_lse=True, **layout)
    grad, grad_lse = torch.randn(exact[0].shape).to(torch.bfloat16), torch.randn(exact[1].shape)
    want = torch.autograd.grad(exact, exact_in, (grad.double(), grad_lse.double()))
    known = run(emulator, q, k, v, sep, grad, grad_lse=grad_lse, max_seqlen=(90, 90), **layout)
    unknown = run(emulator, q, k, v, sep, grad, grad_lse=grad_lse, **layout)  # 0: the grid covers all tokens
    # A bound far above the token count is clamped to it: it once sized grids whose 32-bit block
    # counts wrapped (to 0 or 1 blocks), leaving outputs unwritten.
    huge = run(emulator, q, k, v, sep, grad, grad_lse=grad_lse, max_seqlen=(2**40, 2**40 + 64), **layout)
    for other in (unknown, huge):
        for a, b in zip(known[:2] + known[2], other[:2] + other[2]):
            assert torch.equal(a, b)
    for ours, w in zip(known[2], want):
        assert (ours.double() - w).abs().max() <= 2e-2 * max(w.abs().max().item(), 1.0)


def test_copy_timing_strides_and_alignment_do_not_change_bits(emulator):
    q, k, v = make_qkv(1, 80, 80, 2, 2, 64, dtype=torch.float16)
    sep, grad = torch.tensor([30], dtype=torch.int32), torch.randn(1, 80, 2, 64).half()
    first = run(emulator, q, k, v, sep, grad)
    late = run(emulator, q, k, v, sep, grad, deferred=True)
    qkv = torch.stack([q, k, v], dim=2)  # views of a fused projection: token stride 3 x heads x dim
    strided = run(emulator, *qkv.unbind(2), sep, grad)
    flat = torch.zeros(q.numel() + 1, dtype=q.dtype)
    flat[1:] = q.flatten()
    misaligned = run(emulator, flat[1:].view(q.shape), k, v, sep, grad)  # copied to aligned memory
    for other in (late, strided, misaligned):
        for a, b in zip(first[:2] + first[2], other[:2] + other[2]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# rotary_2d: the emulated kernel against the CPU kernel (itself tested against the float64
# reference), on small devices so that heads are grouped and the grid strides.

# (resident threads, grid cap): one thread per work unit, several heads per thread; or a device
# too small for the work, whose single block walks the units in grid-stride steps.
DEVICES = [(1 << 20, 1 << 20), (64, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_2d_matches_the_cpu_kernel(kernels, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(2, 37, 9, 16).to(dtype)  # 9 heads: groups of 4 heads and a shorter last one
    position, block = torch.randint(0, 50, (2, 2, 37)).unbind(0)
    for backward in (False, True):
        want = (torch.ops.glm_ext.rotary_2d_backward if backward else torch.ops.glm_ext.rotary_2d)(x, position, block)
        got = kernels.rotary_2d(x, position, block, 10000.0, backward, *device)
        assert not got.isnan().any(), "every element is written"
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype.itemsize >= 4 else 1e-2, atol=1e-6)


def test_rotary_2d_vector_widths_strides_and_packed_rows(kernels):
    torch.manual_seed(1)
    position, block = torch.randint(0, 50, (2, 3, 20)).unbind(0)
    qkv = torch.randn(3, 20, 3, 4, 32)  # q of a fused projection: a strided view (16-byte vectors)
    flat = torch.zeros(3 * 20 * 4 * 12 + 1)
    misaligned = flat[1:].view(3, 20, 4, 12)  # 3 pairs per half and an odd offset: one element at a time
    misaligned.copy_(torch.randn(3, 20, 4, 12))
    packed = torch.randn(60, 4, 8)  # [tokens, heads, head_dim], ids [tokens]
    cases = [(qkv[:, :, 0], position, block), (misaligned, position, block),
             (packed, position.flatten(), block.flatten())]
    for x, pos, blk in cases:
        for device in DEVICES:
            got = kernels.rotary_2d(x, pos, blk, 500.0, False, *device)
            torch.testing.assert_close(got, torch.ops.glm_ext.rotary_2d(x, pos, blk, 500.0), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# span_shuffle_batch: the emulated CUDA kernels give the CPU kernel's batch, bit for bit.

SPECIAL_IDS = [1, 5, 0, 2, 6, 7, 3, 4]  # [CLS], <eos>, pad, [MASK], [sMASK], [gMASK], <sop>, <eop>


def span_shuffle_args(objective: int, **overrides):
    probs = [0.0, 0.0, 0.0]
    probs[objective] = 1.0
    args = dict(seed=1234, objective_probs=probs, mask_ratio=0.3, poisson_lambda=3.0, max_span_length=10,
                min_document_ratio=0.25, special_ids=SPECIAL_IDS, vocab_size=100, output_length=0, row_offset=0)
    args.update(overrides)
    return args


@pytest.mark.parametrize("objective", [0, 1, 2])
def test_span_shuffle_batch_matches_the_cpu_kernel(kernels, objective):
    gen = torch.Generator().manual_seed(objective)
    rows = torch.randint(20, 100, (70, 50), generator=gen)  # 70 rows: a full block of 64 and a partial one
    rows[:, ::7] = 20  # sentence ends (sentence_end_ids below)
    rows[:, 0] = 1
    rows[:, -1] = 5
    lengths = torch.randint(3, 51, (70,), generator=gen)
    ends = torch.tensor([20])
    for overrides in (dict(), dict(output_length=90, row_offset=1000, seed=7)):
        args = span_shuffle_args(objective, **overrides)
        want = torch.ops.glm_ext.span_shuffle_batch(rows, lengths, ends, *args.values())
        got = kernels.span_shuffle_batch(rows, lengths, ends, *args.values())
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_span_shuffle_batch_errors_match_the_cpu_kernel(kernels):
    rows = torch.full((3, 10), 1)  # row 0: only [CLS], nothing to mask
    rows[1:, 1:] = 30
    args = span_shuffle_args(0)
    with pytest.raises(ValueError, match=r"row 0 \(length 10\) has no token that may be masked") as cpu:
        torch.ops.glm_ext.span_shuffle_batch(rows, None, torch.tensor([20]), *args.values())
    with pytest.raises(ValueError) as emulated:
        kernels.span_shuffle_batch(rows, None, torch.tensor([20]), *args.values())
    assert str(emulated.value).splitlines()[0] == str(cpu.value).splitlines()[0]
