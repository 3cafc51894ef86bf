"""Automatic prefix caching: the KV of tokens already computed, kept in blocks after their request ends.

A block is `BLOCK_SIZE` consecutive positions of one token sequence, keyed by a hash chained over every token
before it (as vLLM and nano-vllm key theirs), so equal prefixes share blocks. A new request reuses the longest
run of cached blocks that starts its prompt, copied into its own KV cache, and computes only the rest.

gpt-oss's sliding-window layers are why a block holds two things: every layer's keys and values for the block's
positions (full-attention layers need all of a prefix; sliding layers only its last window). A prefix of P
positions can be resumed when its blocks hold the full layers' rows and, for the blocks covering the last
window - 1 positions, the sliding layers' rows too (vLLM's hybrid allocator asks the same of its sliding group).
Sliding rows are kept for every block, not as snapshots at a few points (llama.cpp's SWA checkpoints), so that
any block boundary is a resume point: an agent or a client that edits its history may diverge anywhere.

Blocks are private to their owner (`CacheScope`): a block's key chains in the owner, so a request finds only its
own owner's blocks, and a server gives each API principal its own. A shared cache tells one client what another
sent: a guessed prompt comes back with cached_tokens and a fast first token (vLLM's CVE-2025-46570). Only the
prompt's first `shared` tokens, declared public by the operator (a common system prompt), are cached for everyone.

Memory is bounded by a budget in bytes. When it is exceeded, the least recently used block that no other
cached block extends is dropped (dropping a block another extends would strand the longer prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.config import ModelConfig
from .kv_cache import KVCache

BLOCK_SIZE = 64  # positions per block: fine enough to reuse most of a prefix, coarse enough to copy quickly


@dataclass(frozen=True)
class CacheScope:
    """Who may reuse the blocks a sequence computes, and whose it may reuse."""

    owner: str | None = None  # None: everyone's (a library's single user, a server without API keys)
    shared: int = 0  # the first tokens declared public: their whole blocks are everyone's, whatever the owner

    def owner_of(self, index: int, block_size: int) -> str | None:
        """The owner of the sequence's block `index`."""
        return None if (index + 1) * block_size <= self.shared else self.owner


EVERYONE = CacheScope()


@dataclass(eq=False)
class Block:
    key: int
    owner: str | None  # who may reuse it (CacheScope.owner; None: everyone)
    parent: int | None  # the key of the block before it (None: the first block)
    tokens: tuple[int, ...]
    full: list[tuple[torch.Tensor, torch.Tensor]]  # per full-attention layer: keys, values [BLOCK_SIZE, kv, d]
    sliding: list[tuple[torch.Tensor, torch.Tensor]] | None  # the same per sliding layer, None if not captured
    children: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = _nbytes(self.full) + (_nbytes(self.sliding) if self.sliding else 0)


def _nbytes(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair)


def block_key(owner: str | None, parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((owner, parent, tokens))


def chained_keys(prompt: list[int], scope: CacheScope, block_size: int, blocks: int
                 ) -> Iterator[tuple[int, str | None, int | None, tuple[int, ...]]]:
    """The prompt's first `blocks` whole blocks as the cache keys them, in order: (key, owner, parent, tokens), each
    key chained over the block before it (parent) and its owner (the lookup here, and ossie.replicas' router)."""
    parent = None
    for i in range(blocks):
        tokens, owner = tuple(prompt[i * block_size:(i + 1) * block_size]), scope.owner_of(i, block_size)
        key = block_key(owner, parent, tokens)
        yield key, owner, parent, tokens
        parent = key


@dataclass
class PrefixCacheStats:
    blocks: int = 0
    bytes: int = 0
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, the ones served from the cache


class PrefixCache:
    def __init__(self, cfg: ModelConfig, budget_bytes: int, block_size: int = BLOCK_SIZE):
        self.budget, self.block_size, self.window = budget_bytes, block_size, cfg.sliding_window
        self.full_layers = [i for i in range(cfg.num_layers) if not cfg.is_sliding(i)]
        self.sliding_layers = [i for i in range(cfg.num_layers) if cfg.is_sliding(i)]
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.stats = PrefixCacheStats()

    # ---- lookup ------------------------------------------------------------------------------------------------
    def match(self, prompt: list[int], scope: CacheScope = EVERYONE) -> list[Block]:
        """The blocks of the longest cached prefix of `prompt` that can be resumed, leaving at least one prompt
        token to compute (its logits give the first new token), among those `scope` may reuse."""
        b = self.block_size
        chain: list[Block] = []
        for key, owner, parent, tokens in chained_keys(prompt, scope, b, (len(prompt) - 1) // b):
            block = self.blocks.get(key)
            if block is None or (block.owner, block.parent, block.tokens) != (owner, parent, tokens):  # a collision
                break
            chain.append(block)
        while chain and not self._resumable(chain):
            chain.pop()
        for block in reversed(chain):  # the first block most recent: chains are dropped from their ends
            self.blocks.move_to_end(block.key)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += len(chain) * b
        return chain

    def _resumable(self, chain: list[Block]) -> bool:
        """Whether the sliding layers' rows of the positions the next query sees (the last window - 1) are kept."""
        first_needed = max(0, len(chain) * self.block_size - (self.window - 1)) // self.block_size
        return all(block.sliding is not None for block in chain[first_needed:])

    def load(self, chain: list[Block], cache: KVCache) -> int:
        """Copy a matched prefix into an empty cache; returns its length in positions."""
        length = len(chain) * self.block_size
        if not chain:
            return 0
        full = [(torch.cat([blk.full[j][0] for blk in chain]), torch.cat([blk.full[j][1] for blk in chain]))
                for j in range(len(self.full_layers))]
        first_sliding = max(0, length - (self.window - 1))
        tail = chain[first_sliding // self.block_size:]
        skip = first_sliding - (first_sliding // self.block_size) * self.block_size
        sliding = [(torch.cat([blk.sliding[j][0] for blk in tail])[skip:],
                    torch.cat([blk.sliding[j][1] for blk in tail])[skip:]) for j in range(len(self.sliding_layers))]
        cache.load_prefix(full, sliding, length, first_sliding)
        return length

    # ---- storing -----------------------------------------------------------------------------------------------
    def store(self, parent: int | None, tokens: tuple[int, ...], cache: KVCache, start: int,
              owner: str | None = None) -> int:
        """Keep the block of `tokens` at positions start.. (after the block keyed `parent`) from a sequence's cache,
        for `owner`; returns its key. A block already kept is only marked as used (and given sliding rows if it
        lacked them). Nothing is kept after a parent that is no longer cached (the block could never be matched)."""
        key = block_key(owner, parent, tokens)
        if parent is not None and parent not in self.blocks:
            return key
        block = self.blocks.get(key)
        if block is not None and (block.owner, block.parent, block.tokens) != (owner, parent, tokens):
            return key  # a hash collision: keep the block there, cache nothing for this one
        end = start + self.block_size
        sliding = [cache.rows(i, start, end) for i in self.sliding_layers]
        sliding = None if any(r is None for r in sliding) else [(k.clone(), v.clone()) for k, v in sliding]
        if block is not None:
            if block.sliding is None and sliding is not None:
                block.sliding = sliding
                self.stats.bytes += _nbytes(sliding)
                block.nbytes += _nbytes(sliding)
            self.blocks.move_to_end(key)
        else:
            full = [tuple(t.clone() for t in cache.rows(i, start, end)) for i in self.full_layers]
            block = Block(key, owner, parent, tokens, full, sliding)
            self.blocks[key] = block
            if parent is not None:
                self.blocks[parent].children += 1
            self.stats.blocks += 1
            self.stats.bytes += block.nbytes
        self.evict(self.budget)
        return key

    # ---- memory ------------------------------------------------------------------------------------------------
    def evict(self, max_bytes: int) -> None:
        """Drop least recently used blocks that no other block extends until at most max_bytes are kept."""
        while self.stats.bytes > max_bytes and self.blocks:
            victim = next((b for b in self.blocks.values() if b.children == 0), None)
            if victim is None:  # cannot happen: the newest block of any chain extends none
                break
            self._drop(victim)

    def _drop(self, block: Block) -> None:
        del self.blocks[block.key]
        if block.parent in self.blocks:
            self.blocks[block.parent].children -= 1
        self.stats.blocks -= 1
        self.stats.bytes -= block.nbytes

    def clear(self) -> None:
        self.blocks.clear()
        self.stats.blocks = self.stats.bytes = 0
