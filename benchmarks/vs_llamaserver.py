"""`ossie serve` against llama.cpp's `llama-server` on the same weights, the two servers taking turns:

    python benchmarks/vs_llamaserver.py CHECKPOINT GGUF --llama-server PATH [--rounds 2]
    python benchmarks/vs_llamaserver.py CHECKPOINT GGUF --llama-server PATH --speculative [--gen-tokens 96]

Both are driven the same way, over HTTP with the OpenAI completions endpoint and token-id prompts (so both read
exactly the same tokens), greedy:
- resumed history: a 1,000-token history is sent once (to warm the prompt cache), then the history plus 150 new
  tokens: its time to the first token, against 150 new tokens alone;
- concurrent streams: 1 and 4 streams of 32 tokens at once: the aggregate decode rate (tokens after the last
  stream's first, over that time).
llama-server runs with 4 slots (`-np 4`, prompt cache on, as by default), 2 threads. Only one server runs at a time
(two 13 GB models do not fit this machine's memory together), and the read bandwidth is probed before each turn.
The GGUF: see benchmarks/vs_llamacpp.py.

--speculative: one greedy request decoding --gen-tokens tokens (its prompt read first, untimed: both servers reuse
it), each server plain and with its n-gram speculation (ossie `--speculative ngram`; llama-server `--spec-type
ngram-simple` and `ngram-mod`, their default settings), taking turns: decode tok/s, and the guesses drafted and
accepted as each server counts them (ossie's /metrics; llama-server's `timings`). A random-weight model's greedy
output falls into loops, which gives both something to guess from; every run's tokens must be the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import httpx
import torch

from ossie.special_tokens import N_ORDINARY

PORT = 8391


def start(command: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{command[0]} did not come up")


def stream_times(prompt: list[int], max_tokens: int) -> list[float]:
    """When each piece of a greedy streamed completion came, from the request's start."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, times = time.perf_counter(), []
    with httpx.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter() - t0)
    return times


def resumed_history(gen: torch.Generator) -> tuple[float, float]:
    history = torch.randint(0, N_ORDINARY, (1000,), generator=gen).tolist()
    new = torch.randint(0, N_ORDINARY, (150,), generator=gen).tolist()
    stream_times(history, 1)
    resumed = stream_times(history + new, 1)[0]
    alone = stream_times(torch.randint(0, N_ORDINARY, (150,), generator=gen).tolist(), 1)[0]
    return resumed, alone


def streams(n: int, gen: torch.Generator) -> float:
    prompts = [torch.randint(0, N_ORDINARY, (64,), generator=gen).tolist() for _ in range(n)]
    results: list[list[float]] = [[] for _ in range(n)]
    t0 = time.perf_counter()

    def run(i: int) -> None:
        start_i = time.perf_counter() - t0
        results[i] = [start_i + t for t in stream_times(prompts[i], 32)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    begin = max(r[0] for r in results)
    end = max(r[-1] for r in results)
    return sum(1 for r in results for x in r if x > begin) / (end - begin)


def bandwidth(checkpoint: str) -> float:
    code = (f"from ossie import LLM, bench; llm = LLM({checkpoint!r}, progress=False); "
            "print(bench.measure_bandwidth(llm.model.w.unembedding))")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def decode_run(prompt: list[int], gen_tokens: int) -> tuple[float, list[int], dict]:
    """One greedy completion after its prompt was read (a 1-token request first): decode tok/s, its tokens (as
    the server's logprobs-free text is not comparable, the token ids it reports) and the server's timings."""
    body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": 1}
    httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=600).raise_for_status()
    body.update(max_tokens=gen_tokens, return_tokens=True)
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=1200)
    took = time.perf_counter() - t0
    r.raise_for_status()
    out = r.json()
    return gen_tokens / took, out["choices"][0].get("text", ""), out.get("timings", {})


def speculative(args: argparse.Namespace) -> None:
    ossie = [sys.executable, "-m", "ossie", "serve", args.checkpoint, "--port", str(PORT), "--threads", "2",
             "--served-model-name", "m"]
    llama = [args.llama_server, "-m", args.gguf, "-np", "1", "-t", "2", "-c", "4096", "--port", str(PORT),
             "--host", "127.0.0.1"]
    servers = {"ossie": ossie, "ossie ngram": ossie + ["--speculative", "ngram"], "llama.cpp": llama,
               "llama.cpp ngram-simple": llama + ["--spec-type", "ngram-simple"],
               "llama.cpp ngram-mod": llama + ["--spec-type", "ngram-mod"]}
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, N_ORDINARY, (64,), generator=gen).tolist()
    rates: dict[str, list[float]] = {name: [] for name in servers}
    texts: dict[str, str] = {}
    for r in range(args.rounds):
        for name, command in servers.items():
            proc = start(command)
            try:
                before = metrics() if name.startswith("ossie") else {}
                rate, text, timings = decode_run(prompt, args.gen_tokens)
                after = metrics() if name.startswith("ossie") else {}
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            rates[name].append(rate)
            texts.setdefault(name.split()[0], text)
            if name.startswith("ossie"):
                drafted = after.get("ossie_spec_decode_num_draft_tokens_total", 0) - \
                    before.get("ossie_spec_decode_num_draft_tokens_total", 0)
                accepted = after.get("ossie_spec_decode_num_accepted_tokens_total", 0) - \
                    before.get("ossie_spec_decode_num_accepted_tokens_total", 0)
            else:
                drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
            same = "same text" if text == texts[name.split()[0]] else "OTHER TEXT"
            print(f"round {r + 1} {name:22s} decode {rate:5.2f} tok/s, guesses accepted {accepted:.0f} of "
                  f"{drafted:.0f} ({same} as its plain run)", flush=True)
    for name, got in rates.items():
        print(f"{name:22s} median decode {statistics.median(got):5.2f} tok/s")


def metrics() -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=10).text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and line[0] != "#")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("gguf")
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--speculative", action="store_true", help="compare n-gram speculative decoding (above)")
    ap.add_argument("--gen-tokens", type=int, default=96)
    args = ap.parse_args()
    if args.speculative:
        return speculative(args)
    servers = {
        "ossie": [sys.executable, "-m", "ossie", "serve", args.checkpoint, "--port", str(PORT), "--threads", "2",
                  "--served-model-name", "m"],
        "llama.cpp": [args.llama_server, "-m", args.gguf, "-np", "4", "-t", "2", "-c", "16384", "--port", str(PORT),
                      "--host", "127.0.0.1"],
    }
    results: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    for r in range(args.rounds):
        for name, command in servers.items():
            bw = bandwidth(args.checkpoint)
            proc = start(command)
            try:
                gen = torch.Generator().manual_seed(r)
                stream_times(torch.randint(0, N_ORDINARY, (16,), generator=gen).tolist(), 4)  # warm up
                resumed, alone = resumed_history(gen)
                one, four = streams(1, gen), streams(4, gen)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            got = {"resumed": resumed, "alone": alone, "ratio": resumed / alone, "one": one, "four": four,
                   "four/one": four / one}
            for k, v in got.items():
                results[name].setdefault(k, []).append(v)
            print(f"round {r + 1} {name:9s} bandwidth {bw:5.1f} GB/s  history+150 first token {resumed:6.2f} s, "
                  f"150 alone {alone:6.2f} s ({resumed / alone:.2f}x)  1 stream {one:5.2f} tok/s, 4 streams "
                  f"{four:5.2f} tok/s ({four / one:.2f}x)", flush=True)
    for name, got in results.items():
        print(f"{name:9s} medians: resumed/alone {statistics.median(got['ratio']):.2f}x, 1 stream "
              f"{statistics.median(got['one']):.2f} tok/s, 4 streams {statistics.median(got['four']):.2f} tok/s "
              f"({statistics.median(got['four/one']):.2f}x)")


if __name__ == "__main__":
    main()
