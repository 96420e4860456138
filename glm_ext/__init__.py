"""glm_ext: GLM (General Language Model, autoregressive blank infilling) on fused PyTorch ops."""

from __future__ import annotations

import re

__version__ = "0.1.0"

import torch  # noqa: F401  (the extension links against torch's libraries)

from glm_ext import ops, reference
from glm_ext._C import build_info as _compiled_build_info


def build_info() -> dict:
    """How the installed extension was built: version, torch, CUDA, architectures.

    ``torch_runtime`` is the torch imported now; it must match ``torch_version`` (the one the
    extension was compiled against) up to the patch level.
    """
    info = dict(_compiled_build_info())
    info["cuda_archs"] = [a for a in re.split(r"[;\s]+", info["cuda_archs"]) if a]
    info["torch_runtime"] = torch.__version__
    return info


__all__ = ["__version__", "build_info", "ops", "reference"]
