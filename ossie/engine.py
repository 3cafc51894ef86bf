"""Generation as a sequence of steps, and the engine loop that serves many requests with one model.

`Generation` is one generation: its KV cache, sampler state and optional steering (constraints.py); `step()`
runs one forward pass (a prefill chunk or one decode step). `LLM.generate` drives a single Generation;
`Engine` owns the model on one thread and steps every active sequence in turn, so a new request starts at
the next step instead of waiting for the others to finish. Batching the active sequences into one forward
pass (continuous batching) would change `Engine._step_all` only.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .constraints import Steering
from .sampling import SamplingParams, sample

if TYPE_CHECKING:
    from .llm import LLM

log = logging.getLogger("ossie")

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory and the wait of other requests


class Generation:
    """One generation in progress. `step()` returns the next token, or None while the prompt is being read."""

    def __init__(self, llm: LLM, prompt: torch.Tensor, params: SamplingParams, steering: Steering | None = None):
        self.llm, self.prompt, self.params, self.steering = llm, prompt, params, steering
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.stop = params.stop_ids
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length" once finished
        self.script = llm._next_script(prompt) if llm._script is not None else None
        # the cache grows by doubling as tokens come: start from the prompt and a little room, not from max_tokens
        # (which defaults to the rest of a 131k context, gigabytes of KV cache nobody may use)
        self.cache = None if self.script is not None else llm.new_cache(prompt.numel() + min(params.max_tokens, 256))
        self.prefilled = 0
        self.logits: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> int | None:
        if self.finished:
            raise RuntimeError("step() on a finished sequence")
        if self.script is not None:
            if len(self.tokens) >= len(self.script):  # the scripted completion is over
                self.finish_reason = "stop"
                return None
            tok = self._scripted()
        else:
            model = self.llm.model
            if self.prefilled < self.prompt.numel():  # read the prompt, a chunk per step
                chunk = self.prompt[self.prefilled:self.prefilled + PREFILL_CHUNK]
                self.logits = model.forward(chunk, self.cache, last_only=True)[-1]
                self.prefilled += chunk.numel()
                if self.prefilled < self.prompt.numel():
                    return None
            elif self.tokens:
                last = torch.tensor([self.tokens[-1]], device=self.llm.device)
                self.logits = model.forward(last, self.cache, last_only=True)[-1]
            logits = self.logits.float().cpu()
            if self.steering is not None:
                logits = self.steering.mask(logits)
            tok = sample(logits, self.params, self.generator)
        if self.steering is not None:
            self.steering.advance(tok)
        self.tokens.append(tok)
        if tok in self.stop:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finished:
            self.free()
        return tok

    def _scripted(self) -> int:
        """Test hook: the next token of a scripted completion, still subject to the steering (a scripted token
        the steering forbids is replaced by the first one it allows)."""
        want = self.script[len(self.tokens)]
        if self.steering is None:
            return want
        prefer = torch.zeros(self.llm.config.vocab_size)
        prefer[want] = 1.0
        return int(torch.argmax(self.steering.mask(prefer)))

    def free(self) -> None:
        """Release the KV cache (finished, or abandoned by its client)."""
        self.cache = None
        self.logits = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    steering: Steering | None = None
    id: int = field(default_factory=itertools.count().__next__)


class Handle:
    """The engine's side of one request: tokens go to `on_event` as ("token", id), then ("done", finish_reason)
    or ("error", exception). `cancel()` stops the generation at the next step and frees its cache."""

    def __init__(self, request: Request, on_event: Callable[[str, object], None]):
        self.request, self.on_event = request, on_event
        self.cancelled = threading.Event()
        self.sequence: Generation | None = None
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Engine:
    """Serves requests with one model on one thread: every active sequence advances one step per round."""

    def __init__(self, llm: LLM, max_running: int = 16):
        self.llm, self.max_running = llm, max_running
        self.waiting: queue.Queue[Handle | None] = queue.Queue()
        self.running: list[Handle] = []
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ossie-engine", daemon=True)
        self._stopping = False
        self._thread.start()

    def submit(self, request: Request, on_event: Callable[[str, object], None]) -> Handle:
        handle = Handle(request, on_event)
        with self._lock:
            self.stats.waiting += 1
        self.waiting.put(handle)
        return handle

    def snapshot(self) -> EngineStats:
        with self._lock:
            return EngineStats(**vars(self.stats))

    def shutdown(self) -> None:
        self._stopping = True
        self.waiting.put(None)
        self._thread.join(timeout=10)

    # ---- the loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._admit(block=not self.running)
            self._step_all()

    def _admit(self, block: bool) -> None:
        while len(self.running) < self.max_running:
            try:
                handle = self.waiting.get(block=block)
            except queue.Empty:
                return
            if handle is None:  # shutdown
                return
            block = False
            with self._lock:
                self.stats.waiting -= 1
            if handle.cancelled.is_set():
                self._end(handle, "cancelled")
                continue
            try:
                r = handle.request
                handle.sequence = Generation(self.llm, self.llm._tokens(r.prompt), r.params, r.steering)
            except Exception as e:  # a bad request fails alone
                self._end(handle, "error", e)
                continue
            with self._lock:
                self.stats.running += 1
                self.stats.prompt_tokens += len(handle.request.prompt)
            self.running.append(handle)

    def _step_all(self) -> None:
        for handle in list(self.running):
            if handle.cancelled.is_set():
                self._end(handle, "cancelled")
                continue
            seq = handle.sequence
            try:
                tok = seq.step()
            except Exception as e:
                log.exception("request %d failed", handle.request.id)
                self._end(handle, "error", e)
                continue
            if tok is not None:
                with self._lock:
                    self.stats.generated_tokens += 1
                handle.on_event("token", tok)
            if seq.finished:
                self._end(handle, "done")

    def _end(self, handle: Handle, how: str, error: Exception | None = None) -> None:
        if handle in self.running:
            self.running.remove(handle)
            with self._lock:
                self.stats.running -= 1
        if handle.sequence is not None:
            handle.sequence.free()
        with self._lock:
            if how == "done":
                self.stats.finished += 1
            elif how == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.failed += 1
        if how == "done":
            handle.on_event("done", handle.sequence.finish_reason)
        elif how == "error":
            handle.on_event("error", error)
        else:
            handle.on_event("cancelled", None)
