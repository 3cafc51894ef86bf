"""Where a decode step's time goes on the CPU: the attention blocks, the MoE blocks and the unembedding of a greedy
decode, each in milliseconds a token and as the bytes it reads per second, beside the read bandwidth measured
between the rounds. Optionally alternates builds of the C kernels in one process, so that their comparison sees
the same minutes of a machine whose bandwidth drifts.

    python benchmarks/decode_parts.py /tmp/m20b                     # exact mode
    python benchmarks/decode_parts.py /tmp/m20b --quantization q8
    python benchmarks/decode_parts.py /tmp/m20b --builds A/_kernels*.so B/_kernels*.so   # A against B

Each build is a copy of ossie/_kernels*.so kept in its own folder (named after the folder). The builds take turns
every --segment tokens of one sequence, starting with a different one each round.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import time
from pathlib import Path

import torch

import ossie
from ossie import SamplingParams
from ossie.backends import cpu_kernels
from ossie.bench import measure_bandwidth
from ossie.engine.sequence import Sequence
from ossie.special_tokens import N_ORDINARY

PARTS = {"attention blocks": "attention_block_one_token", "MoE blocks": "moe", "unembedding": None}


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("ossie._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_bytes(llm: ossie.LLM) -> dict[str, int]:
    """Bytes each part reads per token: the attention block's weights (norms, projections, router), k of the
    experts' packed weights per layer, and the unembedding (at a short context the KV cache is negligible)."""
    cfg, w = llm.config, llm.model.w
    share = cfg.experts_per_token / cfg.num_experts
    attn = moe = 0
    for lw in w.layers:
        for name, t in vars(lw).items():
            if name.startswith(("w1_", "w2_")):
                moe += int(t.nbytes * share)
            elif hasattr(t, "nbytes"):
                attn += t.nbytes
    return {"attention blocks": attn, "MoE blocks": moe, "unembedding": w.unembedding.nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--quantization", choices=["q8"], default=None)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--segment", type=int, default=8, help="tokens each build decodes before the next takes over")
    p.add_argument("--builds", nargs="*", default=[], help="kernel builds (.so files) to alternate")
    args = p.parse_args()
    builds = [(Path(b).parent.name, load_build(b)) for b in args.builds] or [("this build", cpu_kernels._kernels)]
    llm = ossie.LLM(args.checkpoint, quantization=args.quantization, enable_prefix_caching=False)
    for _, module in builds:
        module.set_threads(cpu_kernels.kernel_threads())

    times: dict[tuple[str, str], float] = collections.defaultdict(float)
    current = [builds[0][0]]

    def timed(name: str, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[current[0], name] += time.perf_counter() - t0
            return out
        return run

    originals = {name: getattr(cpu_kernels, fn) for name, fn in PARTS.items() if fn}
    for name, fn in PARTS.items():
        if fn:
            setattr(cpu_kernels, fn, timed(name, originals[name]))
    # the unembedding is the decode step's one product outside the two blocks
    for fn in ("bf16_matmul", "q8_matmul"):
        setattr(cpu_kernels, fn, timed("unembedding", getattr(cpu_kernels, fn)))

    runner, gen = llm.runner, torch.Generator().manual_seed(0)
    unembedding = llm.model.w.unembedding
    resident = unembedding if isinstance(unembedding, torch.Tensor) else unembedding.values
    tokens: collections.Counter[str] = collections.Counter()
    bandwidth = []
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up (first touch of the weights' pages)
            prompt = torch.randint(0, N_ORDINARY, (64,), generator=gen).tolist()
            steps = args.segment * len(builds) * 2
            seq = Sequence(prompt, SamplingParams(max_tokens=steps + 1, temperature=0, stop_token_ids=[]))
            (tok,) = runner.run([seq])
            seq.append(tok)
            for seg in range(2 * len(builds)):
                name, module = builds[(seg + rnd) % len(builds)]
                cpu_kernels._kernels, current[0] = module, name
                for _ in range(args.segment):
                    t0 = time.perf_counter()
                    seq.append(runner.run([seq])[0])
                    if rnd:
                        times[name, "step"] += time.perf_counter() - t0
                        tokens[name] += 1
            runner.kv.free(seq)
            if rnd == 0:
                times.clear()
            else:
                bandwidth.append(measure_bandwidth(resident, repeats=3))
    finally:
        for name, fn in PARTS.items():
            if fn:
                setattr(cpu_kernels, fn, originals[name])

    nbytes = part_bytes(llm)
    bw = statistics.median(bandwidth)
    print(f"{llm.path} ({'q8' if args.quantization else 'exact'} mode), {cpu_kernels.kernel_threads()} threads; "
          f"read bandwidth {bw:.1f} GB/s (median of {len(bandwidth)}: {min(bandwidth):.1f}-{max(bandwidth):.1f})")
    for name, _ in builds:
        n = tokens[name]
        print(f"{name}: {1000 * times[name, 'step'] / n:.2f} ms a token ({n} tokens)")
        for part, size in nbytes.items():
            t = times[name, part] / n
            print(f"  {part:<17} {1000 * t:6.2f} ms  {size / 1e9:.3f} GB  {size / t / 1e9:5.1f} GB/s "
                  f"({size / t / 1e9 / bw:.0%} of the bandwidth)")


if __name__ == "__main__":
    main()
