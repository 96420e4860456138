"""glm_ext.ops.rotary_2d: ChatGLM-style 2D rotary embedding (GLM_SPEC section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_FLOATS, LOW_PRECISION, assert_within_pytorch_error, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_ext import ops, reference


def make_case(shape, dtype=torch.float64, device="cpu", max_position=5000):
    x = torch.randn(shape, dtype=dtype, device=device)
    ids_shape = shape[:-2]
    position = torch.randint(0, max_position, ids_shape, device=device)
    block = torch.randint(0, 64, ids_shape, device=device)
    return x, position, block


def rotary_2d_as_complex(x, position, block, base=10000.0):
    """Independent formulation: each half pairs element j with j + dim/4 as a complex number
    ``a + ib`` and multiplies it by ``exp(i * id * base^(-4j / head_dim))``."""
    head_dim = x.shape[-1]
    quarter = head_dim // 4
    j = torch.arange(quarter, dtype=torch.float64)
    out = []
    for half, ids in zip(x.double().chunk(2, dim=-1), (position, block)):
        angle = ids.double()[..., None, None] * base ** (-4.0 * j / head_dim)
        z = torch.complex(half[..., :quarter], half[..., quarter:]) * torch.polar(torch.ones_like(angle), angle)
        out += [z.real, z.imag]
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 1, 1, 4), (3, 7, 2, 12), (13, 4, 8), (0, 2, 8), (2, 3, 1, 128)])
@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_forward_matches_independent_complex_formulation(shape, base):
    x, position, block = make_case(shape)
    expected = rotary_2d_as_complex(x, position, block, base)
    torch.testing.assert_close(reference.rotary_2d(x, position, block, base), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.rotary_2d(x, position, block, base), expected, rtol=1e-10, atol=1e-10)


def test_first_half_uses_position_second_half_uses_block_position():
    x, position, block = make_case((2, 3, 4, 8))
    out = ops.rotary_2d(x, position, block)
    # Zero block positions leave the second half alone; zero positions leave the first half alone.
    torch.testing.assert_close(ops.rotary_2d(x, position, torch.zeros_like(block))[..., 4:], x[..., 4:])
    torch.testing.assert_close(ops.rotary_2d(x, torch.zeros_like(position), block)[..., :4], x[..., :4])
    torch.testing.assert_close(out[..., :4], ops.rotary_2d(x, position, torch.zeros_like(block))[..., :4])


def test_backward_is_the_inverse_rotation():
    x, position, block = make_case((2, 9, 3, 64))
    rotated = ops.rotary_2d(x, position, block)
    restored = torch.ops.glm_ext.rotary_2d_backward(rotated, position, block, 10000.0)
    torch.testing.assert_close(restored, x, rtol=1e-12, atol=1e-12)


def test_gradient_matches_reference():
    x, position, block = make_case((2, 6, 3, 32))
    x.requires_grad_()
    grad = torch.randn_like(x)
    (ours,) = torch.autograd.grad(ops.rotary_2d(x, position, block), x, grad)
    (expected,) = torch.autograd.grad(reference.rotary_2d(x, position, block), x, grad)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_strided_views_of_a_fused_qkv_projection():
    batch, seq, heads, head_dim = 2, 5, 3, 16
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, dtype=torch.float64)
    q = qkv[..., : heads * head_dim].view(batch, seq, heads, head_dim)  # non-contiguous
    k_transposed = qkv[..., heads * head_dim : 2 * heads * head_dim].view(batch, seq, heads, head_dim).transpose(0, 1)
    _, position, block = make_case((batch, seq, heads, head_dim))
    assert not q.is_contiguous()
    torch.testing.assert_close(ops.rotary_2d(q, position, block), reference.rotary_2d(q.contiguous(), position, block))
    ids_t = (position.t(), block.t())
    torch.testing.assert_close(ops.rotary_2d(k_transposed, *ids_t), reference.rotary_2d(k_transposed.contiguous(), *ids_t))
    # A last dimension that is not contiguous is copied rather than refused.
    x_strided = torch.randn(2, 5, 3, 16, dtype=torch.float64)[..., ::2]
    torch.testing.assert_close(ops.rotary_2d(x_strided, position, block), reference.rotary_2d(x_strided.contiguous(), position, block))


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
def test_low_precision_within_pytorch_error(dtype):
    x, position, block = make_case((4, 64, 4, 64), dtype=dtype)
    exact = reference.rotary_2d(x.double(), position, block)
    # PyTorch's usual half-precision rotary: cos/sin tables and products in the input dtype.
    cos_sin = [reference.rotary_2d_cos_sin(ids, 32, 10000.0, torch.float32) for ids in (position, block)]
    halves = []
    for half, (cos, sin) in zip(x.chunk(2, dim=-1), cos_sin):
        cos, sin = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)
        a, b = half.chunk(2, dim=-1)
        halves.append(half * cos + torch.cat([-b, a], dim=-1) * sin)
    pytorch = torch.cat(halves, dim=-1)
    assert_within_pytorch_error(ops.rotary_2d(x, position, block), pytorch, exact)


def test_gradcheck_and_gradgradcheck():
    x, position, block = make_case((2, 3, 2, 8))
    x.requires_grad_()
    fn = lambda t: ops.rotary_2d(t, position, block)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (7, 2, 8)])
def test_opcheck(dtype, shape):
    x, position, block = make_case(shape, dtype=dtype)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.glm_ext.rotary_2d.default, (x, position, block, 10000.0))
    torch.library.opcheck(torch.ops.glm_ext.rotary_2d_backward.default, (x, position, block, 10000.0))


def test_torch_compile_fullgraph():
    x, position, block = make_case((2, 5, 3, 16), dtype=torch.float32)
    x.requires_grad_()

    def loss(t):
        return ops.rotary_2d(t, position, block).square().sum()

    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), x)
    (want,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(got, want)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    heads=st.integers(1, 4),
    quarter=st.integers(1, 10),
    base=st.floats(2.0, 1e5),
)
def test_property_random_shapes(lead, heads, quarter, base):
    x, position, block = make_case((*lead, heads, 4 * quarter))
    torch.testing.assert_close(
        ops.rotary_2d(x, position, block, base), rotary_2d_as_complex(x, position, block, base), rtol=1e-10, atol=1e-10
    )


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "x_shape, ids_shape, match",
    [
        ((2, 3, 4, 6), (2, 3), "head_dim must be a positive multiple of 4"),
        ((2, 3, 4, 5), (2, 3), "head_dim must be a positive multiple of 4"),
        ((3, 8), (3,), r"must be \[batch, seq, heads, head_dim\] or \[tokens, heads, head_dim\]"),
        ((1, 2, 3, 4, 8), (1, 2, 3), r"must be \[batch, seq, heads, head_dim\]"),
        ((2, 3, 4, 8), (2, 4), r"position_ids must have shape \[2, 3\]"),
        ((5, 4, 8), (5, 1), r"position_ids must have shape \[5\]"),
    ],
)
def test_bad_shapes(x_shape, ids_shape, match):
    x = torch.randn(x_shape)
    ids = torch.zeros(ids_shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        ops.rotary_2d(x, ids, ids)


def test_bad_dtypes_and_base():
    x, position, block = make_case((2, 3, 4, 8), dtype=torch.float32)
    with pytest.raises(TypeError, match="block_position_ids must be int32 or int64"):
        ops.rotary_2d(x, position, block.float())
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        ops.rotary_2d(x.int(), position, block)
    for base in (0.0, -3.0, math.inf):
        with pytest.raises(ValueError, match="base must be a positive finite number"):
            ops.rotary_2d(x, position, block, base)


def test_zero_sizes_give_empty_outputs():
    # In a fresh interpreter: zero heads once killed the process with a floating-point exception
    # (the CPU kernel's grain size divided by heads * head_dim).
    run_python(
        """
        import torch
        from glm_ext import ops
        for shape in [(2, 3, 0, 8), (5, 0, 8), (0, 3, 2, 8), (2, 0, 2, 8), (0, 2, 8), (0, 0, 0, 4)]:
            x = torch.randn(shape, requires_grad=True)
            ids = torch.zeros(shape[:-2], dtype=torch.int64)
            out = ops.rotary_2d(x, ids, ids)
            assert out.shape == x.shape
            assert torch.ops.glm_ext.rotary_2d_backward(x.detach(), ids, ids, 10000.0).shape == x.shape
            out.sum().backward()
            assert x.grad.shape == x.shape
        """
    )


def test_mixed_devices_are_refused():
    # A meta tensor among CPU tensors runs the fake kernel, which once returned uninitialised memory.
    x, position, block = make_case((2, 3, 4, 8), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"position_ids must be on the device of x \(cpu\), got meta"):
        ops.rotary_2d(x, position.to("meta"), block)
    with pytest.raises(ValueError, match=r"block_position_ids must be on the device of x \(meta\), got cpu"):
        ops.rotary_2d(x.to("meta"), position.to("meta"), block)
    with pytest.raises(ValueError, match=r"block_position_ids must be on the device of grad_output \(cpu\), got meta"):
        torch.ops.glm_ext.rotary_2d_backward(x, position, block.to("meta"), 10000.0)
    assert ops.rotary_2d(x.to("meta"), position.to("meta"), block.to("meta")).device.type == "meta"


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("shape", [(2, 129, 16, 128), (3, 77, 32, 64), (2, 5, 3, 12), (301, 5, 20)])
def test_cuda_matches_float64_reference(dtype, shape):
    x, position, block = make_case(shape, dtype=dtype, max_position=8192)
    exact = reference.rotary_2d(x.double(), position, block)
    pytorch = reference.rotary_2d(x, position, block)  # float32 angles, one rounding: like ours
    ours = ops.rotary_2d(x.cuda(), position.cuda(), block.cuda()).cpu()
    assert_within_pytorch_error(ours, pytorch, exact)
    grad = torch.randn_like(x)
    ours_grad = torch.ops.glm_ext.rotary_2d_backward(grad.cuda(), position.cuda(), block.cuda(), 10000.0).cpu()
    x_low, x_exact = x.clone().requires_grad_(), x.double().requires_grad_()
    (pytorch_grad,) = torch.autograd.grad(reference.rotary_2d(x_low, position, block), x_low, grad)
    (exact_grad,) = torch.autograd.grad(reference.rotary_2d(x_exact, position, block), x_exact, grad.double())
    assert_within_pytorch_error(ours_grad, pytorch_grad, exact_grad)


@pytest.mark.cuda
def test_cuda_strided_qkv_view():
    batch, seq, heads, head_dim = 2, 33, 4, 64
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    k = qkv[..., heads * head_dim : 2 * heads * head_dim].view(batch, seq, heads, head_dim)
    _, position, block = make_case((batch, seq, heads, head_dim), device="cuda")
    torch.testing.assert_close(ops.rotary_2d(k, position, block), ops.rotary_2d(k.contiguous(), position, block), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_zero_sizes_give_empty_outputs():
    for shape in [(2, 3, 0, 8), (5, 0, 8), (0, 3, 2, 8), (2, 0, 2, 8)]:
        x = torch.randn(shape, device="cuda")
        ids = torch.zeros(shape[:-2], dtype=torch.int64, device="cuda")
        assert ops.rotary_2d(x, ids, ids).shape == x.shape
        assert torch.ops.glm_ext.rotary_2d_backward(x, ids, ids, 10000.0).shape == x.shape
    torch.cuda.synchronize()
