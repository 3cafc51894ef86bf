"""`ModelRunner`: owns the model, and turns a batch of sequences into their next tokens (their KV memory is its
KVManager's).

A step computes the next tokens of every sequence of the batch in one forward pass, so each weight is read
once for all of them: one token of each decoding sequence, and the next chunk of each prompt being read (at
most `prefill_chunk` tokens, which bounds activation memory and how long the others wait). A sequence whose
tokens are all computed samples the next one from the last position's logits, through its steering.

With a prefix cache, a new sequence starts from the longest cached prefix of its tokens, and every block of
positions it computes is kept as soon as it is complete (prompt and completion alike), so the next request of
a conversation or an agent loop reads only what is new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..defaults import PREFILL_CHUNK
from ..model.transformer import Transformer
from .kv_manager import KVManager
from .prefix_cache import PrefixCache
from .sampling import check_guesses, sample
from .sequence import Sequence

if TYPE_CHECKING:
    from ..chat.constraints import Steering


class ModelRunner:
    """prefill_chunk: the most tokens one step computes for a sequence. The KV memory is `kv`'s (kv_manager.py), made
    from prefix_cache (where computed blocks are kept and looked up), kv_budget (bytes for the running sequences and
    the cached prefixes together; None: no limit) and quantized_kv (rows stored as q8, about half of bf16)."""

    def __init__(self, model: Transformer, prefill_chunk: int = PREFILL_CHUNK, prefix_cache: PrefixCache | None = None,
                 kv_budget: int | None = None, quantized_kv: bool = False):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.prefill_chunk = model, prefill_chunk
        self.config, self.device = model.cfg, model.device
        self.kv = KVManager(model.cfg, model.dtype, model.device, kv_budget, prefix_cache, quantized_kv)

    # ---- steps ------------------------------------------------------------------------------------------------
    def run(self, batch: list[Sequence], sizes: list[int] | None = None) -> list[int | list[int] | None]:
        """One step: sizes[b] more tokens of each sequence b (default: the rest, up to prefill_chunk) in one forward
        pass. Returns each sequence's sampled token, or None while it has tokens left to compute; for a sequence
        with candidates, greedy: the token sampled at each of the k+1 positions (after its last token, then after
        each candidate), for the caller to check against them (see Sequence.accept and KVManager.rollback);
        sampled: the candidates speculative sampling keeps, then the token it draws (sampling.check_guesses), which
        the same check reads alike."""
        for seq in batch:
            if seq.cache is None:
                self.kv.allocate(seq)
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
        checking = [b for b, c in enumerate(checked) if c > 1]  # each row as its one-token step would compute it
        logits = self.model.forward_batch(tokens, [seq.cache for seq in batch], sizes, rows=rows, checking=checking)
        hold_stops(logits, batch, checked)
        out: list[int | list[int] | None] = []
        # sampling under the backend's threads too: on the CPU, torch's own workers would otherwise spin after the
        # argmax over the vocabulary, on the cores the next step's kernels need
        with self.model.ops.running():
            row = 0
            for seq, n, c in zip(batch, sizes, checked, strict=True):
                seq.num_computed += n
                self.kv.keep_blocks(seq)
                if seq.pending:
                    out.append(None)
                elif c > 1 and seq.steering is not None:  # the rows masked as they come: see steered_rows
                    checks = steered_rows(seq.steering, logits[row:row + c].float().cpu(), seq.candidates)
                    out.append([int(torch.argmax(r)) for r in checks] if seq.params.temperature == 0
                               else check_guesses(checks, seq.candidates, seq.params, seq.generator))
                elif c > 1 and seq.params.temperature == 0:  # each row's argmax, for the caller to compare
                    out.append([self.sample(seq, logits[r]) for r in range(row, row + c)])
                elif c > 1:  # sampled: the guesses kept by speculative sampling's rule, then the token drawn
                    out.append(check_guesses(logits[row:row + c].float().cpu(), seq.candidates, seq.params,
                                             seq.generator))
                else:
                    out.append(self.sample(seq, logits[row]))
                row += c
        return out

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
        return self.model.forward(tokens, self.kv.new_cache(len(token_ids)))


def hold_stops(logits: torch.Tensor, batch: list[Sequence], checked: list[int]) -> None:
    """min_tokens: no stop token in the rows a sequence samples from before its output reaches min_tokens (row i of
    a checked sequence gives its output's token len(output) + i; a row no token is sampled from, one inside a prompt,
    may be held too). In place: the rows are this step's own."""
    row = 0
    for seq, c in zip(batch, checked, strict=True):
        held = min(c, seq.params.min_tokens - len(seq.output))
        if held > 0 and seq.stop_ids:
            stops = torch.tensor(sorted(seq.stop_ids), dtype=torch.long, device=logits.device)
            with torch.inference_mode():  # the forward pass made the logits there
                logits[row:row + held].index_fill_(1, stops, float("-inf"))
        row += c


def steered_rows(steering: Steering, rows: torch.Tensor, guesses: list[int]) -> torch.Tensor:
    """A steered sequence's checked rows [k + 1, vocab], each masked as its steering would mask it once the guesses
    before it were taken: the mask of row i depends on guesses 0..i-1 being kept, and a row is only read if they
    were. So a copy of the steering advances through the guesses; from the first guess it forbids on, the rows are
    left as they are, never read (that guess is refused: its probability under the mask is 0)."""
    steering = steering.copy()
    out = rows.clone()
    for i in range(rows.shape[0]):
        out[i] = steering.mask(rows[i])
        if i == len(guesses) or out[i, guesses[i]] == float("-inf"):
            break
        steering.advance(guesses[i])
    return out
