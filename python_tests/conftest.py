"""Shared fixtures and the accuracy rule of the test suite.

Low-precision results are judged by flash-attention's rule: the error of glm_ext against a float64
reference may be at most ``factor`` times the error of the same computation done by plain PyTorch
in the same dtype (plus a tiny absolute floor for results PyTorch happens to get exactly right).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import glm_ext  # noqa: F401  (registers the ops)

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def cuda_skip_reason() -> str | None:
    """Why the tests marked ``cuda`` cannot run here, or None when they can. A visible GPU with an
    extension built without its CUDA kernels skips them too, but test_build.py then fails."""
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    if not glm_ext.build_info()["cuda"]:
        return "a GPU is visible but the extension was built without its CUDA kernels (test_build.py fails)"
    return None


def cuda_available() -> bool:
    return cuda_skip_reason() is None


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_within_pytorch_error(
    ours: torch.Tensor, pytorch_same_dtype: torch.Tensor, exact: torch.Tensor, factor: float = 2.0
) -> None:
    """Flash-attention's tolerance rule (see the module docstring)."""
    assert ours.shape == exact.shape and ours.dtype == pytorch_same_dtype.dtype
    ours_error = max_error(ours, exact)
    pytorch_error = max_error(pytorch_same_dtype, exact)
    floor = 1e-6 * max(exact.abs().max().item(), 1.0) if exact.numel() else 0.0
    assert ours_error <= factor * pytorch_error + floor, (
        f"error {ours_error:.3g} exceeds {factor} x PyTorch's {pytorch_error:.3g} in {ours.dtype}"
    )


def run_python(code: str, **env) -> str:
    """Runs ``code`` in a fresh interpreter and returns its output: what may crash (a segfault, a
    floating-point exception) fails the test that asked, not the whole suite."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout
