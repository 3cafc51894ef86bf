"""`Scheduler`: which sequences run in the next step, and how many tokens each computes.

Sequences wait in arrival order; up to `max_running` run at once. A step takes one token of every decoding
sequence first (with the candidates it guessed, if any), then prompt chunks, the shortest rest of a prompt first,
with what is left of `max_tokens` (a per-step budget): a long prompt is read a chunk per step while the others keep
decoding, and a short prompt that arrives meanwhile is read at once, beside it, instead of waiting for all of it.
When KV memory runs out, the sequence admitted last is preempted: it goes back to the front of the queue and
computes its tokens again when it returns (most of them from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_running: int = 16, max_tokens: int = 512, align: int = 1,
                 prefill_while_decoding: int | None = None):
        """align: prompt chunks that stop short of a prompt's end stop at a multiple of it (the prefix cache's
        block size: a block computed in two steps may lose its sliding-window rows in between).
        prefill_while_decoding: the prompt tokens a step computes while some sequence decodes (None: max_tokens);
        smaller steps keep the decoding ones' tokens coming, at some cost to the prompts' throughput."""
        if max_running < 1 or max_tokens < 1:
            raise ValueError(f"max_running and max_tokens must be >= 1, got {max_running} and {max_tokens}")
        if prefill_while_decoding is not None and prefill_while_decoding < 1:
            raise ValueError(f"prefill_while_decoding must be >= 1, got {prefill_while_decoding}")
        self.max_running, self.max_tokens, self.align = max_running, max_tokens, align
        self.prefill_while_decoding = prefill_while_decoding or max_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, fits: Callable[[Sequence], bool] = lambda seq: True) -> list[Sequence]:
        """Move waiting sequences to running, in order, while there is room (`fits` says whether the next one's
        KV memory does, and counts it; the first always gets in when nothing runs). `fits` is asked about that
        first one too: not counting it admitted a second and a third beside it past the budget."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            if not fits(self.waiting[0]) and self.running:
                break
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        """The next step's batch and the tokens each sequence computes in it."""
        decoding = [seq for seq in self.running if seq.pending == 1 or seq.candidates]
        batch, sizes = decoding, [seq.pending for seq in decoding]  # a decoding one's candidates are checked whole
        budget = self.max_tokens - sum(sizes)
        if batch:
            budget = min(budget, self.prefill_while_decoding)
        for seq in sorted(self.running, key=lambda s: s.pending):  # stable: ties in admission order
            if seq.pending > 1 and not seq.candidates and budget > 0:
                n = min(seq.pending, budget)
                if n < seq.pending and self.align > 1:
                    aligned = (seq.num_computed + n) // self.align * self.align - seq.num_computed
                    n = aligned if aligned > 0 else n
                batch.append(seq)
                sizes.append(n)
                budget -= n
        return batch, sizes

    def preempt(self) -> Sequence:
        """Send the sequence admitted last back to the front of the queue."""
        seq = self.running.pop()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out, waiting or running (finished, cancelled or failed)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
