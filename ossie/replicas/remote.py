"""`RemoteEngine`: the `EngineClient` that ossie's server (the same FastAPI app as `ossie serve`'s) holds in the Ray
ingress: each request goes to a replica through a Serve handle, routed by conversation (router.py), and its
replica's updates (replica.py) come back as the events a local engine would give.

Nothing is lost when a replica dies: a request that had no token yet is sent again (to another replica: Ray's
router drops a dead one), up to `RETRIES` times; one that had tokens ends with a `Failed(ReplicaLost)` (a stream's
clean error event: its client has part of an answer that cannot be resumed elsewhere), and the other requests
carry on. Cancelling (the client left) closes the stream, which cancels the request on its replica.

The counters (/health, /metrics) are those of the requests this ingress has seen: waiting until a replica admits
them, running, finished, tokens in, out and from the prefix caches, and the latency histograms measured here (what
clients see). Each replica's KV memory is its own: those gauges read 0 here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..engine import (
    EVERYONE,
    CacheScope,
    Cancelled,
    EngineStats,
    Event,
    Failed,
    Finished,
    RequestMetrics,
    SamplingParams,
    Token,
    check_prompt,
)
from ..engine.llm_engine import MEAN_WEIGHT
from ..engine.prefix_cache import BLOCK_SIZE, chained_keys
from ..server.streaming import EngineUnavailable
from .replica import ReplicaInfo

log = logging.getLogger("ossie")

RETRIES = 2  # times a request with no token yet is sent again after its replica failed
MAX_ROUTE_BLOCKS = 1024  # a prompt's first 64k tokens route it (more would only make the request bigger)


def route_keys(prompt: list[int], scope: CacheScope) -> tuple[int, ...]:
    """The keys of the prompt's whole blocks, as a replica's prefix cache computes them."""
    blocks = min(len(prompt) // BLOCK_SIZE, MAX_ROUTE_BLOCKS)
    return tuple(key for key, *_ in chained_keys(prompt, scope, BLOCK_SIZE, blocks))


class ReplicaLost(EngineUnavailable):
    """The replica running a request failed after the request had begun to answer (a 503 or an error event)."""


class RemoteHandle:
    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.admitted = False
        self.cached = 0
        self.aborted: Exception | None = None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    @property
    def waiting(self) -> bool:
        return not self.admitted

    @property
    def cached_tokens(self) -> int:
        return self.cached


class RemoteEngine:
    """replicas: the replica deployment's handle (its router: ConversationRouter); info: one replica's; count: the
    replicas at most (the slots of all of them together is what the server's queue limit counts beyond: autoscaled
    below its most, the server queues more than --max-queued before it answers 429)."""

    def __init__(self, replicas, info: ReplicaInfo, count: int):
        self.replicas, self.info = replicas, info
        self.max_running = info.max_running * count
        self.observers: list[Callable[[RequestMetrics], None]] = []
        self.stats = EngineStats()
        self.handles: set[RemoteHandle] = set()

    def submit(self, prompt: list[int], params: SamplingParams, steering, on_event: Callable[[Event], None],
               timeout_s: float | None = None, scope: CacheScope = EVERYONE) -> RemoteHandle:
        """As Engine.submit (ValueError at once for what a replica would refuse); called on the event loop."""
        params.validate()
        check_prompt(prompt, self.info.config.vocab_size)
        handle = RemoteHandle()
        self.stats.waiting += 1
        self.stats.prompt_tokens += len(prompt)
        self.handles.add(handle)
        handle.task = asyncio.get_running_loop().create_task(
            self._run(handle, list(prompt), params, steering, on_event, timeout_s, scope))
        return handle

    async def _run(self, handle: RemoteHandle, prompt: list[int], params: SamplingParams, steering,
                   on_event: Callable[[Event], None], timeout_s: float | None, scope: CacheScope) -> None:
        started, first, generated, outcome = time.perf_counter(), None, 0, "failed"
        admitted_at = None
        route = route_keys(prompt, scope)
        try:
            for attempt in range(RETRIES + 1):
                left = None if timeout_s is None else max(0.0, timeout_s - (time.perf_counter() - started))
                stream = self.replicas.options(stream=True).generate.remote(prompt, params, steering, left, scope,
                                                                           route=route)
                try:
                    async for update in stream:
                        # the latest: a replica may read its handle between the admission and the cache lookup
                        handle.cached = update.cached_tokens
                        if update.admitted and not handle.admitted:
                            handle.admitted, admitted_at = True, time.perf_counter()
                            self.stats.waiting -= 1
                            self.stats.running += 1
                        for event in update.events:
                            if isinstance(event, Token):
                                generated += 1
                                self.stats.generated_tokens += 1
                                first = first or time.perf_counter()
                            on_event(event)
                            if not isinstance(event, Token):
                                outcome = event.reason if isinstance(event, Finished) else \
                                    "cancelled" if isinstance(event, Cancelled) else "failed"
                                return
                    raise ReplicaLost("the replica's stream ended without the request's end")
                except asyncio.CancelledError:
                    stream.cancel()
                    raise
                except Exception as e:  # the replica died or became unreachable (Ray's errors), or its stream broke
                    if generated or attempt == RETRIES:
                        log.warning("a replica failed during a request (%s): the request ends", type(e).__name__)
                        on_event(Failed(ReplicaLost(f"the replica running this request failed ({type(e).__name__})")))
                        return
                    log.warning("a replica failed before a request's first token (%s): sent again",
                                type(e).__name__)
                    if handle.admitted:  # it waits again, for another replica, whose cache it will read
                        handle.admitted, admitted_at = False, None
                        self.stats.running -= 1
                        self.stats.waiting += 1
        except asyncio.CancelledError:
            outcome = "failed" if handle.aborted else "cancelled"
            on_event(Failed(handle.aborted) if handle.aborted else Cancelled())
        finally:
            self._ended(handle, started, admitted_at, first, len(prompt), generated, outcome)

    def _ended(self, handle: RemoteHandle, started: float, admitted_at: float | None, first: float | None,
               prompt_tokens: int, generated: int, outcome: str) -> None:
        self.handles.discard(handle)
        now = time.perf_counter()
        s = self.stats
        if handle.admitted:
            s.running -= 1
        else:
            s.waiting -= 1
        s.cached_prompt_tokens += handle.cached
        counter = "finished" if outcome in ("stop", "length") else outcome  # or "cancelled", "failed"
        setattr(s, counter, getattr(s, counter) + 1)
        s.mean_request_s = (now - started) if s.mean_request_s == 0 else \
            s.mean_request_s + MEAN_WEIGHT * (now - started - s.mean_request_s)
        m = RequestMetrics((admitted_at or now) - started, None if first is None else first - started, now - started,
                           prompt_tokens, handle.cached, generated, outcome)
        for observe in self.observers:
            observe(m)

    def snapshot(self) -> EngineStats:
        return EngineStats(**vars(self.stats))

    def abort_all(self, error: Exception) -> None:
        """End every request in flight with Failed(error) (the ingress's drain time after SIGTERM is over). Called
        from a timer's thread: the cancellations are made on the event loop."""
        for handle in list(self.handles):
            handle.aborted = error
            if handle.task is not None:
                handle.task.get_loop().call_soon_threadsafe(handle.cancel)

    def shutdown(self) -> None:
        """The replicas are Ray Serve's: they stop with the application."""
