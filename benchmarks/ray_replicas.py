"""ossie's replicas on Ray Serve (`ossie serve --replicas`), routed by conversation (ossie.replicas.router) against
Ray Serve's own router (power of two choices): the agent replay of benchmarks/router.py through one address: how
much of each resumed conversation the replicas' prefix caches serve, and the time to the first token.

    pip install -e ".[ray]"
    python benchmarks/ray_replicas.py CHECKPOINT [--replicas 2] [--conversations 8] [--turns 6] [--privacy]

A local Ray cluster on 127.0.0.1; each replica takes --threads CPUs. Each conversation starts with a system prompt of
its own (~1,000 tokens), grows by a question and an answer each turn, and its turns go out one after the other
while the conversations run at once. A resumed turn "hits" when at least 90 % of the previous turn's prompt came
from the cache. Also printed: the start-up time, and the memory of each replica process and of the ingress.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router as replay  # noqa: E402  (benchmarks/router.py: the same conversations, hits and report)


def processes(kind: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(f"ServeReplica:ossie:{kind}" in part for part in p.info["cmdline"] or ())]


def main() -> None:
    ap = replay.replay_args(__doc__)
    ap.add_argument("--routers", nargs="+", default=["conversation", "pow2"])
    ap.add_argument("--privacy", action="store_true",
                    help="keys of two principals (alice, bob); before each run, bob sends what alice sent: he must "
                         "find none of it cached")
    args = ap.parse_args()

    import ray
    from ray import serve

    from ossie.engine_args import EngineArgs
    from ossie.replicas import ReplicaOptions, build_app
    from ossie.server import ServerOptions

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    keys = {"key-alice": "alice", "key-bob": "bob"} if args.privacy else {}
    if args.privacy:
        replay.AUTH["Authorization"] = "Bearer key-alice"
    port = replay.free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.replicas * args.threads, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineArgs(args.checkpoint, num_threads=args.threads)
        for policy in args.routers:
            t0 = time.perf_counter()
            serve.run(build_app(engine, ["gpt-oss"], ServerOptions(api_keys=keys),
                                ReplicaOptions(replicas=args.replicas, router=policy)), name="ossie", route_prefix="/")
            print(f"{policy}: {args.replicas} replicas up in {time.perf_counter() - t0:.1f} s; RSS per replica "
                  f"{', '.join(f'{replay.rss_mib(p):.0f}' for p in processes('OssieEngine'))} MiB, ingress "
                  f"{', '.join(f'{replay.rss_mib(p):.0f}' for p in processes('OssieIngress'))} MiB", flush=True)
            if args.privacy:
                replay.privacy_probe(url, "gpt-oss", policy)
            results: list[dict] = []
            threads = [threading.Thread(target=replay.conversation, args=(url, "gpt-oss", i, args.turns,
                                                                         args.max_tokens, policy, results))
                       for i in range(args.conversations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            replay.report(policy, results)
            missed = [(r["conversation"], r["turn"], r["prompt"], r["cached"]) for r in results if r["hit"] is False]
            if missed:
                print(f"  missed (conversation, turn, prompt tokens, cached): {sorted(missed)}", flush=True)
            print(f"  RSS after the run: per replica "
                  f"{', '.join(f'{replay.rss_mib(p):.0f}' for p in processes('OssieEngine'))} MiB, ingress "
                  f"{', '.join(f'{replay.rss_mib(p):.0f}' for p in processes('OssieIngress'))} MiB", flush=True)
            health = httpx.get(url + "/health", headers=replay.AUTH).json()
            print(f"  through the ingress: {health['prompt_tokens']} prompt tokens, {health['cached_prompt_tokens']} "
                  f"cached, {health['failed']} failed", flush=True)
            serve.delete("ossie")  # the next router starts from cold caches
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
