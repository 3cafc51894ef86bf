"""`Scheduler`: which sequences run in the next step.

Sequences wait in arrival order; up to `max_running` run at once, and every running sequence advances one
step per round (a prompt chunk or a token), so a new request starts at the next step instead of waiting for
the others to finish.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_running: int = 16):
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(the sequences admitted now, the batch of the next step: every running sequence)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted, list(self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out, waiting or running (finished, cancelled or failed)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
