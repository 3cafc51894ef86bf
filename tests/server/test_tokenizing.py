"""The server's tokenizing workers: each request's own time limit, counted from when a worker starts on it; one
client's slow prompt never fails another's; one client holds at most its share of the workers.

The jobs here are `time.sleep` (a picklable stand-in for a prompt that is slow to tokenize): what is checked is
which requests succeed and which fail, never how long they took."""

import asyncio
import time

import pytest

from ossie.server.protocol import APIError
from ossie.server.tokenizing import Tokenizing


async def job(tok: Tokenizing, client: str, seconds: float, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    try:
        await tok.in_worker(client, "messages", time.sleep, seconds)
        return "ok"
    except APIError as e:
        assert e.status == 400 and "could not be tokenized within" in e.message
        return "timeout"


async def warm(tok: Tokenizing, n: int) -> None:
    """Start n workers first (a process takes a while to start; that is not what these tests are about)."""
    await asyncio.gather(*(tok.in_worker(f"warm{i}", "messages", time.sleep, 0.5) for i in range(n)))


def run(coro):
    return asyncio.run(coro)


def test_a_slow_prompt_fails_alone():
    """One hostile prompt, then five ordinary ones a moment later: before, they waited behind it under a limit that
    counted the wait, and a timeout killed the whole queue, so all six failed."""
    async def scenario():
        tok = Tokenizing(timeout_s=2.0, workers=2, per_client=1)
        try:
            await warm(tok, 2)
            return await asyncio.gather(job(tok, "evil", 60), *(job(tok, f"user{i}", 0.3, delay=0.2)
                                                                 for i in range(5)))
        finally:
            tok.close()

    assert run(scenario()) == ["timeout"] + ["ok"] * 5


def test_each_limit_counts_from_its_own_start():
    """Three requests of 1.2 s each on one worker under a 2 s limit: each waits for the one before, and each
    succeeds (a limit counting the wait failed the third)."""
    async def scenario():
        tok = Tokenizing(timeout_s=2.0, workers=1, per_client=1)
        try:
            await warm(tok, 1)
            return await asyncio.gather(*(job(tok, f"user{i}", 1.2) for i in range(3)))
        finally:
            tok.close()

    assert run(scenario()) == ["ok"] * 3


def test_one_client_holds_at_most_its_share():
    """A client sending several slow prompts at once holds one worker; another client's prompt gets the other at
    once and is done while the first client's are still in line."""
    async def scenario():
        tok = Tokenizing(timeout_s=1.5, workers=2, per_client=1)
        done = []

        async def timed(name, *args, **kw):
            result = await job(tok, *args, **kw)
            done.append(name)
            return result

        try:
            await warm(tok, 2)
            results = await asyncio.gather(*(timed(f"evil{i}", "evil", 60) for i in range(3)),
                                           timed("user", "user", 0.3, delay=0.2))
            return results, done
        finally:
            tok.close()

    results, done = run(scenario())
    assert results == ["timeout"] * 3 + ["ok"]
    assert done[0] == "user"  # it did not wait behind the hostile client's line


def test_a_worker_that_dies_fails_its_request_only():
    import os

    async def scenario():
        tok = Tokenizing(timeout_s=10.0, workers=1)
        try:
            with pytest.raises(APIError) as e:
                await tok.in_worker("a", "prompt", os._exit, 1)  # as the tokenizer aborting the process would
            assert e.value.status == 400
            await tok.in_worker("b", "prompt", time.sleep, 0)  # a fresh worker serves the next
        finally:
            tok.close()

    run(scenario())
