"""Per-sequence KV cache.

Full-attention layers keep every position (a buffer that grows by doubling). Sliding-window layers keep
only the last `window` positions in a ring buffer, so long contexts cost memory on full layers alone.
Keys are stored after RoPE, so a cached key never needs its position again.

A step may be taken back (`truncate`: speculative decoding's rejected guesses): full layers just forget the last
positions; a sliding layer's ring gets back the rows the step overwrote, which every step of several tokens keeps
(`undo`, at most a window's rows a layer) until the next one.

For the prefix cache (prefix_cache.py) a sequence's KV rows are copied out by position (`rows`) as blocks
complete, and a cached prefix is copied in before the rest of a prompt is read (`load_prefix`). A prompt chunk
longer than the window overwrites part of its own rows in a sliding layer's ring; with `keep_overwritten` those
rows are kept (until the caller clears `overwritten`), so that every block can still be copied out.

With `quantized` (kv_cache_dtype="q8"), every row is stored packed as q8 (ossie.model.q8.pack_kv: int8 values and a
float16 scale per 32, about half the bytes of bf16), and handed back packed: the backends' attention reads them
(the C kernels in place, the torch reference unpacked), a prompt chunk's own keys included, so that it attends to
exactly what later tokens will find in the cache.
"""

from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..model.q8 import kv_row_bytes, pack_kv


def kv_bytes_per_row(cfg: ModelConfig, dtype: torch.dtype, quantized: bool = False) -> int:
    """Bytes of one position's keys and values in one layer."""
    row = kv_row_bytes(cfg.head_dim) if quantized else cfg.head_dim * dtype.itemsize
    return 2 * cfg.num_kv_heads * row


class KVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = 256, quantized: bool = False):
        self.window = cfg.sliding_window
        self.length = 0  # positions already written (the next token's position)
        self.sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        self.quantized = quantized
        shape = (cfg.num_kv_heads, kv_row_bytes(cfg.head_dim) if quantized else cfg.head_dim)
        stored = torch.uint8 if quantized else dtype
        sizes = [self.window if s else max(1, capacity) for s in self.sliding]
        self.k = [torch.zeros(n, *shape, dtype=stored, device=device) for n in sizes]
        self.v = [torch.zeros(n, *shape, dtype=stored, device=device) for n in sizes]
        self.keep_overwritten = False
        self.overwritten: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # layer -> (first position, k, v)
        # sliding layer -> (the first position the last step of several tokens wrote in its ring, the rows it found
        # there): what `truncate` puts back
        self.undo: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store the new keys/values [T, kv_heads, head_dim] at positions length..length+T-1.

        Returns (keys, values, first_position): every key the new queries may attend to, in position order
        (for a single new token on a sliding layer: in ring order, which a single query does not mind).
        """
        t, p0 = k.shape[0], self.length
        if self.quantized:
            k, v = pack_kv(k), pack_kv(v)
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
        if self.keep_overwritten and t > n:
            self.overwritten[layer] = (p0, k[:t - n], v[:t - n])
        slots = torch.arange(p0 + t - n, p0 + t, device=k.device) % w
        self.undo[layer] = (p0 + t - n, self.k[layer][slots].clone(), self.v[layer][slots].clone())
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

    def truncate(self, n: int) -> None:
        """Take back the last n positions, as if they had never been written. On sliding layers they must all have
        been written by the last step, and that step must have had several tokens (a one-token step keeps no undo:
        decoding is the hot path); ValueError otherwise, before anything changes."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot take back {n} of {self.length} positions")
        end, start = self.length, self.length - n
        for layer, sliding in enumerate(self.sliding):
            if sliding and n:
                first, old_k, _ = self.undo.get(layer, (end, None, None))
                if old_k is None or first > start or first + old_k.shape[0] != end:
                    raise ValueError(f"positions {start}..{end - 1} were not all written by the last step of "
                                     "several tokens: a sliding layer's ring cannot give back what they overwrote")
        for layer, sliding in enumerate(self.sliding):
            if sliding and n:
                first, old_k, old_v = self.undo[layer]
                slots = torch.arange(start, end, device=old_k.device) % self.window
                self.k[layer][slots] = old_k[start - first:]
                self.v[layer][slots] = old_v[start - first:]
                self.undo[layer] = (first, old_k[:start - first], old_v[:start - first])  # more may go back later
        self.length = start

    # ---- copying rows out and in (the prefix cache) -----------------------------------------------------------
    def rows(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values of positions start..end-1 of a layer (written already), or None where a sliding
        layer's ring (and what the last step overwrote in it) no longer holds them."""
        if not self.sliding[layer]:
            return self.k[layer][start:end], self.v[layer][start:end]
        ring_start = min(end, max(start, self.length - self.window))  # the ring holds the last `window` positions
        slots = torch.arange(ring_start, end, device=self.k[layer].device) % self.window
        k, v = self.k[layer][slots], self.v[layer][slots]
        if ring_start > start:  # the older rows: only what the last step overwrote in the ring, if it holds them
            if layer not in self.overwritten:
                return None
            first, old_k, old_v = self.overwritten[layer]
            if not first <= start or ring_start > first + old_k.shape[0]:
                return None
            k = torch.cat([old_k[start - first:ring_start - first], k])
            v = torch.cat([old_v[start - first:ring_start - first], v])
        return k, v

    def load_prefix(self, full: list[tuple[torch.Tensor, torch.Tensor]],
                    sliding: list[tuple[torch.Tensor, torch.Tensor]], length: int, first_sliding: int) -> None:
        """Start from a cached prefix of `length` positions: `full` holds each full layer's keys and values for
        all of them, `sliding` each sliding layer's for positions first_sliding..length-1 (the ones later
        queries can still see). Layers are given in order within their kind."""
        assert self.length == 0, "a prefix goes into an empty cache"
        full_layers = [i for i, s in enumerate(self.sliding) if not s]
        sliding_layers = [i for i, s in enumerate(self.sliding) if s]
        for i, (k, v) in zip(full_layers, full, strict=True):
            if length > self.k[i].shape[0]:
                self._grow(i, length)
            self.k[i][:length] = k
            self.v[i][:length] = v
        slots = torch.arange(first_sliding, length) % self.window
        for i, (k, v) in zip(sliding_layers, sliding, strict=True):
            self.k[i][slots.to(self.k[i].device)] = k
            self.v[i][slots.to(self.v[i].device)] = v
        self.length = length
