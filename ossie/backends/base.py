"""`Backend`: the operations the model asks of a backend, and nothing else. The model (model/transformer.py) is
the math; a backend runs its heavy operations and is chosen once, at load.

Every backend implements every operation, checked when it is built (an ABC: a missing one is a TypeError at
construction). A backend that runs an operation as the reference does says so by name (`attend =
TorchBackend.attend`). Backends once subclassed the torch reference itself, and a method a new backend forgot, or
misspelled, ran the slow reference path silently.

Per-step state is passed, not kept: `layers` may hand each layer a `state` (the CUDA backend's batched decode
tables), which reaches `attend` through `Transformer.layer`; the reference passes None.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ..engine.kv_cache import KVCache
    from ..model.checkpoint import LayerWeights, Weights
    from ..model.config import ModelConfig
    from ..model.q8 import Q8
    from ..model.transformer import Transformer


class Backend(ABC):
    name: ClassVar[str]
    # the rows of a step's decoding sequences (one each, and a checked sequence's guesses) that the backend
    # computes each as it would alone: a speculating engine checks no more guesses than fit (engine/speculative.py)
    decoding_rows: ClassVar[int] = 8

    @abstractmethod
    def prepare(self, weights: Weights) -> None:
        """Adapt the loaded weights once, at load."""

    @abstractmethod
    def running(self) -> contextlib.AbstractContextManager:
        """Entered around each forward pass (a backend may set up threads for it)."""

    @abstractmethod
    def layers(self, model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               caches: list[KVCache], sizes: list[int], checking: Sequence[int] = ()) -> torch.Tensor:
        """Every layer of `model` on x [T, hidden] (sizes[b] rows of each sequence b), in order: `model.layer` for
        each, or what computes the same. checking: sequences whose rows are a decoding token and candidates
        (Transformer.forward_batch)."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * scale, in float32, in x's dtype."""

    @abstractmethod
    def linear(self, x: torch.Tensor, w: torch.Tensor | Q8, bias: torch.Tensor | None = None,
               alone: Sequence[int] = ()) -> torch.Tensor:
        """x @ w.T + bias. alone: rows of decoding sequences, which a backend computes as it computes a sequence
        decoding alone, whatever else the step carries."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int,
               caches: list[KVCache], sizes: list[int], state: Any = None,
               checking: Sequence[int] = ()) -> torch.Tensor:
        """Attention of a layer for sizes[b] rows of each sequence b: their new keys and values [T, KV, D] go into
        the sequence's cache, and its queries [T, H, D] attend to the keys they see there. Returns [T, H*D]. state:
        what this backend's `layers` passed for the step, if anything; the rows of a sequence in `checking` attend
        each as its one-token step would."""

    @abstractmethod
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_start: int,
                  k_start: int, window: int) -> torch.Tensor:
        """One sequence's queries q [T, H, D] at positions q_start.. over keys k/v [S, KV, D] at k_start.."""

    @abstractmethod
    def experts(self, x: torch.Tensor, lw: LayerWeights, chosen: torch.Tensor, weight: torch.Tensor,
                cfg: ModelConfig, alone: Sequence[int] = ()) -> torch.Tensor:
        """sum over each token's chosen experts [T, k] of weight [T, k] * expert(x). alone: as for linear."""
