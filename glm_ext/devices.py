"""Choosing the device to run on, for every command and the trainer: :func:`resolve_device`."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """The torch device ``device`` names, checked to be usable here.

    ``"auto"``: CUDA when a GPU is visible and the extension was built with CUDA kernels, else the
    CPU. Otherwise a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...); ValueError, naming the
    value and the ``device`` setting (``--device``), when it is not one or is not available.
    """
    import glm_ext

    has_cuda_kernels = glm_ext.build_info()["cuda"]
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and has_cuda_kernels else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} (--device) is not a device: expected auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"device {device!r} (--device): glm_ext runs on cpu or cuda, not {resolved.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} (--device): no CUDA device is visible; use --device cpu (or auto)")
    if not has_cuda_kernels:
        raise ValueError(f"device {device!r} (--device): this glm_ext build has no CUDA kernels; use --device cpu "
                         "or rebuild with GLM_EXT_CUDA=1")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} (--device): only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved
