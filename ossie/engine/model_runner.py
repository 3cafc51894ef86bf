"""`ModelRunner`: owns the model and the KV memory, and turns a batch of sequences into their next tokens.

A step gives each sequence of the batch one forward pass: the next chunk of its prompt (at most
`prefill_chunk` tokens, which bounds activation memory and how long the other sequences wait), or its last
token. A sequence whose prompt is read samples a token from the last position's logits, through its steering.

With a prefix cache, a new sequence starts from the longest cached prefix of its prompt, and every block of
positions it computes is kept as soon as it is complete (prompt and completion alike), so the next request of
a conversation or an agent loop reads only what is new.
"""

from __future__ import annotations

import torch

from ..model.transformer import Transformer
from .kv_cache import KVCache
from .prefix_cache import PrefixCache
from .sampling import sample
from .sequence import Sequence

PREFILL_CHUNK = 512  # prompt tokens per forward pass (the default of ModelRunner's prefill_chunk)
INITIAL_ROOM = 256  # KV positions reserved past the prompt at first; the cache grows by doubling after that


class ModelRunner:
    def __init__(self, model: Transformer, prefill_chunk: int = PREFILL_CHUNK, prefix_cache: PrefixCache | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.prefill_chunk, self.prefix_cache = model, prefill_chunk, prefix_cache
        self.config, self.device = model.cfg, model.device

    # ---- KV memory ------------------------------------------------------------------------------------------
    def new_cache(self, capacity: int = INITIAL_ROOM) -> KVCache:
        return KVCache(self.config, self.model.dtype, self.device, capacity)

    def allocate(self, seq: Sequence) -> None:
        # start from the prompt and a little room, not from max_tokens (which defaults to the rest of a 131k
        # context: gigabytes of KV cache nobody may use); full-attention layers grow as tokens come
        seq.cache = self.new_cache(len(seq.prompt) + min(seq.params.max_tokens, INITIAL_ROOM))
        if self.prefix_cache is not None:
            chain = self.prefix_cache.match(seq.prompt)
            seq.num_prefilled = seq.num_cached_tokens = self.prefix_cache.load(chain, seq.cache)
            seq.block_keys = [block.key for block in chain]
            seq.cache.keep_overwritten = True

    def free(self, seq: Sequence) -> None:
        """Release a sequence's KV cache (finished, cancelled, or abandoned by its consumer)."""
        seq.cache = None

    # ---- steps ------------------------------------------------------------------------------------------------
    def run(self, batch: list[Sequence]) -> list[int | None]:
        """One step of each sequence: its sampled token, or None while its prompt is still being read."""
        return [self._step(seq) for seq in batch]

    def _step(self, seq: Sequence) -> int | None:
        if seq.cache is None:
            self.allocate(seq)
        if seq.prefilling:
            start = seq.num_prefilled
            chunk = seq.prompt[start:start + self.prefill_chunk]
            logits = self._forward(chunk, seq)
            seq.num_prefilled += len(chunk)
            self._keep_blocks(seq)
            if seq.prefilling:
                return None
        else:
            logits = self._forward(seq.output[-1:], seq)
            self._keep_blocks(seq)
        return self.sample(seq, logits)

    def _keep_blocks(self, seq: Sequence) -> None:
        """Put the blocks the last step completed into the prefix cache."""
        if self.prefix_cache is None:
            return
        b, tokens = self.prefix_cache.block_size, None
        while (len(seq.block_keys) + 1) * b <= seq.cache.length:
            i = len(seq.block_keys)
            tokens = tokens or seq.prompt + seq.output  # the tokens at positions 0..cache.length-1
            parent = seq.block_keys[-1] if seq.block_keys else None
            seq.block_keys.append(self.prefix_cache.store(parent, tuple(tokens[i * b:(i + 1) * b]), seq.cache, i * b))
        seq.cache.overwritten.clear()

    def _forward(self, token_ids: list[int], seq: Sequence) -> torch.Tensor:
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.forward(tokens, seq.cache, last_only=True)[-1]

    def sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if seq.steering is not None:
            logits = seq.steering.mask(logits)
        return sample(logits, seq.params, seq.generator)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One forward pass over a whole sequence: float32 logits [len, vocab]."""
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.forward(tokens, self.new_cache(len(token_ids)))
