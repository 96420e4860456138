"""The build: build_info, the glm-ext command, and the CMake build of the same extension."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glm_ext

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_describes_this_build():
    info = glm_ext.build_info()
    assert info["version"] == glm_ext.__version__
    built = tuple(int(p) for p in info["torch_version"].split(".")[:2])
    running = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert built == running, f"built against torch {info['torch_version']}, running {torch.__version__}"
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must name its architectures"
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None


def test_a_visible_gpu_means_the_cuda_kernels_are_built():
    # Otherwise every test marked `cuda` would skip on a GPU machine, and the suite pass without
    # having run a single CUDA kernel.
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    assert glm_ext.build_info()["cuda"], (
        "a GPU is visible but glm_ext was built without its CUDA kernels (GLM_EXT_CUDA=0, or no nvcc or a CPU "
        "build of torch at build time): rebuild with GLM_EXT_CUDA=1"
    )


def test_every_op_has_cpu_kernels_registered():
    for op in (
        "embedding_2d", "embedding_2d_backward", "rotary_2d", "rotary_2d_backward", "span_shuffle_batch",
        "mixed_mask_attention", "mixed_mask_attention_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"glm_ext::{op}", "CPU"), op
        if glm_ext.build_info()["cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"glm_ext::{op}", "CUDA"), op


@pytest.mark.parametrize("command", [[sys.executable, "-m", "glm_ext"], ["glm-ext"]])
def test_cli_info(command):
    if command[0] == "glm-ext":
        script = Path(sys.executable).with_name("glm-ext")
        if not script.exists():
            pytest.skip("the glm-ext console script is not installed beside this interpreter")
        command = [str(script)]
    result = subprocess.run(command + ["info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == json.loads(json.dumps(glm_ext.build_info()))
    text = subprocess.run(command + ["info"], capture_output=True, text=True, check=True).stdout
    assert f"glm_ext {glm_ext.__version__}" in text


def test_cli_without_a_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "glm_ext"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: glm-ext" in result.stderr


def test_cmake_builds_a_working_extension(tmp_path):
    """CMakeLists.txt builds the same extension (CPU kernels here, to keep the suite fast)."""
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.fail("cmake and ninja are development requirements (requirements-dev.txt)")
    build = tmp_path / "build"
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DGLM_EXT_CUDA=OFF"],
        check=True, capture_output=True, env=env,
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
    assert (build / "compile_commands.json").exists()
    (module,) = (build / "glm_ext").glob("_C*.so")
    # A fresh interpreter loads the CMake-built module and runs an op through torch.ops.
    probe = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("_C", {str(module)!r})
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
info = module.build_info()
ids = torch.tensor([[1, 2]])
out = torch.ops.glm_ext.embedding_2d(ids, ids, ids * 0, torch.eye(3), torch.eye(3), torch.ones(1, 3))
assert torch.equal(out, torch.tensor([[[1., 3., 1.], [1., 1., 3.]]])), out
print(info["version"], info["cuda"])
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [glm_ext.__version__, "False"]
