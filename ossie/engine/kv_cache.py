"""Per-sequence KV cache.

Full-attention layers keep every position (a buffer that grows by doubling). Sliding-window layers keep
only the last `window` positions in a ring buffer, so long contexts cost memory on full layers alone.
Keys are stored after RoPE, so a cached key never needs its position again.
"""

from __future__ import annotations

import torch

from ..model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = 256):
        self.window = cfg.sliding_window
        self.length = 0  # positions already written (the next token's position)
        self.sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        shape = (cfg.num_kv_heads, cfg.head_dim)
        sizes = [self.window if s else max(1, capacity) for s in self.sliding]
        self.k = [torch.zeros(n, *shape, dtype=dtype, device=device) for n in sizes]
        self.v = [torch.zeros(n, *shape, dtype=dtype, device=device) for n in sizes]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store the new keys/values [T, kv_heads, head_dim] at positions length..length+T-1.

        Returns (keys, values, first_position): every key the new queries may attend to, in position order
        (for a single new token on a sliding layer: in ring order, which a single query does not mind).
        """
        t, p0 = k.shape[0], self.length
        if t == 1:  # decoding: write the slot, hand back the rows as they lie (one query attends in any order)
            slot, n = self.decode_slot(layer)
            self.k[layer][slot] = k[0]
            self.v[layer][slot] = v[0]
            return self.k[layer][:n], self.v[layer][:n], p0 + 1 - n
        if not self.sliding[layer]:
            if p0 + t > self.k[layer].shape[0]:
                self._grow(layer, p0 + t)
            self.k[layer][p0:p0 + t] = k
            self.v[layer][p0:p0 + t] = v
            return self.k[layer][:p0 + t], self.v[layer][:p0 + t], 0
        w = self.window
        first = max(0, p0 - (w - 1))  # the oldest cached position the first new query can still see
        if first < p0:
            slots = torch.arange(first, p0, device=k.device) % w
            keys, values = torch.cat([self.k[layer][slots], k]), torch.cat([self.v[layer][slots], v])
        else:
            keys, values = k, v
        n = min(t, w)  # only the last `window` new positions survive in the ring
        slots = torch.arange(p0 + t - n, p0 + t, device=k.device) % w
        self.k[layer][slots] = k[t - n:]
        self.v[layer][slots] = v[t - n:]
        return keys, values, first

    def decode_slot(self, layer: int) -> tuple[int, int]:
        """For one new token (written by the caller): (the row to write it to, how many rows to attend to then).
        Rows are in ring order on sliding layers, which a single query does not mind."""
        p0 = self.length
        if not self.sliding[layer]:
            if p0 + 1 > self.k[layer].shape[0]:
                self._grow(layer, p0 + 1)
            return p0, p0 + 1
        return p0 % self.window, min(p0 + 1, self.window)

    def _grow(self, layer: int, needed: int) -> None:
        size = max(needed, 2 * self.k[layer].shape[0])
        for buf in (self.k, self.v):
            new = buf[layer].new_zeros(size, *buf[layer].shape[1:])
            new[: self.length] = buf[layer][: self.length]
            buf[layer] = new

    def advance(self, t: int) -> None:
        self.length += t
