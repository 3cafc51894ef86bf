"""`ossie serve` attacked as an exposed server would be, on 127.0.0.1 only: fuzzed requests (bodies, paths of both
APIs, content types), concurrent streams, clients that leave mid-stream, more requests at once than it queues,
and prompts that are slow to tokenize sent beside ordinary ones. Prints the requests sent, 2xx/4xx/5xx, the
latency percentiles, the server's RSS before and after, and what is still running at the end (nothing should be).

    python benchmarks/server_load.py /tmp/tiny                       # starts `ossie serve /tmp/tiny` itself
    python benchmarks/server_load.py /tmp/tiny --serve-args "--max-queued 8"
    python benchmarks/server_load.py --url http://127.0.0.1:8000     # a server already running (loopback only)

A client error must never be a 5xx, and a client that leaves must leave nothing behind.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx

VALID = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 8},
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 8},
    "/v1/responses": {"input": "Say something", "max_output_tokens": 8},
    "/api/chat": {"messages": [{"role": "user", "content": "Say something"}], "options": {"num_predict": 8}},
    "/api/generate": {"prompt": "Say something", "options": {"num_predict": 8}, "stream": False},
}
# what clients send as Content-Type: curl -d sends the form type, some send none (all must be read as JSON)
CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", None,
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"]
NASTY_VALUES = [None, True, -1, 0, 2**64, -(2**63) - 1, 1e308, "16", "yes", "", "\ud800", "x" * 20_000, [], {},
                [None], {"type": 5}, [{"type": "function", "function": "x"}], "<|call|>", {"a": [1, {"b": None}]}]
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "max_output_tokens", "temperature", "top_p", "seed",
          "stream", "stop", "tools", "tool_choice", "response_format", "text", "instructions", "reasoning", "n"]


def fuzzed(rng: random.Random, model: str) -> tuple[str, bytes, bool, int, str | None]:
    path = rng.choice(list(VALID))
    body = {"model": model, **VALID[path]}
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.2:
            body.pop(field, None)
        else:
            body[field] = rng.choice(NASTY_VALUES)
    text = json.dumps(body)
    if rng.random() < 0.1:  # broken JSON
        text = text[: rng.randint(0, len(text))]
    return path, text.encode("utf-8", "surrogatepass"), False, 0, rng.choice(CONTENT_TYPES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="checkpoint folder to serve (or --url)")
    p.add_argument("--url", help="a running server on 127.0.0.1")
    p.add_argument("--serve-args", default="", help="extra options for ossie serve")
    p.add_argument("--fuzz", type=int, default=300, help="fuzzed requests")
    p.add_argument("--streams", type=int, default=32, help="concurrent valid streaming requests")
    p.add_argument("--disconnects", type=int, default=30, help="streams closed after their first chunks")
    p.add_argument("--overload", type=int, default=200, help="requests sent at once at the end")
    p.add_argument("--hostile", type=int, default=2,
                   help="540,000-character prompts without spaces (slow to tokenize), each with 5 ordinary 10 KB "
                        "chats sent a second later: those must all be answered")
    p.add_argument("--rounds", type=int, default=3, help="times to repeat it all (RSS after each: no growth)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    proc, model = None, "load-test"
    if args.url:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url must be a loopback address")
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    elif args.model:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_file = tempfile.TemporaryFile(mode="w+")  # not a pipe: unread, it would fill up and stall the server
        proc = subprocess.Popen([sys.executable, "-m", "ossie", "serve", args.model, "--port", str(port),
                                 "--served-model-name", model, *shlex.split(args.serve_args)],
                                stdout=log_file, stderr=subprocess.STDOUT, text=True)
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            p.error("the server did not come up")
    else:
        p.error("give a checkpoint folder or --url")

    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def record(status: int | str, seconds: float) -> None:
        with lock:
            key = status if isinstance(status, str) else "429" if status == 429 else f"{status // 100}xx"
            statuses[key] += 1
            latencies.append(seconds)

    def send(path: str, content: bytes, stream: bool = False, leave_after: int = 0,
             content_type: str | None = "application/json") -> int | str:
        t0 = time.perf_counter()
        try:
            with httpx.stream("POST", url + path, content=content, timeout=300,
                              headers={"content-type": content_type} if content_type else {}) as r:
                lines = 0
                for line in r.iter_lines():
                    lines += bool(line.strip())
                    if leave_after and lines >= leave_after:
                        break  # the client leaves
                record(r.status_code, time.perf_counter() - t0)
                return r.status_code
        except httpx.HTTPError as e:
            record(type(e).__name__, time.perf_counter() - t0)
            return type(e).__name__

    ordinary: Counter[str] = Counter()

    def hostile_round() -> None:
        """One hostile prompt, and five ordinary large chats a second later (each over the 8 KiB that is tokenized
        inline): the hostile one may fail, the ordinary ones must not."""
        huge = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * 540_000}],
                           "max_tokens": 1}).encode()
        large = json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * 2_000}],
                            "max_tokens": 1}).encode()
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(send, "/v1/chat/completions", huge)
            time.sleep(1)
            for status in pool.map(lambda _: send("/v1/chat/completions", large), range(5)):
                ordinary[str(status)] += 1
            first.result()

    pid = proc.pid if proc else None
    rss_before = rss_mib(pid)
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    stream_body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell a story"}],
                              "max_tokens": 64, "stream": True}).encode()
    # text completions stream every token (a random model's chat output may hold its text back to the end)
    leaving_body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 2000,
                               "stream": True}).encode()
    short = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    for round_ in range(1, args.rounds + 1):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda job: send(*job), [fuzzed(rng, model) for _ in range(args.fuzz)]))
        for path, body, count, leave_after in (("/v1/chat/completions", stream_body, args.streams, 0),
                                               ("/v1/completions", leaving_body, args.disconnects, 3)):
            with ThreadPoolExecutor(max(1, count)) as pool:
                list(pool.map(lambda _, p=path, b=body, n=leave_after: send(p, b, True, n), range(count)))
        with ThreadPoolExecutor(max(1, args.overload)) as pool:
            list(pool.map(lambda _: send("/v1/chat/completions", short), range(args.overload)))
        for _ in range(args.hostile):
            hostile_round()
        rss = rss_mib(pid)
        print(f"round {round_}: {dict(sorted(statuses.items()))}" + (f", server RSS {rss:.0f} MiB" if rss else ""))
    elapsed = time.perf_counter() - t_start
    health = {}
    for _ in range(100):  # the server settles: nothing running or waiting once every client is gone
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.1)
    rss_after = rss_mib(pid)
    sent = sum(statuses.values())
    print(f"sent {sent} requests in {elapsed:.1f} s: {dict(sorted(statuses.items()))}")
    if args.hostile:
        print(f"ordinary large chats sent beside hostile prompts: {dict(ordinary)} (all must be 200)")
    print(f"latency p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s, "
          f"mean {statistics.fmean(latencies):.2f} s")
    print(f"at the end: running {health.get('running')}, waiting {health.get('waiting')}, "
          f"cancelled {health.get('cancelled')}, failed {health.get('failed')}, "
          f"KV bytes of running requests {health.get('kv_running_bytes')}")
    if rss_before is not None:
        print(f"server RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=60)
        log_file.seek(0)
        log = log_file.read()
        tracebacks = log.count("Traceback")
        print(f"server log: {tracebacks} tracebacks")
        if tracebacks:
            at = log.index("Traceback")
            print(log[max(0, at - 300):at + 3000])
    return 1 if statuses.get("5xx") or set(ordinary) - {"200"} else 0


if __name__ == "__main__":
    sys.exit(main())
