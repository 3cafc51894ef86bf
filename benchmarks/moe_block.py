"""One MoE block of a prompt at the 20b's shapes (32 experts, 4 a token, hidden and expert width 2,880), in the exact
mode (float32 products) and in the q8 mode (int8 dot products, csrc/x86_q8_prompts.c), on each kernel path asked for,
beside the float32 matmul rate torch measures on this machine in the same run:

    python benchmarks/moe_block.py [--paths avx2,avxvnni] [--tokens 8,64,512] [--threads 2]

Random MXFP4 experts (no checkpoint needed) and routing (each token's 4 experts drawn at random: ~T/8 tokens an
expert, as the synthetic checkpoint's router gives). Each figure is the best of --reps calls after a warm-up;
GFLOP/s counts 2 x the multiply-adds of the tokens' chosen experts.
"""

from __future__ import annotations

import argparse
import time

import torch

from ossie.backends import cpu_kernels as kernels
from ossie.bench import measure_matmul_flops

E, H, INTER, K = 32, 2880, 2880, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=None, help="kernel paths, comma-separated (default: the best this CPU has)")
    ap.add_argument("--tokens", default="8,64,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    w1b = torch.randint(0, 256, (E, 2 * INTER, H // 32, 16), dtype=torch.uint8, generator=gen)
    w1s = torch.randint(118, 126, (E, 2 * INTER, H // 32), dtype=torch.uint8, generator=gen)
    w2b = torch.randint(0, 256, (E, H, INTER // 32, 16), dtype=torch.uint8, generator=gen)
    w2s = torch.randint(118, 126, (E, H, INTER // 32), dtype=torch.uint8, generator=gen)
    b1, b2 = torch.randn(E, 2 * INTER, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1
    kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rate = measure_matmul_flops(torch.float32, budget_s=2.0)
    print(f"float32 matmul (torch, {args.threads} threads): {rate.flop_s / 1e9:.0f} GFLOP/s")
    for path in (args.paths or kernels.kernel_path()).split(","):
        kernels.set_path(path)
        if kernels.kernel_path() != path:
            print(f"{path}: this CPU lacks it")
            continue
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, H, generator=gen).bfloat16().float()
            experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
            weights = torch.rand(tokens, K, generator=gen)
            flops = 2 * tokens * K * (2 * INTER * H + H * INTER)
            line = []
            for q8 in (False, True):
                call = (x, w1b, w1s, b1, w2b, w2s, b2, experts, weights, 1.702, 7.0, True)
                kernels.moe(*call, q8=q8)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    kernels.moe(*call, q8=q8)
                    best = min(best, time.perf_counter() - t0)
                line.append(f"{'q8' if q8 else 'exact'} {best * 1e3:7.1f} ms {flops / best / 1e9:6.1f} GFLOP/s "
                            f"({flops / best / rate.flop_s:4.0%})")
            print(f"{path:10s} {tokens:5d} tokens: " + "   ".join(line), flush=True)


if __name__ == "__main__":
    main()
