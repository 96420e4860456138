"""glm_ext.ops.mixed_mask_attention: attention under GLM's mixed mask, never materialised."""

from __future__ import annotations

import contextlib
import platform

import pytest
import torch
from conftest import LOW_PRECISION, assert_within_pytorch_error, max_error, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_testing import attention_in_dtype, leaves, make_packed, make_qkv, sdpa_math
from glm_ext import ops, reference

OP = torch.ops.glm_ext.mixed_mask_attention.default
BACKWARD_OP = torch.ops.glm_ext.mixed_mask_attention_backward.default
HEADS = [(2, 2), (6, 2), (4, 1)]  # (heads_q, heads_kv): multi-head, grouped-query, multi-query


def assert_close_to_reference(q, k, v, sep, rtol=1e-10, atol=1e-10, **layout):
    """Output, lse and the gradients of q, k, v (from out and lse) against the float64 reference."""
    ours_in, ref_in = leaves(q, k, v), leaves(q, k, v)
    out, lse = ops.mixed_mask_attention(*ours_in, sep, return_lse=True, **layout)
    want_out, want_lse = reference.mixed_mask_attention(*ref_in, sep, return_lse=True, **layout)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == want_lse.dtype
    torch.testing.assert_close(out, want_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, want_lse, rtol=rtol, atol=atol)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), ours_in, (grad_out, grad_lse), allow_unused=True)
    want = torch.autograd.grad((want_out, want_lse), ref_in, (grad_out, grad_lse), allow_unused=True)
    for g, w, t in zip(got, want, ref_in):
        w = torch.zeros_like(t) if w is None else w
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Against the float64 reference


def test_hand_checked_uniform_attention():
    # q = 0: every visible key gets the same weight, so with v = identity rows the output row i is
    # 1/visible_i on the keys it sees: visible = max(sep, i + 1) = [2, 2, 3, 4, 5] for sep = 2.
    seq = 5
    q = torch.zeros(1, seq, 1, 8)
    k = torch.randn(1, seq, 1, 8)
    v = torch.eye(seq, 8)[None, :, None]
    out, lse = ops.mixed_mask_attention(q, k, v, torch.tensor([2], dtype=torch.int32), return_lse=True)
    visible = torch.tensor([2, 2, 3, 4, 5])
    expected = (torch.arange(8)[None] < visible[:, None]).float() / visible[:, None]
    torch.testing.assert_close(out[0, :, 0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse[0, 0], visible.float().log(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seq", [1, 67, 150])
@pytest.mark.parametrize("sep_case", ["0", "1", "half", "L-1", "L", "mixed"])
@pytest.mark.parametrize("heads_q, heads_kv", HEADS)
def test_padded_matches_float64_reference(seq, sep_case, heads_q, heads_kv):
    batch = 3
    values = {"0": 0, "1": 1, "half": seq // 2, "L-1": seq - 1, "L": seq}
    if sep_case == "mixed":
        sep = torch.tensor([0, seq, torch.randint(0, seq + 1, ()).item()], dtype=torch.int32)
    else:
        sep = torch.full((batch,), min(values[sep_case], seq), dtype=torch.int32)
    q, k, v = make_qkv(batch, seq, seq, heads_q, heads_kv, dim=24)
    assert_close_to_reference(q, k, v, sep)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_scores_rising_across_key_tiles(dtype, tol):
    # Each 64-key tile's scores lie 3 or 50 (natural-log units) above the last tile's: steps below and
    # above the slack (8 in log2 units) by which the CPU kernel lets a tile pass a query's running
    # maximum before moving it. Out and lse must not depend on whether it moved; a maximum that
    # never moved would overflow float32 (the last tile is 109 above the first).
    seq, dim, tile = 6 * 64, 16, 64
    rise = torch.tensor([0.0, 3, 50, 3, 50, 3], dtype=torch.float64).cumsum(0)
    q = torch.zeros(1, seq, 1, dim, dtype=torch.float64)
    q[..., 0] = 1
    k = torch.randn(1, seq, 1, dim, dtype=torch.float64) * 0.1
    k[0, :, 0, 0] = (rise.repeat_interleave(tile) + torch.rand(seq, dtype=torch.float64)) * dim**0.5
    v = torch.randn(1, seq, 1, dim, dtype=torch.float64)
    sep = torch.tensor([seq // 2], dtype=torch.int32)
    out, lse = ops.mixed_mask_attention(q.to(dtype), k.to(dtype), v.to(dtype), sep, return_lse=True)
    want_out, want_lse = reference.mixed_mask_attention(q, k, v, sep, return_lse=True)
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("seq_q, seq_k", [(1, 70), (5, 70), (64, 130), (66, 129), (0, 9)])
@pytest.mark.parametrize("heads_q, heads_kv", HEADS[1:])
def test_decoding_queries_are_the_last_positions(seq_q, seq_k, heads_q, heads_kv):
    q, k, v = make_qkv(2, seq_q, seq_k, heads_q, heads_kv, dim=16)
    sep = torch.tensor([seq_k // 3, seq_k - seq_q // 2])
    assert_close_to_reference(q, k, v, sep)


@pytest.mark.parametrize("dim", [1, 5, 16, 64, 100, 128, 256])
def test_head_dims(dim):
    q, k, v = make_qkv(1, 70, 70, 2, 1, dim)
    assert_close_to_reference(q, k, v, torch.tensor([30]))


@pytest.mark.parametrize("heads_q, heads_kv", HEADS)
def test_packed_matches_float64_reference(heads_q, heads_kv):
    lengths = [70, 1, 0, 129, 33]
    sep = torch.tensor([35, 1, 0, 0, 33], dtype=torch.int32)
    q, k, v, cu_q, cu_k = make_packed(lengths, lengths, heads_q, heads_kv, dim=12)
    assert_close_to_reference(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_packed_decoding_with_different_query_and_key_lengths():
    lengths_q, lengths_k = [1, 0, 5, 66], [10, 3, 5, 130]
    sep = torch.tensor([10, 2, 1, 64])
    q, k, v, cu_q, cu_k = make_packed(lengths_q, lengths_k, 4, 2, dim=16)
    assert_close_to_reference(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    # max_seqlen given explicitly (no host synchronisation) gives the same result.
    a = ops.mixed_mask_attention(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    b = ops.mixed_mask_attention(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=66, max_seqlen_k=130)
    assert torch.equal(a, b)


def test_packed_equals_padded_per_sample():
    lengths, heads, dim = [40, 7, 65], 3, 8
    sep = torch.tensor([20, 7, 1])
    q, k, v, cu_q, cu_k = make_packed(lengths, lengths, heads, heads, dim, dtype=torch.float32)
    packed, lse = ops.mixed_mask_attention(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    for i, n in enumerate(lengths):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        alone, alone_lse = ops.mixed_mask_attention(
            q[None, rows], k[None, rows], v[None, rows], sep[i : i + 1], return_lse=True
        )
        assert torch.equal(packed[rows], alone[0])
        assert torch.equal(lse[:, rows], alone_lse[0])


def test_softmax_scale():
    q, k, v = make_qkv(2, 20, 20, 2, 2, 8)
    sep = torch.tensor([5, 0])
    for scale in (0.0, 0.3, -1.7):
        torch.testing.assert_close(
            ops.mixed_mask_attention(q, k, v, sep, softmax_scale=scale),
            reference.mixed_mask_attention(q, k, v, sep, softmax_scale=scale),
            rtol=1e-10, atol=1e-10,
        )


def test_empty_inputs():
    for batch, seq in ((0, 5), (2, 0)):
        q, k, v = make_qkv(batch, seq, seq, 2, 1, 8)
        q, k, v = leaves(q, k, v)
        out, lse = ops.mixed_mask_attention(q, k, v, torch.zeros(batch, dtype=torch.int32), return_lse=True)
        assert out.shape == q.shape and lse.shape == (batch, 2, seq)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    # Packed with no tokens at all.
    q, k, v, cu_q, cu_k = make_packed([0, 0], [0, 0], 2, 2, 4)
    sep = torch.zeros(2, dtype=torch.int32)
    out, lse = ops.mixed_mask_attention(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)


def test_strided_inputs_from_a_fused_qkv_projection():
    batch, seq, heads, dim = 2, 77, 3, 16
    qkv = torch.randn(batch, seq, 3, heads, dim)
    q, k, v = qkv.unbind(2)  # views, seq stride 3 * heads * dim: no copy needed
    assert not q.is_contiguous()
    sep = torch.tensor([30, 77])
    strided = ops.mixed_mask_attention(q, k, v, sep)
    contiguous = ops.mixed_mask_attention(q.contiguous(), k.contiguous(), v.contiguous(), sep)
    assert torch.equal(strided, contiguous)
    # A non-contiguous head dimension is copied first.
    wide = torch.randn(batch, seq, heads, 2 * dim)
    q2 = wide[..., ::2]
    assert torch.equal(ops.mixed_mask_attention(q2, k, v, sep), ops.mixed_mask_attention(q2.contiguous(), k, v, sep))
    # A broadcast grad_out (from .sum()) is handled as well.
    q3, k3, v3 = leaves(q, k, v)
    ops.mixed_mask_attention(q3, k3, v3, sep).sum().backward()
    r3 = leaves(q, k, v)
    reference.mixed_mask_attention(*r3, sep).sum().backward()
    for got, want in zip((q3, k3, v3), r3):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_int64_sep_and_int32_sep_agree():
    q, k, v = make_qkv(2, 30, 30, 2, 2, 8, dtype=torch.float32)
    a = ops.mixed_mask_attention(q, k, v, torch.tensor([3, 17]))
    b = ops.mixed_mask_attention(q, k, v, torch.tensor([3, 17], dtype=torch.int32))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Low precision: flash-attention's rule against PyTorch in the same dtype


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (6, 2)])
def test_low_precision_within_pytorch_error(dtype, heads_q, heads_kv):
    seq = 200
    q, k, v = (t.to(dtype) for t in make_qkv(2, seq, seq, heads_q, heads_kv, 64))
    sep = torch.tensor([0, 120])
    exact_in = leaves(*(t.double() for t in (q, k, v)))
    ours_in, pytorch_in = leaves(q, k, v), leaves(q, k, v)
    exact = reference.mixed_mask_attention(*exact_in, sep)
    ours = ops.mixed_mask_attention(*ours_in, sep)
    pytorch = sdpa_math(*pytorch_in, sep)
    assert_within_pytorch_error(ours.detach(), pytorch.detach(), exact.detach(), factor=2.0)

    grad = torch.randn_like(exact).to(dtype)
    for o, p, e in zip(
        torch.autograd.grad(ours, ours_in, grad),
        torch.autograd.grad(pytorch, pytorch_in, grad),
        torch.autograd.grad(exact, exact_in, grad.double()),
    ):
        assert_within_pytorch_error(o, p, e, factor=3.0)


# ---------------------------------------------------------------------------------------------
# Autograd, torch.compile, opcheck


def test_gradcheck_padded_packed_and_decoding():
    q, k, v = leaves(*make_qkv(2, 9, 9, 4, 2, 5))
    sep = torch.tensor([3, 9])
    assert torch.autograd.gradcheck(lambda *t: ops.mixed_mask_attention(*t, sep, return_lse=True), (q, k, v))
    qd, kd, vd = leaves(*make_qkv(2, 3, 8, 2, 1, 4))
    assert torch.autograd.gradcheck(lambda *t: ops.mixed_mask_attention(*t, torch.tensor([2, 0])), (qd, kd, vd))
    qp, kp, vp, cu_q, cu_k = make_packed([3, 0, 4], [5, 1, 4], 2, 2, 3)
    packed = leaves(qp, kp, vp)
    layout = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert torch.autograd.gradcheck(lambda *t: ops.mixed_mask_attention(*t, torch.tensor([1, 1, 4]), **layout), packed)


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_deterministic_across_runs_and_thread_counts():
    # 2 samples x 2 kv heads: one key chunk per pair whatever the thread count (up to 4).
    q, k, v = make_qkv(2, 300, 300, 6, 2, 32, dtype=torch.float32)
    sep = torch.tensor([100, 250])
    out, lse = OP(q, k, v, sep, None, None, 0, 0, 0.2)
    grad = torch.randn_like(out)
    results = []
    for n in (1, 2, 2):
        with num_threads(n):
            forward = OP(q, k, v, sep, None, None, 0, 0, 0.2)
            results.append(forward + BACKWARD_OP(grad, None, q, k, v, out, lse, sep, None, None, 0, 0, 0.2))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_with_one_and_several_key_chunks(threads):
    # One (sample, kv head) pair: its keys in one chunk with one thread; in two with two threads,
    # whose partial dQ are summed afterwards.
    q, k, v = make_qkv(1, 150, 150, 3, 1, 20)
    sep = torch.tensor([77])
    with num_threads(threads):
        assert_close_to_reference(q, k, v, sep)
        # And the same bits run after run (the chunks' partial sums are added in a fixed order).
        out, lse = OP(q, k, v, sep, None, None, 0, 0, 0.3)
        grad = torch.randn_like(out)
        first, again = (BACKWARD_OP(grad, None, q, k, v, out, lse, sep, None, None, 0, 0, 0.3) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(layout, dtype):
    if layout == "padded":
        q, k, v = (t.to(dtype) for t in make_qkv(2, 9, 11, 4, 2, 8))
        sep = torch.tensor([3, 11], dtype=torch.int32)
        extra = (None, None, 0, 0, 0.3)
    else:
        q, k, v, cu_q, cu_k = make_packed([4, 7], [6, 7], 4, 2, 8, dtype=dtype)
        sep = torch.tensor([2, 7], dtype=torch.int32)
        extra = (cu_q, cu_k, 7, 7, 0.3)
    torch.library.opcheck(OP, leaves(q, k, v) + [sep, *extra])
    out, lse = OP(q, k, v, sep, *extra)
    grad_out = torch.randn_like(out)
    # No double backward: the backward op is checked without gradients.
    torch.library.opcheck(BACKWARD_OP, (grad_out, None, q, k, v, out, lse, sep, *extra))
    torch.library.opcheck(BACKWARD_OP, (grad_out, torch.randn_like(lse), q, k, v, out, lse, sep, *extra))


def test_double_backward_is_refused():
    q, k, v = leaves(*make_qkv(1, 4, 4, 1, 1, 8))
    (grad_q,) = torch.autograd.grad(ops.mixed_mask_attention(q, k, v, torch.tensor([2])).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_q.sum().backward()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_torch_compile_fullgraph_forward_and_backward(layout):
    if layout == "padded":
        q, k, v = make_qkv(2, 13, 13, 4, 2, 8, dtype=torch.float32)
        kwargs = {}
        sep = torch.tensor([5, 13])
    else:
        q, k, v, cu_q, cu_k = make_packed([6, 7], [6, 7], 4, 2, 8, dtype=torch.float32)
        kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        sep = torch.tensor([2, 7])
    inputs = leaves(q, k, v)

    def loss(q, k, v):
        out, lse = ops.mixed_mask_attention(q, k, v, sep, return_lse=True, **kwargs)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Properties over random shapes and seps


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_padded_random_shapes(data):
    batch = data.draw(st.integers(1, 3))
    seq_k = data.draw(st.integers(1, 90))
    seq_q = data.draw(st.integers(1, seq_k))
    heads_kv, group = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    dim = data.draw(st.integers(1, 40))
    sep = torch.tensor(data.draw(st.lists(st.integers(0, seq_k), min_size=batch, max_size=batch)))
    q, k, v = make_qkv(batch, seq_q, seq_k, heads_kv * group, heads_kv, dim)
    assert_close_to_reference(q, k, v, sep)


@settings(max_examples=30, deadline=None)
@given(samples=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70), st.floats(0, 1)), min_size=1, max_size=4))
def test_property_packed_random_samples(samples):
    lengths_k = [max(a, b) for a, b, _ in samples]
    lengths_q = [min(a, b) for a, b, _ in samples]
    sep = torch.tensor([int(f * n) for (_, _, f), n in zip(samples, lengths_k)])
    q, k, v, cu_q, cu_k = make_packed(lengths_q, lengths_k, 2, 1, 6)
    assert_close_to_reference(q, k, v, sep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# ---------------------------------------------------------------------------------------------
# Memory linear in the sequence length, and every instruction-set path of the CPU kernel


def test_memory_never_grows_with_seq_squared():
    # In a fresh process: the growth of the peak resident set over one forward and one backward at
    # seq 4096 (one head: a seq x seq float32 buffer would be 64 MiB).
    out = run_python(
        """
        import torch
        from glm_ext import ops
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
        def peak(): return status("VmHWM")
        def reset():  # the peak back to the current resident set, where Linux allows it
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                return status("VmRSS")
            except OSError:
                return peak()
        seq, dim = 4096, 64
        for _ in range(2):  # warm-up: one-time allocations of the autograd engine, thread pools
            warm = [torch.randn(1, 64, 1, dim, requires_grad=True) for _ in range(3)]
            ops.mixed_mask_attention(*warm, torch.tensor([32])).backward(torch.randn(1, 64, 1, dim))
        q, k, v = (torch.randn(1, seq, 1, dim, requires_grad=True) for _ in range(3))
        sep = torch.tensor([seq // 2])
        grad = torch.randn(1, seq, 1, dim)
        before = reset()
        out = ops.mixed_mask_attention(q, k, v, sep)
        forward = peak() - before
        before = reset()
        out.backward(grad)
        print(forward, peak() - before)
        """
    )
    forward, backward = (int(x) for x in out.split())
    square = 4096 * 4096 * 4
    # Measured: about 3 MiB forward (out, lse, per-thread key/value copies), 7-8 MiB backward (per
    # thread the keys, values and their gradients of its chunk; with two chunks a partial dQ each).
    assert forward < square / 8, f"the forward raised the peak memory by {forward / 2**20:.1f} MiB"
    assert backward < square / 4, f"the backward raised the peak memory by {backward / 2**20:.1f} MiB"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction-set paths")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_instruction_set_paths(capability):
    # ATen's ATEN_CPU_CAPABILITY also caps the kernel's instruction set: baseline SSE2 and AVX2, at head
    # dims that fill whole vectors of some widths (40) and fill none (5).
    out = run_python(
        """
        import torch
        from glm_ext import ops, reference
        torch.manual_seed(0)
        worst = 0.0
        for dtype, tol, dim in ((torch.float32, 1e-4, 40), (torch.float64, 1e-10, 40), (torch.float32, 1e-4, 5),
                                (torch.float64, 1e-10, 5)):
            q, k, v = (torch.randn(2, 150, 2, dim, dtype=dtype, requires_grad=True) for _ in range(3))
            sep = torch.tensor([70, 0])
            out = ops.mixed_mask_attention(q, k, v, sep)
            ref = reference.mixed_mask_attention(*(t.double() for t in (q, k, v)), sep)
            grad = torch.randn_like(ref)
            got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
            want = torch.autograd.grad(ref, (q, k, v), grad)
            errors = [(out.double() - ref).abs().max().item()]
            errors += [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want)]
            worst = max(worst, max(errors) / tol)
        print(worst)
        """,
        ATEN_CPU_CAPABILITY=capability,
    )
    assert float(out) < 1.0


# ---------------------------------------------------------------------------------------------
# NaN in one row reaches only the rows that see it


def attention_row_by_row(q, k, v, sep, scale):
    """Slow direct computation (float64, padded layout): every query row attends to exactly the
    keys GLM's mask lets it see, so a masked key never enters its arithmetic. Returns out, lse."""
    batch, seq_q, heads_q, _ = q.shape
    group = heads_q // k.shape[2]
    mask = reference.mixed_mask(sep, seq_q, k.shape[1])
    outs, lses = [], []
    for b in range(batch):
        for h in range(heads_q):
            for i in range(seq_q):
                keys, values = k[b, mask[b, i], h // group], v[b, mask[b, i], h // group]
                scores = keys @ q[b, i, h] * scale
                outs.append(torch.softmax(scores, 0) @ values)
                lses.append(torch.logsumexp(scores, 0))
    out = torch.stack(outs).view(batch, heads_q, seq_q, -1).transpose(1, 2)
    return out, torch.stack(lses).view(batch, heads_q, seq_q)


@pytest.mark.parametrize("threads", [1, 2])  # one (sample, kv head) pair: one key chunk, then two
@pytest.mark.parametrize("poisoned, seq_q", [("v", 100), ("k", 40), ("q", 100)])
def test_nan_reaches_only_the_rows_that_see_it(poisoned, seq_q, threads):
    # A NaN in a Part B row: rows of the same 64-row tile that cannot see it once turned NaN too
    # (0 * NaN in the products over masked pairs), in the forward and in the backward.
    q, k, v = make_qkv(1, seq_q, 100, 2, 1, 8)
    sep = torch.tensor([30])
    row = {"v": 80, "k": 80, "q": seq_q - 20}[poisoned]
    {"q": q, "k": k, "v": v}[poisoned][0, row, 0, 3] = float("nan")
    scale = 8**-0.5
    ours_in, want_in = leaves(q, k, v), leaves(q, k, v)
    with num_threads(threads):
        out, lse = ops.mixed_mask_attention(*ours_in, sep, return_lse=True)
        want_out, want_lse = attention_row_by_row(*want_in, sep, scale)
        assert 0 < out.isnan().sum() < out.numel(), "the NaN reaches some rows, not all"
        torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10, equal_nan=True)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        got = torch.autograd.grad((out, lse), ours_in, (grad_out, grad_lse))
    want = torch.autograd.grad((want_out, want_lse), want_in, (grad_out, grad_lse))
    assert 0 < got[0].isnan().sum() < got[0].numel(), "grad_q: NaN in the rows that see it, and only there"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Bad input


def bad_padded_cases():
    gen = torch.Generator().manual_seed(0)  # collected before the seeding fixture runs
    q = torch.randn(2, 5, 4, 8, generator=gen)
    k = torch.randn(2, 6, 2, 8, generator=gen)
    sep = torch.tensor([1, 6], dtype=torch.int32)
    p = lambda **kw: {**dict(q=q, k=k, v=k.clone(), sep=sep), **kw}  # noqa: E731
    return [
        (p(q=q.int()), TypeError, "q must be float32, float16, bfloat16 or float64"),
        (p(k=k.half()), TypeError, r"k must have the dtype of q \(Float\)"),
        (p(q=q[0]), ValueError, r"q must be \[batch, seq, heads, head_dim\] \(padded"),
        (p(v=k[:, :5]), ValueError, "v must have the shape of k"),
        (p(k=k[..., :7], v=k[..., :7]), ValueError, r"k must have the head_dim of q \(8\)"),
        (p(q=torch.randn(2, 5, 4, 300), k=torch.randn(2, 6, 2, 300), v=torch.randn(2, 6, 2, 300)), ValueError,
         r"head_dim must lie in \[1, 256\]"),
        (p(q=q[:, :, :3]), ValueError, r"heads of q \(3\) must be a positive multiple of the heads of k and v \(2\)"),
        (p(sep=sep.float()), TypeError, "sep must be int32 or int64"),
        (p(sep=sep[:1]), ValueError, r"sep must have shape \[batch\] = \[2\]"),
        (p(sep=torch.tensor([1, 7])), ValueError, r"sep must lie in \[0, seq_k = 6\], got sep\[1\] = 7"),
        (p(sep=torch.tensor([-1, 2])), ValueError, r"sep must lie in \[0, seq_k = 6\], got sep\[0\] = -1"),
        # int64 values are checked before they are narrowed to int32 (2^32 + 3 once acted as 3).
        (p(sep=torch.tensor([1, 2**32 + 3])), ValueError, r"sep must lie in \[0, L\].*got sep\[1\] = 4294967299"),
        (p(sep=torch.tensor([-(2**32) + 1, 2])), ValueError, r"got sep\[0\] = -4294967295"),
        (p(q=torch.randn(2, 5, 4, 0), k=torch.randn(2, 6, 2, 0), v=torch.randn(2, 6, 2, 0)), ValueError,
         r"head_dim must lie in \[1, 256\], got 0"),
        (p(q=torch.randn(2, 7, 4, 8)), ValueError, r"seq_q \(7\) must not exceed seq_k \(6\)"),
        (p(k=k[:1], v=k[:1]), ValueError, r"k must have the batch size of q \(2\)"),
        (p(k=k.to("meta")), ValueError, r"k must be on the device of q \(cpu\), got meta"),
        (p(sep=sep.to("meta")), ValueError, r"sep must be on the device of q \(cpu\), got meta"),
    ]


@pytest.mark.parametrize("kwargs, error, match", bad_padded_cases())
def test_bad_input_gets_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.mixed_mask_attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["sep"])


def test_non_finite_softmax_scale():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        ops.mixed_mask_attention(q, k, v, torch.tensor([1]), softmax_scale=float("nan"))


@pytest.mark.parametrize(
    "lengths_q, lengths_k, cu_q, sep, extra, error, match",
    [
        ([3, 4], [3, 4], None, [1, 2], {}, TypeError, "cu_seqlens_q must be int32"),
        ([3, 4], [3, 4], [0, 3, 7, 7], [1, 2], {}, ValueError,
         r"cu_seqlens_q must have shape \[n \+ 1\] with n = sep.numel\(\) = 2"),
        ([3, 4], [3, 4], [0, 4, 3], [1, 2], {}, ValueError,
         r"cu_seqlens_q must start at 0, never decrease and end at the number of tokens \(7\), got \[0, 4, 3\]"),
        ([3, 4], [3, 4], [1, 3, 7], [1, 2], {}, ValueError, "cu_seqlens_q must start at 0"),
        ([5, 2], [3, 4], None, [1, 2], {}, ValueError, r"sample 0 has more queries \(5\) than keys \(3\)"),
        ([3, 4], [3, 4], None, [1, 5], {}, ValueError,
         r"sep must lie in \[0, L\] with L the length of its sample, got sep\[1\] = 5"),
        ([3, 4], [3, 4], None, [1, 2], dict(max_seqlen_q=3, max_seqlen_k=4), ValueError, "more than max_seqlen_q = 3"),
        ([3, 4], [3, 4], None, [1, 2], dict(max_seqlen_q=-1, max_seqlen_k=4), ValueError, "must be >= 0"),
        ([3, 4], [3, 4], None, [1, 2**32 + 2], {}, ValueError, r"got sep\[1\] = 4294967298"),
    ],
)
def test_bad_packed_input(lengths_q, lengths_k, cu_q, sep, extra, error, match):
    q, k, v, cu_q_ok, cu_k = make_packed(lengths_q, lengths_k, 2, 2, 4)
    if cu_q is None:
        cu = cu_q_ok if error is not TypeError else cu_q_ok.long()
    else:
        cu = torch.tensor(cu_q, dtype=torch.int32)
    with pytest.raises(error, match=match):
        ops.mixed_mask_attention(q, k, v, torch.tensor(sep), cu_seqlens_q=cu, cu_seqlens_k=cu_k, **extra)


def test_bad_layout_combinations():
    q, k, v, cu_q, cu_k = make_packed([3], [3], 2, 2, 4)
    with pytest.raises(ValueError, match="pass both cu_seqlens_q and cu_seqlens_k"):
        ops.mixed_mask_attention(q, k, v, torch.tensor([1]), cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match="pass both cu_seqlens_q and cu_seqlens_k"):
        OP(q, k, v, torch.tensor([1]), cu_q, None, 3, 3, 0.5)
    with pytest.raises(ValueError, match=r"q must be \[total, heads, head_dim\] \(packed"):
        ops.mixed_mask_attention(q[None], k, v, torch.tensor([1]), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_backward_bad_input():
    q, k, v = make_qkv(2, 5, 5, 2, 2, 4, dtype=torch.float32)
    sep = torch.tensor([1, 2])
    out, lse = OP(q, k, v, sep, None, None, 0, 0, 0.5)
    args = lambda **kw: {**dict(grad_out=out, grad_lse=None, q=q, k=k, v=v, out=out, lse=lse), **kw}  # noqa: E731
    cases = [
        (args(lse=lse.double()), TypeError, "lse must be Float for Float inputs"),
        (args(lse=lse[:, :, :4]), ValueError, r"lse must have shape \[2, 2, 5\]"),
        (args(grad_out=out[:, :4]), ValueError, "grad_out must have the shape of q"),
        (args(out=out.double()), TypeError, "out must have the dtype of q"),
        (args(grad_lse=lse[0]), ValueError, "grad_lse must have the shape of lse"),
    ]
    for a, error, match in cases:
        with pytest.raises(error, match=match):
            BACKWARD_OP(
                a["grad_out"], a["grad_lse"], a["q"], a["k"], a["v"], a["out"], a["lse"], sep, None, None, 0, 0, 0.5
            )


# ---------------------------------------------------------------------------------------------
# CUDA: the flash kernel (float16 / bfloat16, head_dim 64 and 128)


def to_cuda(tensors):
    return {name: t.cuda() for name, t in tensors.items()}


def assert_cuda_within_pytorch_error(q, k, v, sep, dtype, **layout):
    """Flash-attention's rule on CUDA: output error at most 2x, gradient errors at most 3x, that of
    the same attention written in PyTorch ops in the same dtype on the same device (nothing upcast,
    as the kernel rounds P and dS), both against the float64 reference of the same rounded inputs.
    The lse is checked against the reference directly."""
    low = [t.to(dtype) for t in (q, k, v)]
    exact_in = leaves(*(t.double() for t in low))
    exact, exact_lse = reference.mixed_mask_attention(*exact_in, sep, return_lse=True, **layout)
    cuda_layout = to_cuda(layout)
    pytorch_in = leaves(*(t.cuda() for t in low))
    pytorch = attention_in_dtype(*pytorch_in, sep.cuda(), **cuda_layout)
    ours_in = leaves(*(t.cuda() for t in low))
    ours, lse = ops.mixed_mask_attention(*ours_in, sep.cuda(), return_lse=True, **cuda_layout)
    assert ours.dtype == dtype and lse.dtype == torch.float32
    assert_within_pytorch_error(ours.detach().cpu(), pytorch.detach().cpu(), exact.detach())
    torch.testing.assert_close(lse.detach().cpu().double(), exact_lse.detach(), rtol=2e-3, atol=2e-3)
    grad = torch.randn_like(exact).to(dtype)
    for o, p, e in zip(
        torch.autograd.grad(ours, ours_in, grad.cuda()),
        torch.autograd.grad(pytorch, pytorch_in, grad.cuda()),
        torch.autograd.grad(exact, exact_in, grad.double()),
    ):
        assert_within_pytorch_error(o.cpu(), p.cpu(), e, factor=3.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("layout", ["padded", "decode", "packed"])
def test_cuda_within_pytorch_error(dtype, dim, layout):
    if layout == "packed":
        q, k, v, cu_q, cu_k = make_packed([300, 1, 0, 129], [300, 1, 0, 129], 6, 2, dim, dtype=torch.float32)
        sep = torch.tensor([150, 1, 0, 0], dtype=torch.int32)
        assert_cuda_within_pytorch_error(q, k, v, sep, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        seq_q = 300 if layout == "padded" else 7
        q, k, v = make_qkv(2, seq_q, 300, 6, 2, dim, dtype=torch.float32)
        assert_cuda_within_pytorch_error(q, k, v, torch.tensor([0, 170], dtype=torch.int32), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("seq", [1, 63, 64, 65, 200, 513])
@pytest.mark.parametrize("sep_case", ["zero", "one", "half", "all_but_one", "all"])
def test_cuda_sep_and_lengths(seq, sep_case):
    sep_value = {"zero": 0, "one": 1, "half": seq // 2, "all_but_one": seq - 1, "all": seq}[sep_case]
    q, k, v = make_qkv(2, seq, seq, 4, 4, 64, dtype=torch.float32)
    sep = torch.tensor([sep_value, seq - sep_value], dtype=torch.int32)
    assert_cuda_within_pytorch_error(q, k, v, sep, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("heads_q, heads_kv", HEADS)
@pytest.mark.parametrize("seq_q, seq_k", [(1, 130), (65, 200), (128, 128)])
def test_cuda_grouped_heads_and_decoding(heads_q, heads_kv, seq_q, seq_k):
    q, k, v = make_qkv(2, seq_q, seq_k, heads_q, heads_kv, 128, dtype=torch.float32)
    assert_cuda_within_pytorch_error(q, k, v, torch.tensor([seq_k // 3, seq_k], dtype=torch.int32), torch.float16)


@pytest.mark.cuda
def test_cuda_lse_gradient():
    # Only ours and the reference have an lse: their gradients from (out, lse) are compared
    # directly, at bfloat16's resolution.
    q, k, v = (t.to(torch.bfloat16) for t in make_qkv(2, 150, 150, 4, 2, 64, dtype=torch.float32))
    sep = torch.tensor([40, 150], dtype=torch.int32)
    exact_in, ours_in = leaves(q.double(), k.double(), v.double()), leaves(q.cuda(), k.cuda(), v.cuda())
    exact = reference.mixed_mask_attention(*exact_in, sep, return_lse=True)
    ours = ops.mixed_mask_attention(*ours_in, sep.cuda(), return_lse=True)
    grad_out, grad_lse = torch.randn(exact[0].shape), torch.randn(exact[1].shape)
    for o, e in zip(
        torch.autograd.grad(ours, ours_in, (grad_out.to("cuda", torch.bfloat16), grad_lse.cuda())),
        torch.autograd.grad(exact, exact_in, (grad_out.to(torch.bfloat16).double(), grad_lse.double())),
    ):
        assert max_error(o.cpu(), e) <= 2e-2 * max(e.abs().max().item(), 1.0)


@pytest.mark.cuda
def test_cuda_packed_with_unknown_max_seqlen_and_strided_inputs():
    lengths = [70, 3, 129, 64]
    q, k, v, cu_q, cu_k = make_packed(lengths, lengths, 4, 4, 64, dtype=torch.bfloat16)
    q, k, v, cu = q.cuda(), k.cuda(), v.cuda(), cu_q.cuda()
    sep = torch.tensor([10, 3, 0, 64], dtype=torch.int32, device="cuda")
    known = ops.mixed_mask_attention(q, k, v, sep, cu_seqlens_q=cu, cu_seqlens_k=cu)
    unknown = OP(q, k, v, sep, cu, cu, 0, 0, 64**-0.5)[0]  # max_seqlen 0: the kernel bounds it
    assert torch.equal(known, unknown)
    # A bound far above the token count is clamped to it (it once sized a grid that wrapped to 0
    # blocks: outputs left unwritten), forward and backward.
    grad = torch.randn_like(q)
    huge = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    out = ops.mixed_mask_attention(*huge, sep, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2**38, max_seqlen_k=2**40)
    assert torch.equal(out, known)
    leaves_known = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = ops.mixed_mask_attention(*leaves_known, sep, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for a, b in zip(torch.autograd.grad(out, huge, grad), torch.autograd.grad(expected, leaves_known, grad)):
        assert torch.equal(a, b)
    # Views of a fused QKV projection (row stride 3 x heads x dim) go in without a copy; a view whose
    # rows are not 16-byte aligned is copied first; all give the same bits.
    qkv = torch.stack([q, k, v], dim=1)
    fused = ops.mixed_mask_attention(*qkv.unbind(1), sep, cu_seqlens_q=cu, cu_seqlens_k=cu)
    wide = torch.zeros(q.shape[0], 4, 65, dtype=q.dtype, device="cuda")
    wide[..., 1:] = q
    misaligned = ops.mixed_mask_attention(wide[..., 1:], k, v, sep, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert torch.equal(fused, known) and torch.equal(misaligned, known)


@pytest.mark.cuda
def test_cuda_deterministic_backward():
    q, k, v = make_qkv(2, 700, 700, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    sep = torch.tensor([300, 0], dtype=torch.int32, device="cuda")
    out, lse = OP(q, k, v, sep, None, None, 0, 0, 0.1)
    grad = torch.randn_like(out)
    first = BACKWARD_OP(grad, None, q, k, v, out, lse, sep, None, None, 0, 0, 0.1)
    for _ in range(3):
        again = BACKWARD_OP(grad, None, q, k, v, out, lse, sep, None, None, 0, 0, 0.1)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


@pytest.mark.cuda
def test_cuda_bad_sep_or_cu_seqlens_give_nan_not_garbage():
    # Values are checked on the device (no host synchronisation): a broken contract makes every
    # output NaN rather than raising.
    q, k, v = make_qkv(2, 8, 8, 2, 2, 64, dtype=torch.float16, device="cuda")
    q, k, v = leaves(q, k, v)
    out, lse = ops.mixed_mask_attention(q, k, v, torch.tensor([3, 9], device="cuda"), return_lse=True)
    assert out.isnan().all() and lse.isnan().all()
    out.float().sum().backward()
    assert q.grad.isnan().all() and k.grad.isnan().all() and v.grad.isnan().all()
    qp, kp, vp = (t.detach().reshape(16, 2, 64) for t in (q, k, v))
    sep = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    for cu, bad in (([0, 8, 16], False), ([0, 9, 16], True), ([0, 10, 9], True), ([1, 8, 16], True)):
        cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
        out = ops.mixed_mask_attention(qp, kp, vp, sep, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8,
                                       max_seqlen_k=8)
        assert out.isnan().all() if bad else not out.isnan().any(), cu


@pytest.mark.cuda
def test_cuda_empty_inputs():
    q, k, v = leaves(*make_qkv(2, 0, 5, 2, 1, 64, dtype=torch.bfloat16, device="cuda"))
    out, lse = ops.mixed_mask_attention(q, k, v, torch.zeros(2, dtype=torch.int32, device="cuda"), return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    (out.float().sum() + lse.sum()).backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cuda_opcheck_and_compile(layout):
    if layout == "padded":
        q, k, v = make_qkv(2, 70, 90, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
        sep = torch.tensor([3, 90], dtype=torch.int32, device="cuda")
        args = (q, k, v, sep, None, None, 0, 0, 0.125)
    else:
        q, k, v, cu_q, cu_k = make_packed([30, 5], [40, 5], 4, 2, 128, dtype=torch.float16)
        q, k, v, cu_q, cu_k = (t.cuda() for t in (q, k, v, cu_q, cu_k))
        sep = torch.tensor([7, 5], dtype=torch.int32, device="cuda")
        args = (q, k, v, sep, cu_q, cu_k, 30, 40, 0.125)
    torch.library.opcheck(OP, [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                               for t in args])
    layout_kwargs = {} if layout == "padded" else dict(cu_seqlens_q=args[4], cu_seqlens_k=args[5],
                                                        max_seqlen_q=args[6], max_seqlen_k=args[7])
    eager = ops.mixed_mask_attention(q, k, v, sep, **layout_kwargs)
    compiled = torch.compile(lambda *t: ops.mixed_mask_attention(*t, sep, **layout_kwargs), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_unsupported_inputs_get_clear_errors():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="sep must be on the device of q"):
        ops.mixed_mask_attention(q, k, v, torch.tensor([1]))
    sep = torch.tensor([1], device="cuda")
    with pytest.raises(TypeError, match="CUDA kernel takes float16 or bfloat16"):
        ops.mixed_mask_attention(q.float(), k.float(), v.float(), sep)
    small = make_qkv(1, 4, 4, 1, 1, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="CUDA kernel takes head_dim 64 or 128"):
        ops.mixed_mask_attention(*small, sep)
