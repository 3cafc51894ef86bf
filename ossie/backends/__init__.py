"""Backends: how the model's heavy operations run, chosen once at load (`select_backend`).

- "torch": the reference operations in plain torch, any device (torch_ops.TorchBackend);
- "cpu": ossie's C kernels for the CPU (cpu.CpuBackend), the default on a CPU where they were built;
- "cuda": ossie's Triton kernels and CUDA graphs for NVIDIA GPUs (cuda.CudaBackend), the default on a GPU.
Every backend implements base.py's `Backend`; the model calls its operations and never asks which one it has.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .base import Backend
from .torch_ops import TorchBackend

if TYPE_CHECKING:
    from ..engine_args import EngineArgs

__all__ = ["BACKENDS", "Backend", "TorchBackend", "check_options", "q8_quantizer", "select_backend",
           "set_num_threads"]
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


def check_options(args: EngineArgs, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """ValueError where `args` asks what this device and model cannot run (before the weights load)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {args.device!r}: no CUDA GPU is available here (this torch build: "
                         f"{torch.__version__}); use --device cpu")
    if args.quantization and (device.type != "cpu" or dtype != torch.bfloat16):
        raise ValueError(f"quantization {args.quantization!r} is for bf16 models on the CPU")
    if args.kv_cache_dtype == "q8" and device.type != "cpu":
        raise ValueError("kv_cache_dtype 'q8' is for the CPU (the GPU kernels read a bf16 cache)")
    if args.kv_cache_dtype == "q8" and head_dim % 32:
        raise ValueError(f"kv_cache_dtype 'q8' scales each 32 values of a head: head_dim {head_dim} is not a "
                         "multiple of 32")


def set_num_threads(n: int | None) -> None:
    """The CPU kernels' threads: n, or every core this process may use."""
    from . import cpu_kernels

    cpu_kernels.set_num_threads(n or len(os.sched_getaffinity(0)))


def q8_quantizer() -> Callable | None:
    """The C kernels' q8 quantizer where they are built (None: model/q8.py's torch one)."""
    from . import cpu_kernels

    return cpu_kernels.quantize_q8 if cpu_kernels.available() else None
