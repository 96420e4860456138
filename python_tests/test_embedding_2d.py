"""glm_ext.ops.embedding_2d: the fused gather-and-sum of GLM's three embedding tables."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FLOATS, LOW_PRECISION, assert_within_pytorch_error
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_ext import ops, reference


def make_case(id_shape, hidden, dtype=torch.float64, device="cpu", rows=(97, 33, 9), index_dtype=torch.int64):
    """Random tables and ids shaped like GLM's: ids uniform over each table."""
    words, positions, blocks = rows
    tables = [torch.randn(r, hidden, dtype=dtype, device=device) for r in rows]
    ids = [torch.randint(0, r, id_shape, dtype=index_dtype, device=device) for r in (words, positions, blocks)]
    return ids, tables


def glm_row_ids(batch, seq, sep, device="cpu"):
    """Position and block-position ids of GLM rows whose Part B (after ``sep``) is one long span."""
    position = torch.arange(seq, device=device).repeat(batch, 1)
    position[:, sep:] = sep - 1
    block = torch.zeros(batch, seq, dtype=torch.int64, device=device)
    block[:, sep:] = torch.arange(1, seq - sep + 1, device=device)
    return position, block


def test_hand_checked_example():
    # word row r = r, position row r = 10 r, block row r = 100 r (hidden 2, second column negated).
    def table(rows, scale):
        column = torch.arange(rows, dtype=torch.float32) * scale
        return torch.stack([column, -column], dim=1)

    out = ops.embedding_2d(
        torch.tensor([[3, 1]]), torch.tensor([[0, 2]]), torch.tensor([[0, 1]]),
        table(5, 1.0), table(4, 10.0), table(2, 100.0),
    )
    torch.testing.assert_close(out, torch.tensor([[[3.0, -3.0], [121.0, -121.0]]]), rtol=0, atol=0)


@pytest.mark.parametrize("id_shape", [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (2, 0)])
@pytest.mark.parametrize("hidden", [1, 3, 64, 257])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_and_backward_match_reference_float64(id_shape, hidden, index_dtype):
    ids, tables = make_case(id_shape, hidden, index_dtype=index_dtype)
    tables = [t.requires_grad_() for t in tables]
    ours = ops.embedding_2d(*ids, *tables)
    expected = reference.embedding_2d(*ids, *tables)
    assert ours.shape == (*id_shape, hidden) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, tables, grad)
    expected_grads = torch.autograd.grad(expected, tables, grad)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mixed_index_dtypes_and_strided_ids():
    # GLM hands position_ids as [batch, 2, seq]; its rows are non-contiguous views.
    ids, tables = make_case((4, 6), 8)
    position_2d = torch.stack([ids[1], ids[2]], dim=1).to(torch.int32)
    got = ops.embedding_2d(ids[0], position_2d[:, 0], position_2d[:, 1], *tables)
    torch.testing.assert_close(got, reference.embedding_2d(*ids, *tables), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
def test_low_precision_within_pytorch_error(dtype):
    ids, tables = make_case((8, 33), 96, dtype=torch.float64)
    tables = [t.requires_grad_() for t in tables]
    low = [t.detach().to(dtype).requires_grad_() for t in tables]
    exact_in = [t.detach().to(dtype).double().requires_grad_() for t in tables]
    exact = reference.embedding_2d(*ids, *exact_in)
    ours = ops.embedding_2d(*ids, *low)
    pytorch = reference.embedding_2d(*ids, *low)
    assert_within_pytorch_error(ours, pytorch, exact)

    grad = torch.randn_like(exact).to(dtype)
    for o, p, e in zip(
        torch.autograd.grad(ours, low, grad),
        torch.autograd.grad(pytorch, low, grad),
        torch.autograd.grad(exact, exact_in, grad.double()),
    ):
        assert_within_pytorch_error(o, p, e, factor=3.0)


def test_backward_accumulates_repeated_rows():
    # Every token shares block row 0 and the same word: gradients are counts times grad rows.
    hidden, tokens = 5, 40
    tables = [torch.randn(r, hidden, dtype=torch.float64) for r in (3, tokens, 2)]
    grad = torch.randn(tokens, hidden, dtype=torch.float64)
    grads = torch.ops.glm_ext.embedding_2d_backward(
        grad, torch.full((tokens,), 2), torch.arange(tokens), torch.zeros(tokens, dtype=torch.int64), 3, tokens, 2
    )
    torch.testing.assert_close(grads[0][2], grad.sum(0))
    assert grads[0][:2].abs().max() == 0
    torch.testing.assert_close(grads[1], grad)
    torch.testing.assert_close(grads[2][0], grad.sum(0))
    assert grads[2][1].abs().max() == 0


@pytest.mark.parametrize("words", [4096, 6144])
def test_backward_of_a_large_mostly_unused_table(words):
    # Word tables of 24 MiB (split over the threads into many zeroed and summed pieces) and 36 MiB
    # (zeroed whole first, from 32 MiB on, then only its used rows summed): the few used rows hold
    # their sums, every other row is exactly zero, as in the float64 reference.
    ids, tables = make_case((3, 40), 768, rows=(words, 41, 9))
    tables = [t.requires_grad_() for t in tables]
    grad = torch.randn(3, 40, 768, dtype=torch.float64)
    ours = torch.autograd.grad(ops.embedding_2d(*ids, *tables), tables, grad)
    expected = torch.autograd.grad(reference.embedding_2d(*ids, *tables), tables, grad)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    unused = torch.ones(words, dtype=torch.bool)
    unused[ids[0].flatten()] = False
    assert ours[0][unused].abs().max() == 0


def test_backward_is_deterministic_across_thread_counts():
    batch, seq, hidden = 6, 300, 64
    position, block = glm_row_ids(batch, seq, sep=200)
    words = torch.randint(0, 50, (batch, seq))
    grad = torch.randn(batch, seq, hidden, dtype=torch.float32)
    args = (grad, words, position, block, 50, seq, seq + 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.glm_ext.embedding_2d_backward(*args)
        torch.set_num_threads(max(threads, 2))
        parallel = torch.ops.glm_ext.embedding_2d_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, parallel):
        assert torch.equal(a, b)


def test_gradcheck_and_gradgradcheck():
    ids, tables = make_case((2, 5), 4, rows=(6, 5, 3))
    tables = [t.requires_grad_() for t in tables]
    fn = lambda *t: ops.embedding_2d(*ids, *t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tables)
    assert torch.autograd.gradgradcheck(fn, tables)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    ids, tables = make_case((3, 7), 16, dtype=dtype)
    tables = [t.requires_grad_() for t in tables]
    torch.library.opcheck(torch.ops.glm_ext.embedding_2d.default, (*ids, *tables))
    grad = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.glm_ext.embedding_2d_backward.default, (grad, *ids, 97, 33, 9))


def test_torch_compile_fullgraph_forward_and_backward():
    ids, tables = make_case((2, 9), 16, dtype=torch.float32)
    tables = [t.requires_grad_() for t in tables]

    def loss(*t):
        return ops.embedding_2d(*ids, *t).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*tables), tables)
    want = torch.autograd.grad(loss(*tables), tables)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@settings(max_examples=40, deadline=None)
@given(
    id_shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    hidden=st.integers(1, 40),
    rows=st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30)),
)
def test_property_random_shapes(id_shape, hidden, rows):
    ids, tables = make_case(tuple(id_shape), hidden, rows=rows)
    torch.testing.assert_close(ops.embedding_2d(*ids, *tables), reference.embedding_2d(*ids, *tables), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("which, name", [(0, "input_ids"), (1, "position_ids"), (2, "block_position_ids")])
@pytest.mark.parametrize("bad_value", [-1, "rows"])
def test_out_of_range_ids_raise_index_error(which, name, bad_value):
    ids, tables = make_case((2, 4), 8)
    ids[which][1, 2] = tables[which].shape[0] if bad_value == "rows" else bad_value
    with pytest.raises(IndexError, match=name):
        ops.embedding_2d(*ids, *tables)
    with pytest.raises(IndexError, match=name):  # the CPU kernel checks even when asked not to
        ops.embedding_2d(*ids, *tables, check_ids=False)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda ids, t: ids.__setitem__(0, ids[0].float()), TypeError, "input_ids must be int32 or int64"),
        (lambda ids, t: ids.__setitem__(1, ids[1][:, :3]), ValueError, "position_ids must have the shape"),
        (lambda ids, t: t.__setitem__(1, t[1][:, :5]), ValueError, "position_weight must have the hidden size"),
        (lambda ids, t: t.__setitem__(2, t[2].float()), TypeError, "block_position_weight must have the dtype"),
        (lambda ids, t: t.__setitem__(0, t[0][0]), ValueError, "word_weight must be a 2-D table"),
        (lambda ids, t: t.__setitem__(0, t[0].int()), TypeError, "word_weight must be float32"),
        (lambda ids, t: t.__setitem__(2, t[2][:0]), ValueError, "block_position_weight must have at least one row"),
    ],
)
def test_bad_input_gets_clear_error(mutate, error, match):
    ids, tables = make_case((2, 4), 8)
    mutate(ids, tables)
    with pytest.raises(error, match=match):
        ops.embedding_2d(*ids, *tables)


def test_zero_sizes_give_empty_outputs():
    for id_shape, hidden in (((0, 5), 8), ((3, 0), 8), ((2, 4), 0), ((0,), 0)):
        ids, tables = make_case(id_shape, hidden)
        tables = [t.requires_grad_() for t in tables]
        out = ops.embedding_2d(*ids, *tables)
        assert out.shape == (*id_shape, hidden)
        grads = torch.autograd.grad(out.sum(), tables)
        assert [g.shape for g in grads] == [t.shape for t in tables] and not any(g.any() for g in grads)


def test_mixed_devices_are_refused():
    # A meta tensor among CPU tensors runs the fake kernel, which once returned uninitialised memory.
    ids, tables = make_case((2, 4), 8)
    with pytest.raises(ValueError, match=r"position_weight must be on the device of input_ids \(cpu\), got meta"):
        ops.embedding_2d(*ids, tables[0], tables[1].to("meta"), tables[2])
    with pytest.raises(ValueError, match=r"block_position_ids must be on the device of input_ids \(cpu\), got meta"):
        ops.embedding_2d(ids[0], ids[1], ids[2].to("meta"), *tables)
    with pytest.raises(ValueError, match=r"grad_output must be on the device of input_ids \(cpu\), got meta"):
        torch.ops.glm_ext.embedding_2d_backward(torch.randn(2, 4, 8, device="meta"), *ids, 97, 33, 9)


def test_backward_bad_input():
    ids, _ = make_case((2, 4), 8)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[\*input_ids.shape, hidden\]"):
        torch.ops.glm_ext.embedding_2d_backward(torch.randn(2, 5, 8), *ids, 97, 33, 9)
    with pytest.raises(IndexError, match="outside a table of 9 rows"):
        torch.ops.glm_ext.embedding_2d_backward(torch.randn(2, 4, 8), ids[0], ids[1], ids[2] + 9, 97, 33, 9)


# ---------------------------------------------------------------------------------------------
# CUDA


def to_device(tensors, device, dtype):
    """Moves tensors to ``device``; floating ones also take ``dtype``."""
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in tensors]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("hidden", [8, 100, 1024])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cuda_matches_float64_reference(dtype, hidden, index_dtype):
    batch, seq = 4, 257
    position, block = glm_row_ids(batch, seq, sep=150)
    ids = [t.to(index_dtype) for t in (torch.randint(0, 1000, (batch, seq)), position, block)]
    rows = (1000, seq + 1, seq + 1)
    tables = [torch.randn(r, hidden, dtype=torch.float64).to(dtype).double() for r in rows]
    grad = torch.randn(batch, seq, hidden, dtype=torch.float64).to(dtype).double()

    exact_in = [t.requires_grad_() for t in tables]
    exact = reference.embedding_2d(*ids, *exact_in)
    exact_grads = torch.autograd.grad(exact, exact_in, grad)
    pytorch_in = [t.detach().to(dtype).requires_grad_() for t in tables]
    pytorch = reference.embedding_2d(*ids, *pytorch_in)
    pytorch_grads = torch.autograd.grad(pytorch, pytorch_in, grad.to(dtype))

    ours = ops.embedding_2d(*to_device(ids + tables, "cuda", dtype))
    ours_grads = torch.ops.glm_ext.embedding_2d_backward(*to_device([grad] + ids, "cuda", dtype), *rows)
    assert_within_pytorch_error(ours.cpu(), pytorch.detach(), exact.detach())
    for o, p, e in zip(ours_grads, pytorch_grads, exact_grads):
        assert_within_pytorch_error(o.cpu(), p, e, factor=3.0)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_with_long_runs():
    # Block position 0 is shared by most tokens: one very long run of equal keys.
    batch, seq, hidden, words = 16, 2048, 256, 50304
    position, block = glm_row_ids(batch, seq, sep=1700)
    ids = [torch.randint(0, words, (batch, seq)), position, block]
    grad = torch.randn(batch, seq, hidden, dtype=torch.float64)
    rows = (words, seq + 1, seq + 1)
    args = to_device([grad] + ids, "cuda", torch.float32)
    first = torch.ops.glm_ext.embedding_2d_backward(*args, *rows)
    for _ in range(3):
        again = torch.ops.glm_ext.embedding_2d_backward(*args, *rows)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    exact = torch.ops.glm_ext.embedding_2d_backward(grad, *ids, *rows)
    for got, want in zip(first, exact):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_cuda_out_of_range_ids():
    ids, tables = make_case((2, 4), 8, device="cuda")
    ids[1][0, 3] = 1000
    with pytest.raises(IndexError, match="position_ids must lie in"):
        ops.embedding_2d(*ids, *tables)
    # Unchecked: the guarded kernel never reads outside a table, the row is NaN, the others exact.
    out = ops.embedding_2d(*ids, *tables, check_ids=False)
    assert out[0, 3].isnan().all()
    keep = torch.ones(2, 4, dtype=torch.bool, device="cuda")
    keep[0, 3] = False
    safe = [i.clone() for i in ids]
    safe[1][0, 3] = 0
    torch.testing.assert_close(out[keep], reference.embedding_2d(*safe, *tables)[keep])


@pytest.mark.cuda
def test_cuda_device_mismatch():
    ids, tables = make_case((2, 4), 8)
    with pytest.raises(ValueError, match="word_weight must be on the device of input_ids"):
        ops.embedding_2d(*ids, tables[0].cuda(), *tables[1:])


@pytest.mark.cuda
def test_cuda_zero_sizes_give_empty_outputs():
    for id_shape, hidden in (((0, 5), 8), ((3, 0), 8), ((2, 4), 0)):
        ids, tables = make_case(id_shape, hidden, device="cuda")
        assert ops.embedding_2d(*ids, *tables).shape == (*id_shape, hidden)
        grads = torch.ops.glm_ext.embedding_2d_backward(torch.zeros(*id_shape, hidden, device="cuda"), *ids, 97, 33, 9)
        assert [g.shape for g in grads] == [t.shape for t in tables] and not any(g.any() for g in grads)
    torch.cuda.synchronize()
