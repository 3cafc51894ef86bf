"""ossie against Hugging Face transformers on the same synthetic gpt-oss checkpoint (CPU, bf16, greedy).

    python benchmarks/vs_transformers.py --preset tiny
    python benchmarks/vs_transformers.py --preset mid     # the 20b's layer shapes, 4 of its 24 layers

Each engine runs in its own process (so peak RSS is its own) and reports load time, peak RSS, prefill and decode
tokens/s; the parent prints them side by side with the two engines' agreement on the first logits.
At the full 20b shape transformers does not fit this 24 GB machine: without its GPU kernels it dequantizes the
MXFP4 experts to bf16 at load, 24 x 32 experts x 24.9M weights x 2 bytes = 38 GB (ossie keeps them packed:
12.9 GB peak RSS, see README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ossie.special_tokens import N_ORDINARY


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ossie(folder: str, prompt: list[int], gen: int, runs: int) -> dict:
    import ossie

    t0 = time.perf_counter()
    llm = ossie.LLM(folder, dtype="bfloat16", progress=False)
    load = time.perf_counter() - t0
    prefill, decode, first = [], [], None
    for _ in range(runs + 1):
        cache = llm.runner.kv.new_cache(len(prompt) + gen)
        t0 = time.perf_counter()
        logits = llm.model.forward(torch.tensor(prompt), cache, last_only=True)[-1]
        t1 = time.perf_counter()
        first = logits.float() if first is None else first
        for _ in range(gen):
            logits = llm.model.forward(logits.argmax().view(1), cache, last_only=True)[-1]
        t2 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t0))
        decode.append(gen / (t2 - t1))
    return {"load_s": load, "prefill": prefill[1:], "decode": decode[1:], "first_logits": first.tolist()}


def run_transformers(folder: str, prompt: list[int], gen: int, runs: int) -> dict:
    from transformers import GptOssForCausalLM

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - t0
    prefill, decode, first = [], [], None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            logits = out.logits[0, -1]
            first = logits.float() if first is None else first
            past = out.past_key_values
            for _ in range(gen):
                out = model(logits.argmax().view(1, 1), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1]
            t2 = time.perf_counter()
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(gen / (t2 - t1))
    return {"load_s": load, "prefill": prefill[1:], "decode": decode[1:], "first_logits": first.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--dir", default=None, help="where the synthetic checkpoint goes (default /tmp/ossie-bench-PRESET)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--engine", choices=["ossie", "transformers"], help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    folder = Path(args.dir or f"/tmp/ossie-bench-{args.preset}")
    prompt = torch.randint(0, N_ORDINARY, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    if args.engine:
        fn = run_ossie if args.engine == "ossie" else run_transformers
        res = fn(str(folder), prompt, args.gen_tokens, args.runs)
        res["peak_rss_gib"] = peak_rss_gib()
        print(json.dumps(res))
        return
    if not (folder / "config.json").is_file():
        from ossie.model.config import PRESETS
        from ossie.synth import write_checkpoint

        cfg = PRESETS["tiny"] if args.preset == "tiny" else dataclasses.replace(PRESETS["20b"], num_layers=4,
                                                                                 layer_types=())
        write_checkpoint(folder, cfg, "hf", seed=0)
    results = {}
    for engine in ("ossie", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--dir", str(folder),
                              "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                              "--runs", str(args.runs), "--engine", engine], capture_output=True, text=True)
        if out.returncode:
            print(f"{engine} failed:\n{out.stderr[-2000:]}")
            return
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = (torch.tensor(results[e]["first_logits"]) for e in ("ossie", "transformers"))
    agree = float((a - b).norm() / b.norm())
    print(f"synthetic gpt-oss {args.preset} ({folder}), bf16, {args.prompt_tokens}-token prompt, "
          f"{args.gen_tokens} greedy tokens, medians of {args.runs} runs")
    print(f"{'':14s}{'load s':>10s}{'peak RSS GiB':>14s}{'prefill tok/s':>15s}{'decode tok/s':>14s}")
    for engine, r in results.items():
        print(f"{engine:14s}{r['load_s']:10.2f}{r['peak_rss_gib']:14.2f}{statistics.median(r['prefill']):15.1f}"
              f"{statistics.median(r['decode']):14.2f}")
    print(f"first-token logits: relative difference {agree:.2e} (bf16 rounding in two different orders)")


if __name__ == "__main__":
    main()
