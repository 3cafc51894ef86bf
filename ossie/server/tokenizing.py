"""Prompts to tokens without stalling the server, and without one client's prompt failing another's.

openai-harmony's encoder holds the GIL (a thread would stall the event loop just the same) and is superlinear on
long runs without spaces: 100,000 such characters take seconds, and from about a million it panics. So a large
request is rendered in a worker process, and a failure of the tokenizer is the client's 400, never a 500. Small
requests, nearly all of them, are rendered on the event loop, where they take a millisecond or two.

There are a few workers, and each request has its own time limit, counted from when a worker starts on it: a
worker that runs over is killed and replaced, and only its request fails. One client (an API principal, or an
address where the server has no keys) holds at most `per_client` workers at once; its other requests wait for
its own turn. Before, one worker served every large request in turn under a limit that counted the wait: one
540,000-character prompt made the five ordinary 10 KB chats sent after it fail ("could not be tokenized within
20 s"), and sent every 20 s it denied every large request.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..chat import tokenizing_jobs
from .protocol import APIError

INLINE_BYTES = 8192  # request bodies up to this size are tokenized on the event loop (the worst case: ~20 ms)
TOKENIZE_TIMEOUT_S = 20.0
WORKERS = 2  # worker processes: a client at its limit leaves the others one
PER_CLIENT = 1  # workers one client may hold at once

_spawn = multiprocessing.get_context("spawn")  # a fork of a process running the engine's threads is not safe


class _Worker:
    def __init__(self):
        self.conn, child = _spawn.Pipe()
        self.process = _spawn.Process(target=tokenizing_jobs.serve, args=(child,), daemon=True,
                                      name="ossie-tokenizer")
        self.process.start()
        child.close()

    def call(self, fn: Any, args: tuple, timeout_s: float) -> Any:
        """fn(*args) in the worker (its guarded result); TimeoutError past timeout_s, EOFError if the worker died."""
        self.conn.send((fn, args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError
        return self.conn.recv()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class Tokenizing:
    """Renders chat prompts and encodes text for the endpoints; `close()` ends the worker processes."""

    def __init__(self, timeout_s: float = TOKENIZE_TIMEOUT_S, workers: int = WORKERS, per_client: int = PER_CLIENT):
        self.timeout_s, self.per_client = timeout_s, per_client
        self._free = asyncio.Semaphore(workers)  # workers not running a job (started or not yet)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}  # client -> (its slots, requests holding one)

    async def render(self, size: int, messages: list[dict], tools: list[dict] | None, effort: str,
                     param: str, builtin_tools: tuple[str, ...] = (), client: str = "") -> list[int]:
        """The harmony prompt of a conversation; `size` is the request body's length, `param` what a 400 names,
        `client` who asks (middleware.client_of)."""
        return await self._run(size, param, client, tokenizing_jobs.render, messages, tools, effort,
                               tuple(builtin_tools))

    async def encode(self, size: int, text: str, param: str, client: str = "") -> list[int]:
        return await self._run(size, param, client, tokenizing_jobs.encode, text)

    async def _run(self, size: int, param: str, client: str, fn: Any, *args: Any) -> list[int]:
        if size <= INLINE_BYTES:
            out = tokenizing_jobs.guarded(fn, *args)
        else:
            out = await self.in_worker(client, param, fn, *args)
        if isinstance(out, str):
            raise APIError(400, out, param)
        return out

    async def in_worker(self, client: str, param: str, fn: Any, *args: Any) -> Any:
        """fn(*args) in a worker process, once `client` has a turn and a worker is free, within timeout_s of the
        worker starting on it."""
        async with self._turn(client), self._free:
            worker = self._idle.pop() if self._idle else self._start()
            try:
                out = await asyncio.get_running_loop().run_in_executor(None, worker.call, fn, args, self.timeout_s)
            except TimeoutError:
                self._kill(worker)
                raise APIError(400, f"the prompt could not be tokenized within {self.timeout_s:.0f} s (very long "
                                    "runs of text without spaces are slow to tokenize)", param) from None
            except (EOFError, OSError):  # the worker died (the tokenizer aborting the process)
                self._kill(worker)
                raise APIError(400, "the tokenizer cannot encode this text", param) from None
            except BaseException:  # the request was cancelled (its client left): the job may still be running
                self._kill(worker)
                raise
            self._idle.append(worker)
            return out

    @asynccontextmanager
    async def _turn(self, client: str) -> AsyncIterator[None]:
        slots, users = self._clients.get(client) or (asyncio.Semaphore(self.per_client), 0)
        self._clients[client] = (slots, users + 1)
        try:
            async with slots:
                yield
        finally:
            slots, users = self._clients[client]
            if users == 1:
                del self._clients[client]
            else:
                self._clients[client] = (slots, users - 1)

    def _start(self) -> _Worker:
        worker = _Worker()
        self._all.add(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        self._all.discard(worker)
        worker.kill()

    def close(self) -> None:
        for worker in list(self._all):
            self._kill(worker)
        self._idle.clear()
