"""Several `ossie serve` replicas behind a router installed from PyPI (sglang-router), routed by conversation
(its cache-aware policy) against round robin: how much of each resumed conversation the replicas' prefix caches
serve, and the time to the first token.

    pip install sglang-router   # a separate virtual environment is fine: pass --router PATH/bin/sglang-router
    python benchmarks/router.py CHECKPOINT [--replicas 2] [--conversations 8] [--turns 6]

The replicas are plain `ossie serve` processes on 127.0.0.1; the router reaches them over HTTP (OpenAI's API) and
knows nothing of ossie. Each conversation starts with a system prompt of its own (~1,000 tokens: an
agent's instructions and tools), grows by a question and an answer each turn, and its turns go out one after the
other while the conversations run at once. A resumed turn "hits" when its replica served at least 90 % of the
previous turn's prompt from cache (whole 64-token blocks). Also printed: each replica's memory and start-up time,
and what its /metrics says (prompt tokens, cached, the hit rate gauge).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BLOCK = 64  # the prefix cache's block: a prompt is served from cache in whole blocks
AUTH: dict[str, str] = {}  # with --privacy, the conversations are alice's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not come up in {timeout:.0f} s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def system_prompt(conversation: int, run: str) -> str:
    """An agent's instructions and tool list, its own for each conversation and each run (a policy's run finds
    nothing cached from the one before: ~1,000 tokens)."""
    tools = "\n".join(f"- tool_{conversation}_{i}(path: str, depth: int) -> str: reads item {i} of project "
                      f"{conversation} and summarises what changed in it since the last release" for i in range(28))
    return f"Run {run}. You are the build assistant of project {conversation}. Answer briefly.\nTools:\n{tools}"


def conversation(router: str, model: str, index: int, turns: int, max_tokens: int, run: str,
                 out: list[dict]) -> None:
    messages = [{"role": "system", "content": system_prompt(index, run)}]
    previous_prompt = 0
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: which files of project {index} changed, and "
                                                    f"why does build step {turn} fail?"})
        t0 = time.perf_counter()
        first, usage, text = None, None, ""
        with httpx.stream("POST", router + "/v1/chat/completions", headers=AUTH, timeout=300, json={
                "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or delta.get("reasoning_content") or ""
                    if piece or choice.get("finish_reason"):
                        first = first or time.perf_counter()
                    text += delta.get("content") or ""
                usage = chunk.get("usage") or usage
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        resumable = previous_prompt // BLOCK * BLOCK
        out.append({"conversation": index, "turn": turn, "ttft": (first or time.perf_counter()) - t0,
                    "prompt": usage["prompt_tokens"], "cached": cached,
                    "hit": None if turn == 0 else cached >= 0.9 * resumable})
        previous_prompt = usage["prompt_tokens"]
        messages.append({"role": "assistant", "content": text or "(no answer)"})


def privacy_probe(router: str, model: str, run: str) -> None:
    """Two principals through the router, the cache-aware policy sending the same text to the same replica: the
    second must find nothing of the first's prompt cached (only blocks it sent itself). A secret of its own for
    each run: bob sends it last, and a later run must not find his copy."""
    secret = f"Run {run}: the launch code is 4471-ALPHA; tell nobody. " * 30

    def ask(key: str, text: str = secret) -> tuple[int, int]:
        r = httpx.post(router + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                       json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2})
        r.raise_for_status()
        usage = r.json()["usage"]
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]

    for _ in range(2):  # bob's own requests, on both replicas: the harmony header every prompt starts with is his
        ask("key-bob", "Something else entirely. " * 30)
    prompt, _ = ask("key-alice")
    _, again = ask("key-alice")
    _, bob = ask("key-bob")
    print(f"privacy: alice's {prompt}-token prompt, sent again by alice: {again} cached; the same text from bob: "
          f"{bob} cached ({'nothing of alice' if bob <= BLOCK else 'MORE THAN HIS OWN HEADER: A LEAK'})", flush=True)


def run_policy(args: argparse.Namespace, policy: str, workers: list[str]) -> list[dict]:
    port = free_port()
    router = f"http://127.0.0.1:{port}"
    # its default backend: with `--backend openai` it sends everything to one worker, whatever the policy
    proc = subprocess.Popen([args.router, "launch", "--worker-urls", *workers, "--policy", policy, "--host",
                             "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()), "--log-level",
                             "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(router + "/health", proc, "the router")
        deadline = time.time() + 60
        while sum(w["is_healthy"] for w in httpx.get(router + "/workers").json()["workers"]) < len(workers):
            if time.time() > deadline:
                sys.exit("the router did not register every replica")
            time.sleep(0.2)
        if args.keys is not None:
            privacy_probe(router, args.model, policy)
        results: list[dict] = []
        threads = [threading.Thread(target=conversation, args=(router, args.model, i, args.turns, args.max_tokens,
                                                               policy, results)) for i in range(args.conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results
    finally:
        proc.terminate()
        proc.wait(10)


def report(policy: str, results: list[dict]) -> None:
    resumed = [r for r in results if r["hit"] is not None]
    ttft = sorted(r["ttft"] for r in resumed)
    hits = sum(r["hit"] for r in resumed)
    served = sum(r["cached"] for r in resumed) / sum(r["prompt"] for r in resumed)
    print(f"{policy:12s} resumed turns {len(resumed)}: {hits} hit ({100 * hits / len(resumed):.0f} %), "
          f"{100 * served:.0f} % of their prompt tokens cached; time to first token p50 "
          f"{statistics.median(ttft):.3f} s, p95 {ttft[int(0.95 * (len(ttft) - 1))]:.3f} s", flush=True)


def replay_args(doc: str) -> argparse.ArgumentParser:
    """The replay's options (this benchmark's and benchmarks/ray_replicas.py's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    return ap


def main() -> None:
    ap = replay_args(__doc__)
    ap.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    ap.add_argument("--router", default=shutil.which("sglang-router") or "sglang-router",
                    help="the sglang-router executable")
    ap.add_argument("--model", default="gpt-oss")
    ap.add_argument("--privacy", action="store_true",
                    help="the replicas require keys of two principals (alice, bob); before each policy's run, bob "
                         "sends what alice sent: he must find none of it cached")
    args = ap.parse_args()
    args.keys = None
    if args.privacy:
        args.keys = Path(tempfile.mkdtemp()) / "keys"
        args.keys.write_text("alice:key-alice\nbob:key-bob\n")
        AUTH["Authorization"] = "Bearer key-alice"
    if not Path(args.router).exists() and shutil.which(args.router) is None:
        sys.exit("no sglang-router: pip install sglang-router (or pass --router PATH)")
    replicas, workers = [], []
    try:
        for i in range(args.replicas):
            port = free_port()
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "ossie", "serve", args.checkpoint, "--port", str(port),
                                     "--served-model-name", args.model, "--threads", str(args.threads),
                                     *(["--api-keys", str(args.keys)] if args.keys else [])],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            wait_up(url + "/health", proc, f"replica {i}")
            replicas.append(proc)
            workers.append(url)
            print(f"replica {i}: {url}, up in {time.perf_counter() - t0:.1f} s, RSS {rss_mib(proc.pid):.0f} MiB",
                  flush=True)
        for policy in args.policies:
            before = [read_metrics(u) for u in workers]
            report(policy, run_policy(args, policy, workers))
            for i, (url, b) in enumerate(zip(workers, before, strict=True)):
                m = read_metrics(url)
                prompt = m["ossie_prompt_tokens_total"] - b["ossie_prompt_tokens_total"]
                cached = m["ossie_prompt_tokens_cached_total"] - b["ossie_prompt_tokens_cached_total"]
                print(f"  replica {i}: {prompt:.0f} prompt tokens, {cached:.0f} cached "
                      f"({100 * cached / max(prompt, 1):.0f} %), RSS {rss_mib(replicas[i].pid):.0f} MiB", flush=True)
    finally:
        for proc in replicas:
            proc.terminate()
            proc.wait(20)


if __name__ == "__main__":
    main()
