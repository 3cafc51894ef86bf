"""Speculative decoding: tokens guessed from a request's own text, checked in one step.

A decoding sequence guesses what follows by prompt lookup: the last n tokens (n from NGRAM_MAX down to NGRAM_MIN)
found earlier in its own prompt and output, and the tokens that followed them there (`NgramDraft`: an index of the
n-grams it has seen, one per sequence, so nothing one request sends reaches another's drafts). The next step
computes its last token and k guessed ones; each of the k+1 rows gets the logits the one-token step at its position
would get (bit for bit with the CPU's bf16 kernels: Transformer.forward_batch's `checking`), so for a greedy
request the tokens kept, the guesses equal to what was sampled before each and then the token sampled after the
last of them, are the tokens it decodes one at a time. A step reads each weight once for all its rows, so kept
guesses come almost for free, and a sequence guesses only where its text repeats itself (tool-call arguments,
code being edited, an answer quoting its sources), where guesses pay for the larger step (`Speculator`).

A sampled request guesses too: its guesses are kept by speculative sampling's rule (sampling.check_guesses), so
each token has the distribution of sampling one token a step, and a seed gives the same tokens run to run (not
those of decoding without guesses: the draws differ). A steered request (tool_choice, response_format) guesses
as well: each checked row is masked as its steering would mask it once the guesses before it were kept
(ModelRunner's steered_rows), so a guess the steering forbids is never kept. A step's guessed rows stay within
the rows the backend computes each as alone (`Backend.decoding_rows`), counting one for every decoding sequence,
so that guessing never changes a token.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from ..defaults import NUM_SPECULATIVE_TOKENS
from .sequence import Sequence

NGRAM_MAX, NGRAM_MIN = 4, 2  # the longest suffix looked up first; 1-token matches guess too wildly to pay


class DraftSource(Protocol):
    """What guesses one sequence's next tokens, one source per sequence (nothing one request sends reaches another's
    guesses). `extend` is told each of the sequence's tokens once, in order: its prompt, then the tokens it keeps;
    `propose(k)` returns up to k tokens guessed to follow them ([] for none). Prompt lookup (`NgramDraft`) is one. A
    draft model would be another (gpt-oss-20b drafting for the 120b, whose tokenizer it shares; an EAGLE-style head):
    its KV cache for the sequence grown in `extend`, k greedy tokens decoded in `propose`; the checking, the costs
    and the choice of k stay the Speculator's."""

    def extend(self, tokens: Seq[int]) -> None: ...

    def propose(self, k: int) -> list[int]: ...


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


# Whether guessing pays: a step that checks k guesses costs more than a one-token step (k more rows of attention,
# and more experts read: k + 1 tokens choose more of them), and gains the guesses kept. Until this machine's steps
# have been timed, a guessed row is taken to cost PRIOR_ROW_COST one-token steps (the synthetic 20b on 2 AVX2 cores:
# 0.51 for one guess, 0.45 a guess for 4, random routing reading 15 of 32 experts a layer for 5 rows: an upper
# bound for real routing); a sequence's guesses are taken to be kept with probability PRIOR_KEPT each, until its
# own are counted.
PRIOR_ROW_COST = 0.5
PRIOR_KEPT = 0.6
FORGET = 0.9  # the weight of what was counted before, at each new count (a text's repetitiveness changes)
# ... and at each step a sequence does not guess: its misses fade slowly enough that a text whose guesses all miss
# tries one again only every ~25 steps (at most ~2 % of its time, with a missed guess costing half a step)
FADE = 0.98


@dataclass
class Guessing:
    """One sequence's guessing: its draft source and the tokens told to it, and its guesses kept and missed (counts
    that fade)"""
    draft: DraftSource = field(default_factory=NgramDraft)
    told: int = 0
    kept: float = 0.0
    missed: float = 0.0

    def chance(self) -> float:
        """The chance that a guess is kept, given that the one before it was (prior PRIOR_KEPT, worth 2 counts)"""
        return (self.kept + 2 * PRIOR_KEPT) / (self.kept + self.missed + 2)


class Speculator:
    """The engine's guessing, per step: `propose` before the scheduler picks the batch, `settle` for each
    sequence whose candidates a step checked, `observe` for each step's time. k: guesses a step checks at most for
    one sequence; rows: the rows a step may give decoding sequences (one each, and their guesses). A sequence
    guesses as many tokens as maximize its expected tokens per second: with p the chance of each guess being kept,
    (1 + p + p^2 + ... + p^k) / (cost of a step of 1 + k rows / cost of a one-token step), the costs as this
    machine's steps of one sequence took (or PRIOR_ROW_COST a row until timed). A sequence whose guesses are
    missed stops guessing (k = 0); its counts fade, and it tries again later. draft: each sequence's DraftSource,
    made when it first decodes (default: prompt lookup)."""

    def __init__(self, k: int = NUM_SPECULATIVE_TOKENS, rows: int = 8,
                 draft: Callable[[Sequence], DraftSource] | None = None):
        if k < 1 or rows < 1:
            raise ValueError(f"the guesses a step checks and its rows must be >= 1, got {k} and {rows}")
        self.k, self.rows = k, rows
        self.draft = draft or (lambda seq: NgramDraft())
        self.guessing: dict[int, Guessing] = {}
        self.step_s: dict[int, float] = {}  # rows -> seconds a step of one sequence took (a moving average)

    def observe(self, rows: int, seconds: float) -> None:
        """A step of one decoding sequence computed `rows` rows (1, or 1 + its guesses) in `seconds`."""
        before = self.step_s.get(rows)
        self.step_s[rows] = seconds if before is None else FORGET * before + (1 - FORGET) * seconds

    def cost(self, rows: int) -> float:
        """A step of `rows` rows over a one-token step: as timed, else as PRIOR_ROW_COST says."""
        if rows in self.step_s and 1 in self.step_s:
            return self.step_s[rows] / self.step_s[1]
        return 1 + PRIOR_ROW_COST * (rows - 1)

    def length(self, p: float, most: int) -> int:
        """The guesses (0..most) that maximize the expected tokens per second at chance p"""
        best, best_rate, expected = 0, 1.0, 1.0
        for k in range(1, most + 1):
            expected += p ** k
            rate = expected / self.cost(1 + k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def propose(self, running: list[Sequence]) -> None:
        decoding = [seq for seq in running if seq.pending == 1 and not seq.finished]
        room = self.rows - len(decoding)  # rows beyond one per decoding sequence
        for seq in decoding:
            if room <= 0:
                return
            g = self.guessing.get(seq.id)
            if g is None:
                g = self.guessing[seq.id] = Guessing(self.draft(seq))
            new = seq.prompt[g.told:] + seq.output[max(0, g.told - len(seq.prompt)):]
            g.draft.extend(new)
            g.told += len(new)
            left = seq.params.max_tokens - len(seq.output) - 1  # the step samples one token after the guesses
            k = self.length(g.chance(), min(self.k, room, left))
            if k == 0:  # not worth it now: what was counted fades, so that it tries again later
                g.kept, g.missed = FADE * g.kept, FADE * g.missed
                continue
            guess = g.draft.propose(k)
            if guess:
                seq.propose(guess)
                room -= len(guess)

    def settle(self, seq: Sequence, samples: list[int],
               take_back: Callable[[Sequence, int], None]) -> tuple[list[int], int]:
        """Keep the guesses equal to what was sampled before each, then the token sampled after the last kept
        (samples: ModelRunner.run's for a checked sequence, greedy or sampled alike);
        take_back(seq, n) gives back the positions of the others. Returns the tokens the sequence gained (cut at a
        stop token or max_tokens) and how many guesses it kept."""
        guesses = seq.candidates
        n = 0
        while n < len(guesses) and samples[n] == guesses[n]:
            n += 1
        take_back(seq, len(guesses) - n)
        g = self.guessing.get(seq.id)
        if g is not None:
            g.kept, g.missed = FORGET * g.kept + n, FORGET * g.missed + (n < len(guesses))
        before = len(seq.output)
        seq.accept(guesses[:n] + [samples[n]])
        return seq.output[before:], n

    def forget(self, seq: Sequence) -> None:
        self.guessing.pop(seq.id, None)
