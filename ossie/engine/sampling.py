"""Sampling parameters (vLLM's names) and the sampler: temperature, then top-k, top-p and min-p filters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..special_tokens import STOP_TOKEN_IDS


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None = the harmony stop tokens; [] = never stop early
    min_tokens: int = 0  # vLLM's: no stop token is sampled before this many tokens

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}")

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(STOP_TOKEN_IDS if self.stop_token_ids is None else self.stop_token_ids)


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampling distribution of float logits [vocab] (params.temperature > 0) after temperature, top-k, min-p
    and top-p: (token ids, their probabilities), ids None for every token in order. Not renormalized: multinomial
    takes weights."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        # The nucleus is nearly always among a few hundred tokens: rank the most likely ones (topk), not all 201k
        # (a full sort costs ~20 ms a token), widening the search until they cover top_p.
        k = min(probs.numel(), 1024)
        while True:
            ranked, order = torch.topk(probs, k)  # descending
            covered = torch.cumsum(ranked, 0)
            if covered[-1] >= params.top_p or k == probs.numel():
                break
            k = min(probs.numel(), k * 8)
        # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
        keep = (covered - ranked) < params.top_p
        return order[keep], ranked[keep]
    return None, probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from float logits [vocab]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    ids, weights = candidates(logits, params)
    pick = int(torch.multinomial(weights, 1, generator=generator))
    return pick if ids is None else int(ids[pick])


def check_guesses(rows: torch.Tensor, guesses: list[int], params: SamplingParams,
                  generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling for guesses that come with no probabilities of their own (prompt lookup: each guess is
    certain to its guesser). rows: the logits [k + 1, vocab] after the last token and after each guess. Guess i is
    kept with the probability p_i(guess) that the model gives it there; the first one not kept is replaced by a
    token drawn from p_i without it (renormalized), and the rest are dropped; if all are kept, a token is drawn
    from the last row. Each token so produced has the model's distribution given those before it: the same
    distribution as sampling one token a step (Leviathan et al.'s rule, the draft's distribution one-hot). With
    temperature 0: each row's argmax, to be compared with the guesses (a guess is kept where it is the argmax).
    Returns the tokens: guesses kept, then the token drawn (as many as the caller keeps)."""
    if params.temperature == 0:
        return [int(torch.argmax(row)) for row in rows]
    out = []
    for row, guess in zip(rows, guesses, strict=False):
        ids, weights = candidates(row, params)
        at = (ids == guess).nonzero() if ids is not None else torch.tensor([[guess]])
        p = float(weights[at[0, 0]] / weights.sum()) if at.numel() else 0.0
        if float(torch.rand((), generator=generator)) < p:
            out.append(guess)
            continue
        weights = weights.clone()
        if at.numel():
            weights[at[0, 0]] = 0.0
        pick = int(torch.multinomial(weights, 1, generator=generator))
        out.append(pick if ids is None else int(ids[pick]))
        return out
    out.append(sample(rows[len(guesses)], params, generator))
    return out
