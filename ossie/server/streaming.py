"""Running a generation from async code, and what the endpoints share for turning its tokens into text and
server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..chat.constraints import Steering
from ..engine import EVERYONE, CacheScope, Cancelled, EngineClient, Event, Failed, Finished, SamplingParams, Token
from ..tools import BuiltinTools
from .protocol import APIError

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
QUEUED_POLL_S = 0.1  # how often a waiting stream checks whether it runs
QUEUED_COMMENT_S = 5.0  # a waiting stream sends an SSE comment this often (clients see it is alive and waiting)


class ServerShuttingDown(Exception):
    """Ends the requests still in flight when the server's drain time after SIGTERM is over."""


class EngineUnavailable(Exception):
    """The engine running a request went away mid-answer (a replica that died): the client may retry."""


class Run:
    """One request in the engine, seen from the event loop: `async for tok in run.tokens()`; closing that iterator
    early (a disconnect, a stop string) cancels the generation, which frees its KV cache. An answer that runs
    built-in tools is several generations, one after each tool's message: `resume` starts the next."""

    def __init__(self, engine: EngineClient, prompt: list[int], params: SamplingParams, steering: Steering | None,
                 timeout_s: float | None = None, scope: CacheScope = EVERYONE):
        self.loop = asyncio.get_running_loop()
        self.engine, self.timeout_s, self.started, self.scope = engine, timeout_s, self.loop.time(), scope
        self.prompt, self.params = prompt, params
        self.demanded = steering is not None  # tool_choice or response_format: a call or JSON, whole or not at all
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" once over
        self.prompt_tokens = len(prompt)
        self.min_tokens = params.min_tokens  # for all rounds together, as max_tokens
        self.completion_tokens = 0
        self.disconnected = False
        self.tools: BuiltinTools | None = None  # the built-in tools this answer runs (start_chat sets them)
        self.context = 1 << 62  # the answer's rounds together stay within it (start_chat sets it)
        self._submit(prompt, params, steering, timeout_s)

    def _submit(self, prompt: list[int], params: SamplingParams, steering: Steering | None,
                timeout_s: float | None) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.handle = self.engine.submit(prompt, params, steering, self._on_event, timeout_s, self.scope)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def resume(self, prompt: list[int], max_tokens: int) -> None:
        """The next round of the answer: `prompt` (the last one, its completion and a tool's message), within what
        is left of max_tokens and of the request's time."""
        left = None if self.timeout_s is None else max(0.0, self.timeout_s - (self.loop.time() - self.started))
        self.finish_reason = None
        held = max(0, min(self.min_tokens - self.completion_tokens, max_tokens))  # min_tokens is the answer's
        self.prompt, self.params = prompt, dataclasses.replace(self.params, max_tokens=max_tokens, min_tokens=held)
        self._submit(prompt, self.params, None, left)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known once the prompt is read)."""
        return self.handle.cached_tokens

    def _on_event(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def queued(self) -> AsyncIterator[str]:
        """SSE comments while the request waits for a free slot: a stream's first chunk comes when it runs."""
        since = self.loop.time()
        while self.handle.waiting and self.queue.empty():
            await asyncio.sleep(QUEUED_POLL_S)
            if self.loop.time() - since >= QUEUED_COMMENT_S:
                since = self.loop.time()
                yield ": waiting for a free slot\n\n"

    async def tokens(self) -> AsyncIterator[int]:
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, Token):
                    self.completion_tokens += 1
                    yield event.id
                elif isinstance(event, Finished):
                    self.finish_reason = event.reason
                    return
                elif isinstance(event, Failed):
                    if isinstance(event.error, ServerShuttingDown):
                        raise APIError(503, "the server is shutting down; retry elsewhere or later",
                                       type="server_error", code="server_shutting_down")
                    if isinstance(event.error, EngineUnavailable):
                        raise APIError(503, f"{event.error}; retry", type="server_error", code="engine_unavailable")
                    raise APIError(500, "generation failed (the server's log has the details)", type="server_error")
                else:
                    assert isinstance(event, Cancelled)
                    self.finish_reason = "cancelled"
                    return
        finally:
            self.handle.cancel()  # a no-op once finished

    async def watch(self, request: Request) -> None:
        """Cancel the generation when the client goes away (non-streaming requests; a stream notices by itself).
        Runs until cancelled: an answer with tool calls has several generations."""
        while True:
            if await request.is_disconnected():
                self.disconnected = True
                self.handle.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


@contextlib.asynccontextmanager
async def cancel_on_disconnect(run: Run, request: Request) -> AsyncIterator[None]:
    """While a non-streaming request collects its answer, a client that goes away cancels its generation."""
    watcher = asyncio.create_task(run.watch(request))
    try:
        yield
    finally:
        watcher.cancel()


def sse(chunks: AsyncIterator[str], run: Run, request: Request) -> StreamingResponse:
    """Server-sent events of `run`; a generation failing mid-stream ends it with an OpenAI-style error event."""
    return streamed(chunks, run, request, lambda e: data(e.body()), "text/event-stream",
                    {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def streamed(chunks: AsyncIterator[str], run: Run, request: Request, error: Callable[[APIError], str],
             media_type: str, headers: dict[str, str] | None = None) -> StreamingResponse:
    """A streamed answer: `chunks`, or after a failure mid-stream its error(e) piece. A stream that ends early for any
    reason (its client gone while it waited in the queue, say) cancels `run`. The client's going is also watched
    for as a non-streaming request's is: a server that is told of it only through the cancellation of its task
    (Ray Serve's ingress, where that cancellation is best-effort) would otherwise generate to the end for no one,
    as it once did for one stream in four."""

    async def body() -> AsyncIterator[str]:
        try:
            async with cancel_on_disconnect(run, request):
                async for chunk in chunks:
                    yield chunk
        except APIError as e:
            yield error(e)
        finally:
            run.handle.cancel()  # a no-op once it has finished

    return StreamingResponse(body(), media_type=media_type, headers=headers)


def data(obj: BaseModel | dict | str, **dump: Any) -> str:
    """One `data:` event: a model (dumped with `dump`'s options), a JSON object, or a literal such as [DONE]."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump_json(**dump)
    elif not isinstance(obj, str):
        obj = json.dumps(obj)
    return f"data: {obj}\n\n"


def named_event(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n"
