"""Speculative decoding's first part: tokens guessed from a request's own text, checked in one step.

A decoding sequence guesses what follows by prompt lookup: the last n tokens (n from NGRAM_MAX down to NGRAM_MIN)
found earlier in its own prompt and output, and the tokens that followed them there (`NgramDraft`: an index of the
n-grams it has seen, one per sequence, so nothing one request sends reaches another's drafts). The next step
computes its last token and k guessed ones; each of the k+1 rows gets the logits the one-token step at its position
would get (bit for bit with the CPU's bf16 kernels: Transformer.forward_batch's `checking`), so for a greedy
request the tokens kept, the guesses equal to what was sampled before each and then the token sampled after the
last of them, are the tokens it decodes one at a time. A step reads each weight once for all its rows, so kept
guesses come almost for free, and a sequence guesses only where its text repeats itself (tool-call arguments,
code being edited, an answer quoting its sources).

Only greedy requests without steering guess for now (a sampled one would need speculative sampling to keep its
distribution; a steered one's mask depends on which guesses are kept); the others decode a token a step beside
them. A step's guessed rows stay within the rows the backend computes each as alone (`Backend.decoding_rows`),
counting one for every decoding sequence, so that guessing never changes a token.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from .sequence import Sequence

NGRAM_MAX, NGRAM_MIN = 4, 2  # the longest suffix looked up first; 1-token matches guess too wildly to pay
NUM_SPECULATIVE_TOKENS = 4  # guesses a step checks at most for one sequence


class NgramDraft:
    """Prompt lookup over one sequence's tokens: each n-gram (NGRAM_MIN..NGRAM_MAX tokens) that has a known next
    token maps to where that next token lies, the latest occurrence winning; a guess is what follows the latest
    earlier occurrence of the longest suffix found. O(NGRAM_MAX) a token to keep, O(NGRAM_MAX) a guess, whatever
    the context's length."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Seq[int]) -> None:
        for tok in tokens:
            self.tokens.append(tok)
            end = len(self.tokens) - 1  # the n-grams ending just before this token now have a known next token
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.after[tuple(self.tokens[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to k tokens guessed to follow; none where no suffix of NGRAM_MIN or more tokens was seen before."""
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(self.tokens) >= n:
                start = self.after.get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start:start + k]
        return []


class Speculator:
    """The engine's guessing, per step: `propose` before the scheduler picks the batch, `settle` for each
    sequence whose candidates a step checked. k: guesses a step checks at most for one sequence; rows: the rows a
    step may give decoding sequences (one each, and their guesses)."""

    def __init__(self, k: int = NUM_SPECULATIVE_TOKENS, rows: int = 8):
        if k < 1 or rows < 1:
            raise ValueError(f"the guesses a step checks and its rows must be >= 1, got {k} and {rows}")
        self.k, self.rows = k, rows
        self.drafts: dict[int, NgramDraft] = {}

    def propose(self, running: list[Sequence]) -> None:
        decoding = [seq for seq in running if seq.pending == 1 and not seq.finished]
        room = self.rows - len(decoding)  # rows beyond one per decoding sequence
        for seq in decoding:
            if room <= 0:
                return
            if seq.params.temperature != 0 or seq.steering is not None:
                continue
            draft = self.drafts.get(seq.id)
            if draft is None:
                draft = self.drafts[seq.id] = NgramDraft()
            seen = len(draft.tokens)
            draft.extend(seq.prompt[seen:] + seq.output[max(0, seen - len(seq.prompt)):])
            left = seq.params.max_tokens - len(seq.output) - 1  # the step samples one token after the guesses
            guess = draft.propose(min(self.k, room, left))
            if guess:
                seq.propose(guess)
                room -= len(guess)

    def settle(self, seq: Sequence, samples: list[int],
               take_back: Callable[[Sequence, int], None]) -> tuple[list[int], int]:
        """Keep the guesses equal to what was sampled before each, then the token sampled after the last kept;
        take_back(seq, n) gives back the positions of the others. Returns the tokens the sequence gained (cut at a
        stop token or max_tokens) and how many guesses it kept."""
        guesses = seq.candidates
        n = 0
        while n < len(guesses) and samples[n] == guesses[n]:
            n += 1
        take_back(seq, len(guesses) - n)
        before = len(seq.output)
        seq.accept(guesses[:n] + [samples[n]])
        return seq.output[before:], n

    def forget(self, seq: Sequence) -> None:
        self.drafts.pop(seq.id, None)
