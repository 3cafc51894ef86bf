"""`ModelRunner`: owns the model and the KV memory, and turns a batch of sequences into their next tokens.

A step computes the next tokens of every sequence of the batch in one forward pass, so each weight is read
once for all of them: one token of each decoding sequence, and the next chunk of each prompt being read (at
most `prefill_chunk` tokens, which bounds activation memory and how long the others wait). A sequence whose
tokens are all computed samples the next one from the last position's logits, through its steering.

With a prefix cache, a new sequence starts from the longest cached prefix of its tokens, and every block of
positions it computes is kept as soon as it is complete (prompt and completion alike), so the next request of
a conversation or an agent loop reads only what is new.
"""

from __future__ import annotations

import torch

from ..defaults import PREFILL_CHUNK
from ..model.transformer import Transformer
from .kv_cache import KVCache, kv_bytes_per_row
from .prefix_cache import PrefixCache
from .sampling import sample
from .sequence import Sequence

INITIAL_ROOM = 256  # KV positions reserved past the prompt at first; the cache grows by doubling after that


class ModelRunner:
    """prefill_chunk: the most tokens one step computes for a sequence. prefix_cache: where computed blocks are
    kept and looked up. kv_budget: bytes of KV memory for the running sequences and the cached prefixes together
    (the engine preempts and evicts to stay within it; None: no limit). quantized_kv: KV rows stored as q8
    (kv_cache.py), about half the memory of bf16."""

    def __init__(self, model: Transformer, prefill_chunk: int = PREFILL_CHUNK, prefix_cache: PrefixCache | None = None,
                 kv_budget: int | None = None, quantized_kv: bool = False):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.prefill_chunk, self.prefix_cache = model, prefill_chunk, prefix_cache
        self.kv_budget, self.quantized_kv = kv_budget, quantized_kv
        self.config, self.device = model.cfg, model.device

    # ---- KV memory ------------------------------------------------------------------------------------------
    def new_cache(self, capacity: int = INITIAL_ROOM) -> KVCache:
        return KVCache(self.config, self.model.dtype, self.device, capacity, self.quantized_kv)

    def _capacity(self, seq: Sequence) -> int:
        # its tokens and a little room, not max_tokens (which defaults to the rest of a 131k context: gigabytes of
        # KV cache nobody may use); full-attention layers grow as tokens come
        return seq.num_tokens + min(seq.params.max_tokens - len(seq.output), INITIAL_ROOM)

    def cache_bytes(self, seq: Sequence) -> int:
        """The KV memory `allocate` would give a sequence now."""
        cfg = self.config
        row = kv_bytes_per_row(cfg, self.model.dtype, self.quantized_kv)
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

    # ---- steps ------------------------------------------------------------------------------------------------
    def run(self, batch: list[Sequence], sizes: list[int] | None = None) -> list[int | list[int] | None]:
        """One step: sizes[b] more tokens of each sequence b (default: the rest, up to prefill_chunk) in one forward
        pass. Returns each sequence's sampled token, or None while it has tokens left to compute; for a sequence
        with candidates, the token sampled at each of the k+1 positions (after its last token, then after each
        candidate), for the caller to check against them (see Sequence.accept and `rollback`)."""
        for seq in batch:
            if seq.cache is None:
                self.allocate(seq)
        if sizes is None:
            sizes = [min(seq.pending, self.prefill_chunk) for seq in batch]
        ids = [t for seq, n in zip(batch, sizes, strict=True)
               for t in seq.tokens(seq.num_computed, seq.num_computed + n)]
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        checked = [len(seq.candidates) + 1 if seq.candidates and n == seq.pending else 1
                   for seq, n in zip(batch, sizes, strict=True)]  # the rows each sequence samples from
        rows = None
        if any(c > 1 for c in checked):
            ends = torch.tensor(sizes).cumsum(0).tolist()
            rows = [r for end, c in zip(ends, checked, strict=True) for r in range(end - c, end)]
        logits = self.model.forward_batch(tokens, [seq.cache for seq in batch], sizes, rows=rows)
        out: list[int | list[int] | None] = []
        # sampling under the backend's threads too: on the CPU, torch's own workers would otherwise spin after the
        # argmax over the vocabulary, on the cores the next step's kernels need
        with self.model.ops.running():
            row = 0
            for seq, n, c in zip(batch, sizes, checked, strict=True):
                seq.num_computed += n
                self._keep_blocks(seq)
                if seq.pending:
                    out.append(None)
                elif c > 1:
                    out.append([self.sample(seq, logits[r]) for r in range(row, row + c)])
                else:
                    out.append(self.sample(seq, logits[row]))
                row += c
        return out

    def rollback(self, seq: Sequence, n: int) -> None:
        """Take back the last n computed positions of a sequence (candidates its last step computed and the caller
        did not keep): its KV cache and what it has computed become what they were without them."""
        if not 0 <= n <= seq.num_computed:
            raise ValueError(f"cannot take back {n} of the {seq.num_computed} positions sequence {seq.id} computed")
        seq.cache.truncate(n)
        seq.num_computed -= n
        if self.prefix_cache is not None:  # its blocks past the new end hold tokens it no longer has
            del seq.block_keys[seq.num_computed // self.prefix_cache.block_size:]

    def _keep_blocks(self, seq: Sequence) -> None:
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

    def sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if seq.params.temperature == 0 and seq.steering is None:
            # on the device: one integer crosses to the host rather than 201,088 logits (a GPU step's 0.8 MB)
            return int(torch.argmax(logits))
        logits = logits.float().cpu()
        if seq.steering is not None:
            logits = seq.steering.mask(logits)
        return sample(logits, seq.params, seq.generator)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One forward pass over a whole sequence: float32 logits [len, vocab]."""
        tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model.forward(tokens, self.new_cache(len(token_ids)))
