"""Backends: how the model's heavy operations run, chosen once at load (`select_backend`).

- "torch": the reference operations in plain torch, any device (torch_ops.TorchBackend);
- "cpu": ossie's C kernels for the CPU (cpu.CpuBackend), the default on a CPU where they were built.
A backend is an object with the methods of TorchBackend; the model calls them and never asks which one it has.
"""

from __future__ import annotations

import os

import torch

from .torch_ops import TorchBackend

Backend = TorchBackend  # the interface every backend implements (subclasses override what they do faster)
BACKENDS = ("auto", "cpu", "torch")


def select_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for `device`. name: "auto" (default: $OSSIE_KERNELS if set, else the fastest available),
    "cpu" or "torch"."""
    from . import cpu_kernels

    name = (name or os.environ.get("OSSIE_KERNELS") or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "cpu" if device.type == "cpu" and cpu_kernels.available() else "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not on {device}")
        from .cpu import CpuBackend

        return CpuBackend()
    return TorchBackend()
