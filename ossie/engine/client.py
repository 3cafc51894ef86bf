"""What front ends hold of the engine: the `EngineClient` interface, and `Generation`, a blocking client's view of one
request (the library's; the server's async one is server/streaming.py's `Run`).

Front ends only submit requests, receive their events, cancel them, and read the engine's gauges: everything an
engine in another process or a Ray actor could also offer. Endpoint tests pass a fake that does the same.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .llm_engine import Cancelled, EngineStats, Event, Failed, Finished, RequestMetrics, Token
from .prefix_cache import EVERYONE, CacheScope
from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..chat.constraints import Steering
    from .llm_engine import Engine

WAIT_POLL_S = 0.5


class RequestHandle(Protocol):
    def cancel(self) -> None: ...

    @property
    def waiting(self) -> bool: ...

    @property
    def cached_tokens(self) -> int: ...


class EngineClient(Protocol):
    """The engine as the front ends see it (vLLM's `EngineClient`)."""

    max_running: int  # requests generating at once (more wait)
    observers: list[Callable[[RequestMetrics], None]]  # told of each request as it ends

    def submit(self, prompt: list[int], params: SamplingParams, steering: Steering | None,
               on_event: Callable[[Event], None], timeout_s: float | None = None,
               scope: CacheScope = EVERYONE) -> RequestHandle: ...

    def snapshot(self) -> EngineStats: ...

    def abort_all(self, error: Exception) -> None: ...

    def shutdown(self) -> None: ...


class Generation:
    """One request, consumed on the caller's thread: iterate it for its token ids. Without an engine thread, the
    iteration steps the engine itself (every request in it progresses, so several generations consumed in turn, or
    from several threads, are batched together); with one, it waits for the events. Leaving the iteration early
    cancels the request and frees its KV memory at once. A failed step raises its error here. The request is
    submitted when the iteration starts: a generation made and never read costs the engine nothing."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, steering: Steering | None = None,
                 timeout_s: float | None = None, scope: CacheScope = EVERYONE):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.steering, self.timeout_s, self.scope = steering, timeout_s, scope
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.handle: RequestHandle | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" once over

    @property
    def cached_tokens(self) -> int:
        return self.handle.cached_tokens if self.handle is not None else 0

    def __iter__(self) -> Iterator[int]:
        if self.handle is not None:
            raise RuntimeError("a Generation is read once")
        self.handle = self.engine.submit(self.prompt, self.params, self.steering, self.events.put, self.timeout_s,
                                         self.scope)
        try:
            while True:
                event = self._next()
                if isinstance(event, Token):
                    yield event.id
                elif isinstance(event, Finished):
                    self.finish_reason = event.reason
                    return
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    assert isinstance(event, Cancelled)
                    self.finish_reason = "cancelled"
                    return
        finally:
            if self.finish_reason is None:  # the consumer stopped early, or a step failed
                self.handle.cancel()
                if not self.engine.background:
                    self.engine.reap()

    def _next(self) -> Event:
        while True:
            try:
                return self.events.get_nowait()
            except queue.Empty:
                pass
            if not self.engine.background:
                self.engine.step()
                continue
            try:  # the engine thread steps; look again now and then, in case it stops (a server shutting down)
                return self.events.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                pass
