"""Backends: how the model's heavy operations run, chosen once at load (`select_backend`).

- "torch": the reference operations in plain torch, any device (torch_ops.TorchBackend);
- "cpu": ossie's C kernels for the CPU (cpu.CpuBackend), the default on a CPU where they were built;
- "cuda": ossie's Triton kernels and CUDA graphs for NVIDIA GPUs (cuda.CudaBackend), the default on a GPU.
Every backend implements base.py's `Backend`; the model calls its operations and never asks which one it has.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import Backend
from .torch_ops import TorchBackend

__all__ = ["BACKENDS", "Backend", "TorchBackend", "select_backend"]
BACKENDS = ("auto", "cpu", "cuda", "torch")


def select_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for `device`. name: "auto" (default: $OSSIE_KERNELS if set, else the fastest available),
    "cpu", "cuda" or "torch"."""
    from . import cpu_kernels

    name = (name or os.environ.get("OSSIE_KERNELS") or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cpu":
            name = "cpu" if cpu_kernels.available() else "torch"
        else:
            name = "cuda" if device.type == "cuda" and _has_triton() else "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not on {device}")
        from .cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"the cuda backend runs on an NVIDIA GPU, not on {device}")
        if not _has_triton():
            raise RuntimeError("the cuda backend needs triton (it comes with torch's CUDA builds): pip install triton")
        from .cuda import CudaBackend

        return CudaBackend()
    return TorchBackend()


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
