"""`Sequence`: one request's state as the engine sees it (tokens, sampling parameters, steering, status)."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .prefix_cache import EVERYONE, CacheScope
from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..chat.constraints import Steering
    from .kv_cache import KVCache

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # submitted, not yet admitted
    RUNNING = "running"  # has a KV cache; reads its prompt, then generates
    FINISHED = "finished"


def check_prompt(token_ids: Seq[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """The prompt as a list of ids, or ValueError naming what is wrong with it."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("token_ids is empty: give at least one token")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"token id {int(ids[i])} at position {i} is outside the vocabulary [0, {vocab_size})")
    return ids.tolist()


@dataclass(eq=False)
class Sequence:
    """A prompt and what has been generated for it. The runner computes its tokens' KV (`num_computed` of them
    so far: the prompt in chunks, then each sampled token in the step after), and once every token is computed
    samples the next one, which `append` records; the sequence finishes at a stop token ("stop") or at
    max_tokens ("length"). `cache` is the KV memory the runner gave it while it runs. A sequence preempted for
    memory loses its cache and computes its tokens again (`num_computed` back to what the prefix cache holds)."""

    prompt: list[int]
    params: SamplingParams
    steering: Steering | None = None
    id: int = field(default_factory=_ids.__next__)
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" once finished
    num_computed: int = 0  # tokens (prompt, then output) whose keys and values are in `cache`
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache: KVCache | None = None
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of its complete blocks, in order
    scope: CacheScope = EVERYONE  # whose cached prefixes it may reuse, and who may reuse its blocks
    # tokens guessed to follow the output (speculative decoding's draft): the next step computes them beside the last
    # token, samples at each of their positions, and the caller keeps what it accepts (`accept`) and has the runner
    # take the rest back (ModelRunner.rollback)
    candidates: list[int] = field(default_factory=list)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()
        self.stop_ids = self.params.stop_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens to compute before the next one can be sampled (1 while decoding; 1 + the candidates with some)."""
        return self.num_tokens + len(self.candidates) - self.num_computed

    @property
    def prefilling(self) -> bool:
        """Whether more than one token is to be computed (its prompt, or everything again after preemption)."""
        return self.pending > 1

    def tokens(self, start: int, end: int) -> list[int]:
        """The tokens at positions start..end-1 of prompt + output + candidates."""
        n, m = len(self.prompt), self.num_tokens
        return (self.prompt[start:end] + self.output[max(0, start - n):max(0, end - n)]
                + self.candidates[max(0, start - m):max(0, end - m)])

    def propose(self, candidates: list[int]) -> None:
        """Guess the tokens that follow: the next step checks them (a decoding sequence; a steered one's checked
        rows are masked as its steering would mask them once the guesses before were taken: ModelRunner)."""
        if self.pending != 1 or self.finished:
            raise ValueError(f"sequence {self.id} takes candidates only while decoding")
        self.candidates = list(candidates)

    def accept(self, tokens: list[int]) -> None:
        """Record the tokens a checked step gave (the candidates kept, then the one sampled after them), up to a
        stop token or max_tokens; the candidates are done with."""
        self.candidates = []
        for tok in tokens:
            self.append(tok)
            if self.finished:
                return

    def append(self, token: int) -> None:
        """Record a sampled token (steering sees it too); finish at a stop token or at max_tokens."""
        if self.finished:
            raise RuntimeError(f"sequence {self.id} is finished")
        if self.steering is not None:
            self.steering.advance(token)
        self.output.append(token)
        if token in self.stop_ids:
            self.finish("stop")
        elif len(self.output) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str | None) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
