"""The CUDA backend's figures, each beside the limit it is measured against, in the same run:

- single-stream decode tok/s against the HBM roofline (read bandwidth measured here / bytes read per token),
  with CUDA graphs, without them, and (--compare) through the torch reference backend, ossie's GPU path before;
- prefill tok/s of a long prompt, against the bf16 matrix rate measured here;
- aggregate output tok/s of concurrent streams through the engine (continuous batching).

The model is synthetic, made directly in GPU memory (random weights in the published shapes): no checkpoint and no
disk needed. The 120b's 65 GB do not fit some machines' disks, but its layer shapes do in GPU memory:

    python benchmarks/gpu.py                              # the 20b
    python benchmarks/gpu.py --preset 120b --layers 8     # the 120b's shapes, 8 of its 36 layers
    python benchmarks/gpu.py --streams 32 --stream-prompt 512 --stream-tokens 1024   # SGLang's published setting
    python benchmarks/gpu.py --kernels --profile          # also each kernel alone, and where a step's time goes
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from ossie.backends import TorchBackend
from ossie.backends.cuda import CudaBackend
from ossie.bench import bytes_per_token, matmul_flops_per_token
from ossie.engine import Engine, Finished, ModelRunner, SamplingParams, Sequence, Token
from ossie.model.config import PRESETS
from ossie.model.transformer import Transformer
from ossie.special_tokens import N_ORDINARY
from ossie.synth import random_weights


def timed(fn, repeats: int = 10) -> float:
    """Median seconds of fn() on the GPU (events around each call, after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 4 << 30) -> float:
    """GB/s of reading a buffer far larger than L2 (a sum over int64 words: the reduction is read-bound)."""
    buf = torch.ones(nbytes // 8, dtype=torch.int64, device="cuda")
    t = timed(lambda: buf.sum())
    return nbytes / t / 1e9


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, bytes read and written counted."""
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    return 2 * nbytes / t / 1e9


def matmul_tflops(m: int = 8192) -> float:
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    return 2 * m**3 / timed(lambda: a @ a) / 1e12


def kernel_figures(cfg, weights) -> None:
    """Each kernel alone at the model's shapes, with what it reaches: GB/s where it streams weights or keys,
    TFLOP/s where it computes; cuBLAS's bf16 GEMV beside them as the bar for a memory-bound product."""
    from ossie.backends import cuda_kernels as K

    lw, k = weights.layers[0], cfg.experts_per_token
    expert_bytes = sum(t[0].nbytes for t in (lw.w1_blocks, lw.w1_scales, lw.w2_blocks, lw.w2_scales))
    gen = torch.Generator("cuda").manual_seed(0)
    x1 = torch.randn(1, cfg.hidden_size, device="cuda", generator=gen).bfloat16()
    t = timed(lambda: torch.nn.functional.linear(x1, lw.qkv_w))
    print(f"  cuBLAS GEMV qkv [1 x {cfg.hidden_size}] @ {tuple(lw.qkv_w.shape)}: {t * 1e6:.1f} us, "
          f"{lw.qkv_w.nbytes / t / 1e9:.0f} GB/s")
    for tokens in (1, 8, 32, 256, 2048):
        x = torch.randn(tokens, cfg.hidden_size, device="cuda", generator=gen).bfloat16()
        chosen = torch.rand(tokens, cfg.num_experts, device="cuda", generator=gen).topk(k).indices
        weight = torch.full((tokens, k), 1 / k, device="cuda")
        t = timed(lambda x=x, chosen=chosen, weight=weight: K.moe(
            x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias, chosen, weight,
            cfg.swiglu_alpha, cfg.swiglu_limit))
        touched = len(chosen.unique()) * expert_bytes
        flops = 2 * tokens * k * 3 * cfg.hidden_size * cfg.intermediate_size
        print(f"  moe, {tokens} tokens: {t * 1e6:.0f} us, {touched / t / 1e9:.0f} GB/s of expert weights, "
              f"{flops / t / 1e12:.1f} TFLOP/s")
    tiles_sweep(cfg, lw, gen)
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sinks = torch.zeros(h, device="cuda")
    for n, window in ((2048, 0), (2048, cfg.sliding_window)):
        q = torch.randn(n, h, d, device="cuda", generator=gen).bfloat16()
        kk, vv = (torch.randn(n, kv, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
        t = timed(lambda q=q, kk=kk, vv=vv, window=window: K.attention_prefill(q, kk, vv, sinks, 0, window))
        pairs = n * (n + 1) / 2 if not window else n * window
        print(f"  prefill attention, {n} tokens, window {window or 'none'}: {t * 1e6:.0f} us, "
              f"{4 * pairs * h * d / t / 1e12:.1f} TFLOP/s")
    for n in (128, 8192, 32768):
        q = torch.randn(1, h, d, device="cuda", generator=gen).bfloat16()
        kk, vv = (torch.randn(n, kv, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
        table = torch.tensor([[kk.data_ptr()], [vv.data_ptr()], [n]], device="cuda")
        splits = K.decode_splits(n)
        t = timed(lambda q=q, table=table, splits=splits: K.attention_decode(q, table[0], table[1], table[2], sinks,
                                                                             kv, splits))
        print(f"  decode attention, {n} keys ({splits} splits): {t * 1e6:.1f} us, "
              f"{2 * kk.nbytes / t / 1e9:.0f} GB/s of keys and values")


def tiles_sweep(cfg, lw, gen) -> None:
    """The MoE kernels' launch shapes side by side (rows, K, warps, stages, pairs per block), the chosen one marked
    with *, and the most shared memory any compiled variant asked for (consumer cards have 99 KB)."""
    from ossie.backends import cuda_kernels as K

    k = cfg.experts_per_token
    x1, x32 = (torch.empty(1, dtype=torch.bfloat16, device="cuda"),) * 2
    shapes = {1: [K.GEMV, K.Tiles(32, 512, 4, 1), K.Tiles(64, 1024, 4, 1)],
              32: [K._gemm_tiles(32 * k, x32), *K.GEMM_FEW, K.Tiles(64, 128, 4, 3, 16)],
              2048: [K._gemm_tiles(2048 * k, x1), *K.GEMM_MANY, K.Tiles(128, 64, 8, 3, 128),
                     K.Tiles(128, 32, 4, 4, 128), K.Tiles(256, 64, 8, 3, 128)]}
    for tokens, variants in shapes.items():
        x = torch.randn(tokens, cfg.hidden_size, device="cuda", generator=gen).bfloat16()
        chosen = torch.rand(tokens, cfg.num_experts, device="cuda", generator=gen).topk(k).indices
        weight = torch.full((tokens, k), 1 / k, device="cuda")
        for i, tiles in enumerate(variants):
            try:
                args = (x, lw.w1_blocks, lw.w1_scales, lw.w1_bias, lw.w2_blocks, lw.w2_scales, lw.w2_bias, chosen,
                        weight, cfg.swiglu_alpha, cfg.swiglu_limit, tiles)
                t = timed(lambda args=args: K.moe(*args))
                print(f"  {'*' if i == 0 else ' '} moe, {tokens} tokens, {tiles}: {t * 1e6:.0f} us")
            except Exception as e:  # a shape the GPU cannot hold: say so and go on
                print(f"    moe, {tokens} tokens, {tiles}: {type(e).__name__}: {str(e)[:120]}")
    for kernel in (K._moe_up_gemv, K._moe_down_gemv, K._moe_up_gemm, K._moe_down_gemm):
        try:
            shared = max(c.metadata.shared for cache in kernel.device_caches.values() for c in cache[0].values())
            print(f"  {kernel.fn.__name__}: at most {shared / 1024:.0f} KB of shared memory")
        except Exception as e:  # Triton's cache layout is not public API
            print(f"  {kernel.fn.__name__}: shared memory unknown ({type(e).__name__})")


def profile(model: Transformer, prompt_len: int, prefill: int) -> None:
    """The GPU time of a few kernel-by-kernel decode steps and of one prefill, by kernel (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = ModelRunner(model, prefill_chunk=prefill)
    seq = Sequence(prompt(prompt_len, 7), greedy(12))
    seq.append(runner.run([seq])[0])
    seq.append(runner.run([seq])[0])  # compiled and warm
    for name, work in (("decode (10 steps, no graphs)", lambda: [seq.append(runner.run([seq])[0])
                                                                for _ in range(10)]),
                       (f"prefill ({prefill} tokens)", lambda: runner.run([Sequence(prompt(prefill, 8), greedy(1))]))):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            work()
            torch.cuda.synchronize()
        print(f"profile: {name}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[])


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, N_ORDINARY, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_rate(model: Transformer, prompt_len: int, tokens: int) -> float:
    """tok/s of one sequence's decode steps (each: the forward pass, the logits to the host, the sampling)."""
    runner = ModelRunner(model)
    seq = Sequence(prompt(prompt_len, 0), greedy(tokens + 1))
    seq.append(runner.run([seq])[0])  # the prompt
    steps = []
    while not seq.finished:
        t0 = time.perf_counter()
        seq.append(runner.run([seq])[0])
        steps.append(time.perf_counter() - t0)
    warm = steps[min(4, len(steps) - 1):]  # the first steps compile kernels and capture the graph
    return 1 / statistics.median(warm)


def prefill_rate(model: Transformer, n: int, repeats: int = 3) -> float:
    runner = ModelRunner(model, prefill_chunk=n)
    times = []
    for i in range(repeats + 1):
        seq = Sequence(prompt(n, i), greedy(1))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.run([seq])
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[1:])


def streams_rate(model: Transformer, streams: int, prompt_len: int, tokens: int) -> tuple[float, float, float]:
    """(output tok/s from the first request to the last token, output tok/s once every stream decodes, seconds)."""
    engine = Engine(ModelRunner(model, kv_budget=None), max_running=streams).start()
    lock, done = threading.Lock(), threading.Event()
    first_token: dict[int, float] = {}
    ended = []

    def on_event(i: int, event) -> None:
        with lock:
            if isinstance(event, Token):
                first_token.setdefault(i, time.perf_counter())
            else:
                ended.append(event)
                if len(ended) == streams:
                    done.set()

    try:
        t0 = time.perf_counter()
        for i in range(streams):
            engine.submit(prompt(prompt_len, 100 + i), greedy(tokens), None, lambda e, i=i: on_event(i, e))
        assert done.wait(1800), "the streams did not finish"
        t1 = time.perf_counter()
    finally:
        engine.shutdown()
    assert all(isinstance(e, Finished) for e in ended), ended
    all_decoding = max(first_token.values())
    return streams * tokens / (t1 - t0), streams * (tokens - 1) / (t1 - all_decoding), t1 - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="keep this many layers (the 120b's shapes on a smaller machine)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=2048, help="prompt length of the prefill figure")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-prompt", type=int, default=512)
    p.add_argument("--stream-tokens", type=int, default=256)
    p.add_argument("--compare", action="store_true", help="also decode without graphs and on the torch backend")
    p.add_argument("--kernels", action="store_true", help="also time each kernel alone at the model's shapes")
    p.add_argument("--profile", action="store_true", help="also print the GPU time of decode and prefill by kernel")
    args = p.parse_args()

    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    read_bw, copy_bw, tflops = read_bandwidth(), copy_bandwidth(), matmul_tflops()
    print(f"HBM: read {read_bw:.0f} GB/s, copy {copy_bw:.0f} GB/s (read + written); bf16 matmul {tflops:.0f} TFLOP/s")
    t0 = time.perf_counter()
    weights = random_weights(cfg, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    print(f"{args.preset} shapes, {cfg.num_layers} layers: {weights.nbytes() / 1e9:.1f} GB made in GPU memory in "
          f"{time.perf_counter() - t0:.1f} s")
    per_token = bytes_per_token(cfg, weights, args.prompt + args.decode_tokens // 2)
    roofline = read_bw * 1e9 / per_token
    print(f"decode reads {per_token / 1e9:.2f} GB a token: roofline {roofline:.0f} tok/s at {read_bw:.0f} GB/s")

    backends = [("cuda, graphs", CudaBackend())]
    if args.compare:
        backends += [("cuda, no graphs", CudaBackend(cuda_graphs=False)), ("torch reference", TorchBackend())]
    for name, backend in backends:
        model = Transformer(cfg, weights, torch.bfloat16, backend)
        n = args.decode_tokens if backend.name == "cuda" else 8
        rate = decode_rate(model, args.prompt, n)
        print(f"decode, 1 stream, {name}: {rate:.1f} tok/s = {100 * rate / roofline:.0f}% of the roofline "
              f"({rate * per_token / 1e9:.0f} GB/s effective)")

    model = Transformer(cfg, weights, torch.bfloat16, CudaBackend())
    rate = prefill_rate(model, args.prefill)
    flops = rate * matmul_flops_per_token(cfg) / 1e12
    print(f"prefill, {args.prefill}-token prompt: {rate:.0f} tok/s ({flops:.0f} TFLOP/s in the products = "
          f"{100 * flops / tflops:.0f}% of the measured bf16 rate)")
    if args.kernels:
        print("kernels alone:")
        kernel_figures(cfg, weights)
    if args.profile:
        profile(Transformer(cfg, weights, torch.bfloat16, CudaBackend(cuda_graphs=False)), args.prompt, args.prefill)
    if args.streams:
        total, steady, secs = streams_rate(model, args.streams, args.stream_prompt, args.stream_tokens)
        print(f"{args.streams} streams ({args.stream_prompt}-token prompts, {args.stream_tokens} tokens each): "
              f"{total:.0f} output tok/s overall ({secs:.1f} s), {steady:.0f} tok/s once all decode")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
