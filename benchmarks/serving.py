"""Serving figures: an agent loop's time to first token with and without the prefix cache, and concurrent streams.

    python benchmarks/serving.py CHECKPOINT agent      # 6 rounds: a 1,000-token system+tools prompt growing by the
                                                       # previous completion (~100 tokens) and a tool result (~150)
    python benchmarks/serving.py CHECKPOINT chat       # 6 turns of a harmony chat (LLM.chat) with a long system
                                                       # prompt: harmony drops each answer's analysis, so reuse
                                                       # stops after the last user message
    python benchmarks/serving.py CHECKPOINT streams    # 1, 2, 4, 8, 16 greedy streams through the engine at once

agent: each round's prompt is the previous prompt, its completion and a tool result, as an agent framework sends
it; the time to the first token is measured with the prefix cache and without, and set against the time to
prefill only the round's new tokens (a fresh prompt of that length, measured in the same run). streams: aggregate
and per-stream decode rates (tokens after each stream's first, over the time from the first first token to the
last token). Every figure is printed with the read bandwidth measured beside it (GB/s), as `ossie bench` does.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from ossie import LLM
from ossie.bench import bytes_per_token, measure_bandwidth, peak_rss_gib
from ossie.chat import harmony
from ossie.engine import Engine, Finished, SamplingParams, Sequence, Token, stream
from ossie.special_tokens import N_ORDINARY


def random_tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, N_ORDINARY, (n,), generator=gen).tolist()


def first_token_s(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, list[int], int]:
    """(seconds to the first token, the completion, prompt tokens served from the cache)."""
    seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[]))
    t0 = time.perf_counter()
    tokens = stream(llm.runner, seq)
    out = [next(tokens)]
    ttft = time.perf_counter() - t0
    out += list(tokens)
    return ttft, out, seq.num_cached_tokens


def warm_up(llm: LLM) -> None:
    """The first pass over the weights pays their page faults: keep it out of the figures."""
    cache, llm.runner.kv.prefix_cache = llm.runner.kv.prefix_cache, None
    first_token_s(llm, list(range(1000, 1100)), 2)
    llm.runner.kv.prefix_cache = cache


def chat(llm: LLM, turns: int, completion: int) -> None:
    """Turns of a harmony chat: each prompt is rendered from the conversation so far, as a chat client sends it;
    the time to the first token is measured on the token stream (a random model's text may show no harmony
    channel until its end, so the parsed answer is not the measure)."""
    system = "You are a careful assistant for a shipping company. " * 90  # ~1,000 tokens
    questions = [f"Question {i}: where is container {1000 + i}, and when will it arrive? " * 3 for i in range(turns)]
    cache = llm.runner.kv.prefix_cache
    for mode in ("with the prefix cache", "without"):
        llm.runner.kv.prefix_cache = cache if mode.startswith("with ") else None
        if cache is not None:
            cache.clear()
        messages, rows = [{"role": "system", "content": system}], []
        for question in questions:
            messages.append({"role": "user", "content": question})
            bw = measure_bandwidth(llm.model.w.unembedding, repeats=3)
            prompt = llm.render(messages)
            ttft, out, cached = first_token_s(llm, prompt, completion)
            parser = harmony.ChatParser(prompt_tokens=len(prompt))
            for tok in out:
                parser.feed(tok)
            result = [d for d in parser.finish() if d.kind == "finish"][0].result
            rows.append((len(prompt), cached, ttft, bw))
            messages.append({"role": "assistant", "content": result.content or "(no answer)",
                             "reasoning_content": result.reasoning})
        print(f"harmony chat, {mode}:")
        print("turn  prompt  cached  first token  bandwidth")
        for i, (n, cached, ttft, bw) in enumerate(rows):
            print(f"{i + 1:4d} {n:7d} {cached:7d} {ttft:10.2f} s {bw:6.1f} GB/s")
    llm.runner.kv.prefix_cache = cache


def agent(llm: LLM, rounds: int, system: int, completion: int, tool: int) -> None:
    gen = torch.Generator().manual_seed(0)
    system_prompt = random_tokens(system, gen)
    tool_results = [random_tokens(tool, gen) for _ in range(rounds)]
    cache = llm.runner.kv.prefix_cache
    for mode in ("with the prefix cache", "without"):
        llm.runner.kv.prefix_cache = cache if mode.startswith("with ") else None
        if cache is not None:
            cache.clear()
        prompt, rows = list(system_prompt), []
        for r in range(rounds):
            bw = measure_bandwidth(llm.model.w.unembedding, repeats=3)
            ttft, out, cached = first_token_s(llm, prompt, completion)
            new = len(prompt) - cached
            fresh = ttft
            if cached:  # the time to prefill only the new tokens: a fresh prompt of that length (not cached)
                llm.runner.kv.prefix_cache = None
                fresh, _, _ = first_token_s(llm, random_tokens(new, gen), 1)
                llm.runner.kv.prefix_cache = cache
            rows.append((r + 1, len(prompt), cached, new, ttft, fresh, bw))
            prompt = prompt + out + tool_results[r]
        print(f"agent loop, {mode}:")
        print("round  prompt  cached  new   first token  new tokens alone  ratio  bandwidth")
        for r, n, cached, new, ttft, fresh, bw in rows:
            print(f"{r:5d} {n:7d} {cached:7d} {new:5d} {ttft:10.2f} s {fresh:14.2f} s {ttft / fresh:6.2f}x "
                  f"{bw:6.1f} GB/s")
    llm.runner.kv.prefix_cache = cache


def token_times(llm: LLM, prompts: list[list[int]], gen_tokens: int) -> list[list[float]]:
    """Run the prompts through one engine at once; when each stream's tokens came."""
    engine = Engine(llm.runner, max_running=len(prompts)).start()
    times: list[list[float]] = [[] for _ in prompts]
    done, finished = threading.Event(), []

    def on_event(i: int, event) -> None:
        if isinstance(event, Token):
            times[i].append(time.perf_counter())
        else:
            assert isinstance(event, Finished), event
            finished.append(i)
            if len(finished) == len(prompts):
                done.set()

    params = SamplingParams(max_tokens=gen_tokens, temperature=0, stop_token_ids=[])
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, params, None, lambda event, i=i: on_event(i, event))
    done.wait()
    engine.shutdown()
    return times


def streams(llm: LLM, counts: list[int], prompt_tokens: int, gen_tokens: int) -> None:
    """Aggregate decode rate: the tokens produced while every stream is decoding (after the last stream's first
    token), over that time; per stream: the same divided among the streams."""
    gen = torch.Generator().manual_seed(1)
    per_token = bytes_per_token(llm.config, llm.model.w, prompt_tokens + gen_tokens // 2)
    base = None
    print(f"concurrent streams ({prompt_tokens}-token prompts, {gen_tokens} greedy tokens each; one stream reads "
          f"{per_token / 1e9:.2f} GB a token):")
    print("streams  aggregate tok/s  per stream tok/s  vs one stream  bandwidth")
    for n in counts:
        bw = measure_bandwidth(llm.model.w.unembedding, repeats=3)
        times = token_times(llm, [random_tokens(prompt_tokens, gen) for _ in range(n)], gen_tokens)
        start = max(t[0] for t in times)  # every prompt read: all streams decoding
        end = max(t[-1] for t in times)
        aggregate = sum(1 for t in times for x in t if x > start) / (end - start)
        base = base or aggregate
        print(f"{n:7d} {aggregate:16.2f} {aggregate / n:17.2f} {aggregate / base:13.2f}x {bw:7.1f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("scenario", choices=["agent", "chat", "streams"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--completion-tokens", type=int, default=100)
    ap.add_argument("--tool-tokens", type=int, default=150)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    args = ap.parse_args()
    kwargs = {} if args.kv_cache_gb is None else {"kv_cache_gb": args.kv_cache_gb}
    llm = LLM(args.checkpoint, **kwargs)
    warm_up(llm)
    if args.scenario == "agent":
        agent(llm, args.rounds, args.system_tokens, args.completion_tokens, args.tool_tokens)
    elif args.scenario == "chat":
        chat(llm, args.rounds, args.completion_tokens)
    else:
        streams(llm, [int(n) for n in args.streams.split(",")], args.prompt_tokens, args.gen_tokens)
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
