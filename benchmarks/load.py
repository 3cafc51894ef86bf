"""Load test for `ossie serve`: N concurrent streaming clients; requests/s, latency percentiles, time to the first
text (reasoning, content or tool call) a user sees.

    ossie serve ./gpt-oss-tiny --served-model-name tiny &
    python benchmarks/load.py --url http://127.0.0.1:8000 --model tiny --clients 8 --requests 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def one(http: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}: say something."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if first is None and any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
                first = time.perf_counter() - t0  # the first token the user sees (not the role chunk)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - t0, first or 0.0, tokens


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results: list[tuple[float, float, int]] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while not queue.empty():
                results.append(await one(http, args.url, args.model, queue.get_nowait(), args.max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    tokens = sum(r[2] for r in results)
    print(f"{len(results)} requests, {args.clients} concurrent clients, max_tokens {args.max_tokens}: "
          f"{len(results) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s")
    print(f"latency      p50 {statistics.median(lat) * 1e3:.0f} ms, p99 {pct(lat, 0.99) * 1e3:.0f} ms")
    print(f"first token  p50 {statistics.median(ttft) * 1e3:.0f} ms, p99 {pct(ttft, 0.99) * 1e3:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
