"""`Engine`: serves many requests with one model, and tells each request what happens to it with typed events
(`Token`, then `Finished`, `Failed` or `Cancelled`).

One `step()` does everything a request goes through, whoever asked for it: take the submitted requests, end the
cancelled and expired ones, admit waiting ones within the KV budget (Scheduler), run the batch (ModelRunner),
record each sampled token (Sequence.append), report it, and preempt or evict to stay within the budget. Two
drivers call it, and only these: the server's engine thread (`start()`), and a blocking client (client.py) that
steps on its caller's thread when no engine thread runs (`LLM.generate`, `LLM.chat`). They once were two loops,
and the library's had no budget, no preemption and no batching: a request's fate depended on its door.

submit() may be called from any thread; steps are serialized by a lock. A cancelled request stops at the next step
and its KV cache is freed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .model_runner import ModelRunner
from .prefix_cache import EVERYONE, CacheScope
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status, check_prompt
from .speculative import Speculator

if TYPE_CHECKING:
    from ..chat.constraints import Steering

log = logging.getLogger("ossie")
MEAN_WEIGHT = 0.1  # the weight of the latest request in EngineStats.mean_request_s


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Cancelled:
    pass


Event = Token | Finished | Failed | Cancelled


@dataclass(frozen=True)
class RequestMetrics:
    """One request's course, given to the engine's observers when it ends (the server's latency histograms)."""
    queued_s: float  # from submission to admission (to its end, if never admitted)
    first_token_s: float | None  # from submission to its first token (None: it had none)
    e2e_s: float  # from submission to its end
    prompt_tokens: int
    cached_tokens: int  # of them, served from the prefix cache
    generated_tokens: int
    outcome: str  # "stop" | "length" | "cancelled" | "failed"


class Handle:
    """The engine's side of one request. `cancel()` stops its generation at the next step and frees its cache."""

    def __init__(self, seq: Sequence, on_event: Callable[[Event], None], timeout_s: float | None = None):
        self.sequence, self.on_event = seq, on_event
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.admitted: float | None = None  # when it first ran
        self.first_token: float | None = None
        self.deadline = None if timeout_s is None else self.submitted + timeout_s

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def waiting(self) -> bool:
        """Not yet admitted (queued behind the running requests)."""
        return self.sequence.status is Status.WAITING

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known once the request is admitted)."""
        return self.sequence.num_cached_tokens


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    preempted: int = 0  # times a running request gave its KV memory back and waited to compute again
    steps: int = 0  # forward passes run (a step's tokens over its steps: what guesses and batching bring)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    drafted_tokens: int = 0  # tokens guessed by speculative decoding and checked
    accepted_tokens: int = 0  # of them, kept
    kv_running_bytes: int = 0  # the running sequences' KV caches
    kv_cached_bytes: int = 0  # the prefix cache's blocks
    kv_cached_blocks: int = 0
    kv_budget_bytes: int = 0  # what the running caches and the cached blocks may hold together (0: no limit)
    mean_request_s: float = 0.0  # how long recent requests took from submission to their end (a moving average)


class Engine:
    def __init__(self, runner: ModelRunner, max_running: int = 16, prefill_while_decoding: int | None = None,
                 speculator: Speculator | None = None):
        """prefill_while_decoding: prompt tokens per step while others decode (Scheduler; None: a whole chunk).
        speculator: the decoding sequences' guesses, checked in their steps (engine/speculative.py; None: none)."""
        self.runner, self.max_running, self.speculator = runner, max_running, speculator
        self.kv = runner.kv
        align = self.kv.prefix_cache.block_size if self.kv.prefix_cache is not None else 1
        self.scheduler = Scheduler(max_running, runner.prefill_chunk, align, prefill_while_decoding)
        self.intake: queue.Queue[Handle | None] = queue.Queue()
        self.handles: dict[int, Handle] = {}  # sequence id -> handle, for the sequences in the scheduler
        self.stats = EngineStats(kv_budget_bytes=self.kv.budget or 0)
        # called on the engine thread with each request's RequestMetrics as it ends (the server's /metrics)
        self.observers: list[Callable[[RequestMetrics], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # the running engine thread's: set, it ends after its step
        self._abort: Exception | None = None
        self._stepping = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Engine:
        """Step on an engine thread of its own from now on (a server), rather than on its clients' threads."""
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="ossie-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def background(self) -> bool:
        """Whether an engine thread steps (clients then wait for events instead of stepping)."""
        thread = self._thread  # a thread that died (a bug) leaves its clients to step, not to wait for ever
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    def submit(self, prompt: list[int], params: SamplingParams, steering: Steering | None,
               on_event: Callable[[Event], None], timeout_s: float | None = None,
               scope: CacheScope = EVERYONE) -> Handle:
        """Queue a request; raises ValueError at once for a prompt outside the vocabulary or invalid params.
        `on_event` is called on the engine thread. timeout_s: the request generates until then at most (counted
        from now, waiting included) and then finishes as at its token budget ("length"). scope: whose cached
        prefixes it may reuse (a server's API principal)."""
        params.validate()
        seq = Sequence(check_prompt(prompt, self.runner.config.vocab_size), params, steering, scope=scope)
        handle = Handle(seq, on_event, timeout_s)
        with self._lock:
            self.stats.waiting += 1
            self.stats.prompt_tokens += len(seq.prompt)
        self.intake.put(handle)
        return handle

    def snapshot(self) -> EngineStats:
        with self._lock:
            return EngineStats(**vars(self.stats))

    def shutdown(self) -> None:
        """Stop the engine thread, if one runs. The engine is then stepped by its blocking clients again (a server's
        LLM outlives the server), and a server's abort_all no longer applies."""
        if self._thread is not None:
            self._stop.set()
            self.intake.put(None)
            self._thread.join(timeout=10)  # a thread still in a long step ends after it, on its own event
            self._thread, self._abort = None, None

    def abort_all(self, error: Exception) -> None:
        """End every request, waiting or running, with Failed(error) at the next step (a server that stops)."""
        self._abort = error
        self.intake.put(None)  # wake an idle engine

    def step(self) -> bool:
        """One step on the caller's thread (a blocking client's). Returns whether requests are left."""
        with self._stepping:
            self._take(block=False)
            self._step()
            return bool(self.scheduler) or not self.intake.empty()

    def reap(self) -> None:
        """End the cancelled and expired requests now, freeing their KV memory (a blocking client whose consumer
        stopped early: without an engine thread, the next step might be long in coming)."""
        with self._stepping:
            self._take(block=False)
            self._end_stopped()

    # ---- the loop (engine thread) -------------------------------------------------------------------------
    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._take(block=not self.scheduler)
            with self._stepping:
                self._step()

    def _take(self, block: bool) -> None:
        """Move submitted requests into the scheduler (waiting for one when idle)."""
        while True:
            try:
                handle = self.intake.get(block=block)
            except queue.Empty:
                return
            if handle is None:  # shutdown
                return
            block = False
            self.handles[handle.sequence.id] = handle
            self.scheduler.add(handle.sequence)

    def _end_stopped(self) -> None:
        now = time.perf_counter()
        for seq in list(self.scheduler.waiting) + self.scheduler.running:
            handle = self.handles[seq.id]
            if self._abort is not None:
                self._end(seq, Failed(self._abort))
            elif handle.cancelled.is_set():
                self._end(seq, Cancelled())
            elif handle.deadline is not None and now > handle.deadline:
                seq.finish("length")
                self._end(seq, Finished("length"))

    def _step(self) -> None:
        self._end_stopped()
        self._admit()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        batch, sizes = self.scheduler.schedule()
        if not batch:  # idle, or every request ended above: the gauges must say so (they read non-zero when idle)
            self._measure_kv()
            return
        decoding_alone = len(batch) == 1 and (sizes[0] == 1 or bool(batch[0].candidates))
        with self._lock:
            self.stats.steps += 1
        try:
            t0 = time.perf_counter()
            tokens = self.runner.run(batch, sizes)
            if self.speculator is not None and decoding_alone:  # what guessing costs on this machine
                self.speculator.observe(sizes[0], time.perf_counter() - t0)
        except Exception as e:  # a failed step fails the requests in it; the engine goes on serving
            log.exception("a step of requests %s failed", [s.id for s in batch])
            for seq in batch:
                self._end(seq, Failed(e))
            return
        except BaseException as e:  # Ctrl-C in a step run on a client's thread: its KV caches are half written
            for seq in batch:
                self._end(seq, Failed(e))
            raise
        for seq, out in zip(batch, tokens, strict=True):
            if out is None:
                continue
            first = not seq.output
            try:
                if isinstance(out, list):  # its guesses were checked: what it keeps (speculative.py)
                    drafted = len(seq.candidates)
                    new, kept = self.speculator.settle(seq, out, self.kv.rollback)
                    with self._lock:
                        self.stats.drafted_tokens += drafted
                        self.stats.accepted_tokens += kept
                else:
                    seq.append(out)
                    new = [out]
            except Exception as e:  # e.g. its steering: this request fails alone
                log.exception("request %d failed", seq.id)
                self._end(seq, Failed(e))
                continue
            with self._lock:
                self.stats.generated_tokens += len(new)
                if first:  # its prompt is read: how much of it came from the prefix cache is known
                    self.stats.cached_prompt_tokens += seq.num_cached_tokens
            handle = self.handles[seq.id]
            if handle.first_token is None and new:
                handle.first_token = time.perf_counter()
            for tok in new:
                handle.on_event(Token(tok))
            if seq.finished:
                self._end(seq, Finished(seq.finish_reason))
        self._fit_memory()
        self._measure_kv()

    def _admit(self) -> None:
        for seq in self.scheduler.admit(self.kv.admission(self.scheduler.running)):
            handle = self.handles[seq.id]
            if handle.admitted is None:  # not again after a preemption
                handle.admitted = time.perf_counter()
            with self._lock:
                self.stats.waiting -= 1
                self.stats.running += 1
            try:
                self.kv.allocate(seq)  # here, so that the prompt tokens it reads from the prefix cache are known
            except Exception as e:
                log.exception("request %d failed", seq.id)
                self._end(seq, Failed(e))

    def _fit_memory(self) -> None:
        """Keep within the KV budget (kv_manager.py's policy): preempt the sequences admitted last while the running
        caches outgrow it (never the only one running: it must progress), then evict cached blocks."""
        while self.kv.over_budget(self.scheduler.running) and len(self.scheduler.running) > 1:
            seq = self.scheduler.preempt()
            self.kv.free(seq)
            log.info("request %d preempted for KV memory; it will compute its tokens again", seq.id)
            with self._lock:
                self.stats.running -= 1
                self.stats.waiting += 1
                self.stats.preempted += 1
        self.kv.evict(self.scheduler.running)

    def _measure_kv(self) -> None:
        usage = self.kv.usage(self.scheduler.running)
        with self._lock:
            self.stats.kv_running_bytes, self.stats.kv_cached_bytes, self.stats.kv_cached_blocks = usage

    def _end(self, seq: Sequence, event: Finished | Failed | Cancelled) -> None:
        was_running = seq in self.scheduler.running
        self.scheduler.remove(seq)
        self.kv.free(seq)
        if self.speculator is not None:
            self.speculator.forget(seq)
        if not seq.finished:
            seq.finish(None)
        with self._lock:
            if was_running:
                self.stats.running -= 1
            else:
                self.stats.waiting -= 1
            took = time.perf_counter() - self.handles[seq.id].submitted
            m = self.stats.mean_request_s
            self.stats.mean_request_s = took if m == 0 else m + MEAN_WEIGHT * (took - m)
            if isinstance(event, Finished):
                self.stats.finished += 1
            elif isinstance(event, Cancelled):
                self.stats.cancelled += 1
            else:
                self.stats.failed += 1
        handle = self.handles.pop(seq.id)
        handle.on_event(event)
        if self.observers:
            self._observe(handle, event)

    def _observe(self, handle: Handle, event: Finished | Failed | Cancelled) -> None:
        end, seq = time.perf_counter(), handle.sequence
        outcome = event.reason if isinstance(event, Finished) else \
            "cancelled" if isinstance(event, Cancelled) else "failed"
        metrics = RequestMetrics(
            queued_s=(handle.admitted or end) - handle.submitted,
            first_token_s=None if handle.first_token is None else handle.first_token - handle.submitted,
            e2e_s=end - handle.submitted, prompt_tokens=len(seq.prompt), cached_tokens=seq.num_cached_tokens,
            generated_tokens=len(seq.output), outcome=outcome)
        for observe in self.observers:
            try:
                observe(metrics)
            except Exception:  # an observer's bug must not end the request's neighbours
                log.exception("a request observer failed")
