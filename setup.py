"""Builds the glm_ext._C extension with torch.utils.cpp_extension and ninja.

Environment:
  GLM_EXT_CUDA=auto|0|1   compile the CUDA kernels: auto (default) does so when torch is a CUDA
                          build and nvcc is found; 1 requires both; 0 builds the CPU kernels only.
                          Never decided by whether a GPU is visible.
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "8.0;9.0" (A100 and H100 class).
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja build).
Install: pip install --no-build-isolation .   (or -e . for development)
"""

from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

# torch derives CUDA_HOME from the first nvcc on PATH; a wrapper script there (as in /usr/local/bin)
# points it at a directory without the toolkit's lib64. Prefer the toolkit itself when none is set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def read_version() -> str:
    text = (ROOT / "glm_ext" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def want_cuda() -> bool:
    mode = os.environ.get("GLM_EXT_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise ValueError(f"GLM_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    import torch

    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = cpp_extension.CUDA_HOME is not None and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()
    if mode == "1" and not (torch_has_cuda and nvcc_found):
        raise RuntimeError(
            "GLM_EXT_CUDA=1 needs a CUDA build of torch and nvcc "
            f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r})"
        )
    return mode == "1" or (mode == "auto" and torch_has_cuda and nvcc_found)


def source_files(with_cuda: bool) -> list[str]:
    # The same lists as CMakeLists.txt: every .cpp under csrc/ and, with CUDA, every .cu.
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    return sources


def cuda_wheel_include_dirs() -> list[str]:
    # CUDA builds of torch ship the library headers it includes (cusparse.h, ...) in the
    # nvidia-* wheels rather than relying on the toolkit install.
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(str(p) for base in nvidia.__path__ for p in Path(base).glob("*/include") if p.is_dir())


def use_openmp() -> bool:
    # ATen's at::parallel_for is header code: compiled without -fopenmp it silently runs every
    # CPU kernel on one thread. The runtime is torch's own libgomp (same soname, already loaded).
    import torch

    return sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def make_extension():
    with_cuda = want_cuda()
    version = read_version()
    define_macros = [("GLM_EXT_VERSION", f'"{version}"')]
    cxx_flags = ["-O3", "-std=c++20"]
    link_flags = []
    if use_openmp():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("GLM_EXT_WITH_CUDA", None), ("GLM_EXT_CUDA_ARCHS", f'"{archs}"')]
        extension = cpp_extension.CUDAExtension
        kwargs = {"include_dirs": [str(ROOT / "csrc")] + cuda_wheel_include_dirs()}
    else:
        extension = cpp_extension.CppExtension
        kwargs = {"include_dirs": [str(ROOT / "csrc")]}
    return extension(
        name="glm_ext._C",
        sources=source_files(with_cuda),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        **kwargs,
    )


setup(
    name="glm_ext",
    version=read_version(),
    packages=find_packages(include=["glm_ext", "glm_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
