"""Prompts to tokens without stalling the server.

openai-harmony's encoder holds the GIL (a thread would stall the event loop just the same) and is superlinear on
long runs without spaces: 100,000 such characters take seconds, and from about a million it panics. So a large
request is rendered in a worker process, with a time limit (the worker is replaced when it runs over), and a
failure of the tokenizer is the client's 400, never a 500. Small requests, nearly all of them, are rendered on
the event loop, where they take a millisecond or two.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.pool import Pool
from typing import Any

from ..chat import harmony
from ..tokenizer import harmony_encoding
from .protocol import APIError

INLINE_BYTES = 8192  # request bodies up to this size are tokenized on the event loop (the worst case: ~20 ms)
TOKENIZE_TIMEOUT_S = 20.0


def _render(messages: list[dict], tools: list[dict] | None, effort: str,
            builtin_tools: tuple[str, ...] = ()) -> list[int] | str:
    try:
        return harmony.render(messages, tools, effort, builtin_tools=builtin_tools)
    except harmony.ChatFormatError as e:
        return str(e)


def _encode(text: str) -> list[int] | str:
    return list(harmony_encoding().encode(text, allowed_special="all"))


def _guarded(fn: Any, *args: Any) -> list[int] | str:
    """fn(*args): tokens, or the message of why the input cannot be tokenized (a str)."""
    try:  # (lone surrogates were refused with the request body: protocol.StrictBody)
        return fn(*args)
    except UnicodeEncodeError:
        return "the text is not valid Unicode (it holds a lone surrogate such as \\ud800)"
    except ValueError as e:  # openai-harmony refusing the conversation it was given
        return f"the conversation cannot be rendered: {e}"
    except BaseException as e:  # a Rust panic in the tokenizer arrives as pyo3's PanicException, a BaseException
        if type(e).__name__ != "PanicException":
            raise
        return "the tokenizer cannot encode this text"


class Tokenizing:
    """Renders chat prompts and encodes text for the endpoints; `close()` ends the worker process."""

    def __init__(self, timeout_s: float = TOKENIZE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._pool: Pool | None = None

    async def render(self, size: int, messages: list[dict], tools: list[dict] | None, effort: str,
                     param: str, builtin_tools: tuple[str, ...] = ()) -> list[int]:
        """The harmony prompt of a conversation; `size` is the request body's length, `param` what a 400 names."""
        return await self._run(size, param, _render, messages, tools, effort, tuple(builtin_tools))

    async def encode(self, size: int, text: str, param: str) -> list[int]:
        return await self._run(size, param, _encode, text)

    async def _run(self, size: int, param: str, fn: Any, *args: Any) -> list[int]:
        if size <= INLINE_BYTES:
            out = _guarded(fn, *args)
        else:
            if self._pool is None:  # spawn: a fork of a process running the engine's threads is not safe
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            job = self._pool.apply_async(_guarded, (fn, *args))
            try:
                out = await asyncio.get_running_loop().run_in_executor(None, job.get, self.timeout_s)
            except multiprocessing.TimeoutError:
                self._replace_worker()
                raise APIError(400, f"the prompt could not be tokenized within {self.timeout_s:.0f} s (very long "
                                    "runs of text without spaces are slow to tokenize)", param) from None
        if isinstance(out, str):
            raise APIError(400, out, param)
        return out

    def _replace_worker(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def close(self) -> None:
        self._replace_worker()
