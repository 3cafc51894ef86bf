"""`KVManager`: the one owner of KV memory. Every byte of it is here: the running sequences' caches (which it gives
out, grows the room of and frees), the prefix cache's blocks (kept as a sequence's blocks complete, looked up when
one starts, dropped from a sequence that takes positions back), and the budget they share, with its policy:

- a waiting sequence is admitted while its first cache fits beside the running ones' (the first always gets in
  when nothing runs: it must progress, even alone over the budget);
- when the running caches outgrow the budget, the sequence admitted last is preempted (the scheduler sends it
  back to the front of the queue; its cache is freed), never the only one running;
- cached blocks fill what the running caches leave, least recently used dropped first.

The engine asks it; the runner has it allocate and keep blocks; the model and the backends only see each
sequence's `KVCache` (update, decode_slot, advance, truncate) and write through it. It was spread over the runner,
the engine and the prefix cache, and no one place said how much memory was held or why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.config import ModelConfig
from .kv_cache import KVCache, kv_bytes_per_row
from .prefix_cache import PrefixCache
from .sequence import Sequence

INITIAL_ROOM = 256  # KV positions reserved past the prompt at first; the cache grows by doubling after that


class KVManager:
    """budget: bytes for the running caches and the cached blocks together (None: no limit). prefix_cache: where
    computed blocks are kept and looked up (None: none). quantized: rows stored as q8 (kv_cache.py)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 budget: int | None = None, prefix_cache: PrefixCache | None = None, quantized: bool = False):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.budget, self.prefix_cache, self.quantized = budget, prefix_cache, quantized

    # ---- the running sequences' caches ------------------------------------------------------------------------
    def new_cache(self, capacity: int = INITIAL_ROOM) -> KVCache:
        return KVCache(self.cfg, self.dtype, self.device, capacity, self.quantized)

    def _capacity(self, seq: Sequence) -> int:
        # its tokens and a little room, not max_tokens (which defaults to the rest of a 131k context: gigabytes of
        # KV cache nobody may use); full-attention layers grow as tokens come
        return seq.num_tokens + min(seq.params.max_tokens - len(seq.output), INITIAL_ROOM)

    def cache_bytes(self, seq: Sequence) -> int:
        """The KV memory `allocate` would give a sequence now."""
        cfg = self.cfg
        row = kv_bytes_per_row(cfg, self.dtype, self.quantized)
        return row * sum(cfg.sliding_window if cfg.is_sliding(i) else self._capacity(seq)
                         for i in range(cfg.num_layers))

    def running_bytes(self, seqs: list[Sequence]) -> int:
        return sum(seq.cache.nbytes() for seq in seqs if seq.cache is not None)

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence its KV cache, starting from the longest cached prefix of its tokens."""
        seq.cache = self.new_cache(self._capacity(seq))
        seq.num_computed, seq.block_keys = 0, []
        if self.prefix_cache is not None:
            chain = self.prefix_cache.match(seq.tokens(0, seq.num_tokens), seq.scope)
            seq.num_computed = self.prefix_cache.load(chain, seq.cache)
            if not seq.output:
                seq.num_cached_tokens = seq.num_computed
            seq.block_keys = [block.key for block in chain]
            seq.cache.keep_overwritten = True

    def free(self, seq: Sequence) -> None:
        """Release a sequence's KV cache (finished, cancelled, preempted, or abandoned by its consumer)."""
        seq.cache = None

    def keep_blocks(self, seq: Sequence) -> None:
        """Put the blocks the last step completed into the prefix cache."""
        if self.prefix_cache is None:
            return
        b = self.prefix_cache.block_size
        while (len(seq.block_keys) + 1) * b <= seq.cache.length:
            i = len(seq.block_keys)
            parent = seq.block_keys[-1] if seq.block_keys else None
            block = tuple(seq.tokens(i * b, (i + 1) * b))
            seq.block_keys.append(self.prefix_cache.store(parent, block, seq.cache, i * b, seq.scope.owner_of(i, b)))
        seq.cache.overwritten.clear()

    def rollback(self, seq: Sequence, n: int) -> None:
        """Take back the last n computed positions of a sequence: its cache and what it has computed become what
        they were without them (its blocks past the new end hold tokens it no longer has)."""
        if not 0 <= n <= seq.num_computed:
            raise ValueError(f"cannot take back {n} of the {seq.num_computed} positions sequence {seq.id} computed")
        seq.cache.truncate(n)
        seq.num_computed -= n
        if self.prefix_cache is not None:
            del seq.block_keys[seq.num_computed // self.prefix_cache.block_size:]

    # ---- the budget ---------------------------------------------------------------------------------------------
    def admission(self, running: list[Sequence]) -> Callable[[Sequence], bool]:
        """For the scheduler: whether the next waiting sequence's first cache fits beside the running ones' (and
        those admitted before it in this round, which it counts)."""
        used = self.running_bytes(running)

        def fits(seq: Sequence) -> bool:
            nonlocal used
            need = self.cache_bytes(seq)
            if self.budget is not None and used + need > self.budget:
                return False
            used += need
            return True

        return fits

    def over_budget(self, running: list[Sequence]) -> bool:
        """The running caches hold more than the budget: one of them must go (while more than one runs)."""
        return self.budget is not None and self.running_bytes(running) > self.budget

    def evict(self, running: list[Sequence]) -> None:
        """Drop cached blocks until they fit in what the running caches leave of the budget."""
        if self.budget is not None and self.prefix_cache is not None:
            self.prefix_cache.evict(max(0, self.budget - self.running_bytes(running)))

    def usage(self, running: list[Sequence]) -> tuple[int, int, int]:
        """(bytes of the running caches, bytes and count of the cached blocks)."""
        cached = self.prefix_cache.stats if self.prefix_cache is not None else None
        return self.running_bytes(running), cached.bytes if cached else 0, cached.blocks if cached else 0
