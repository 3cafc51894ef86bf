"""Decode attention on the CPU at long contexts: one query of the 20b's full-attention layer (64 heads, 8 KV heads,
head_dim 64, bf16 KV cache) over S keys, the C kernel against the memory bandwidth measured in the same run.

    python benchmarks/attention.py                   # 1k, 4k, 8k, 32k keys
    python benchmarks/attention.py --keys 8192 131072

Each line: milliseconds per layer, the KV bytes it reads (keys and values once) per second, and that as a share
of the measured read bandwidth; then what the 20b's 12 full layers add to a decode step at that context.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ossie.backends import cpu_kernels
from ossie.bench import measure_bandwidth
from ossie.model.config import PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the C kernels are not built (pip install -e . with a C compiler)")
    if args.threads:
        cpu_kernels.set_num_threads(args.threads)
    cfg = PRESETS["20b"]
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bandwidth = measure_bandwidth(torch.empty(1 << 30, dtype=torch.uint8).fill_(1))
    print(f"{cpu_kernels.kernel_threads()} threads, {cpu_kernels.kernel_path()} kernels; read bandwidth "
          f"{bandwidth:.1f} GB/s")
    full_layers = sum(not cfg.is_sliding(i) for i in range(cfg.num_layers))
    for n in args.keys:
        q, sinks = torch.randn(h, d).bfloat16().float(), torch.randn(h)  # a bf16 model's queries hold bf16 values
        k, v = (torch.randn(n, kv, d).bfloat16() for _ in range(2))
        cpu_kernels.attention_one_query(q, k, v, sinks)  # warm
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cpu_kernels.attention_one_query(q, k, v, sinks)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        nbytes = k.nbytes + v.nbytes
        print(f"{n:>7} keys: {t * 1e3:6.2f} ms a layer, {nbytes / t / 1e9:5.1f} GB/s of KV = "
              f"{nbytes / t / 1e9 / bandwidth:4.0%} of the bandwidth; {full_layers} full layers: "
              f"{full_layers * t * 1e3:6.1f} ms a token")


if __name__ == "__main__":
    main()
