"""`ossie bench`: speed and memory, each figure next to the machine limit it is measured against.

Decoding one token reads every weight it uses once, so its limit is memory bandwidth / bytes per token; both
are measured here, in the same run. Prefill is compute-bound: its figure is set against the bf16 matrix
product rate torch reaches on this machine, also measured here.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from .backends import cpu_kernels
from .engine import SamplingParams, Sequence
from .llm import LLM
from .model.checkpoint import Weights
from .model.config import ModelConfig
from .special_tokens import N_ORDINARY


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bytes_per_token(cfg: ModelConfig, w: Weights, context: int) -> int:
    """Bytes one decode step reads: every non-expert weight, k of the experts' packed weights per layer, one
    embedding row, the unembedding, and the KV cache it attends to (`context` positions)."""
    total = w.unembedding.nbytes + w.norm.nbytes + w.embedding[0].nbytes  # Q8 matrices have nbytes too
    share = cfg.experts_per_token / cfg.num_experts
    for lw in w.layers:
        for name, t in vars(lw).items():
            total += int(t.nbytes * share) if name.startswith(("w1_", "w2_")) else t.nbytes
    kv_row = 2 * cfg.num_kv_heads * cfg.head_dim * w.embedding.element_size()  # the KV cache: the model's dtype
    for i in range(cfg.num_layers):
        total += kv_row * (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
    return total


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of the matrix products one token goes through, without the unembedding (a prefill
    computes logits for its last position only) and without attention scores (small at benchmark lengths)."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = (cfg.qkv_dim * h + h * cfg.num_heads * d + cfg.num_experts * h
                 + cfg.experts_per_token * (2 * cfg.intermediate_size * h + h * cfg.intermediate_size))
    return 2 * cfg.num_layers * per_layer


def measure_bandwidth(buffer: torch.Tensor, repeats: int = 7) -> float:
    """Read bandwidth in GB/s (median): all kernel threads read `buffer` (resident and larger than the caches)."""
    nbytes = buffer.nbytes // 4096 * 4096
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if cpu_kernels.available():
            cpu_kernels.read(buffer)
        else:
            buffer.view(-1).view(torch.uint8)[:nbytes].view(torch.int64).sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def measure_matmul_flops(dtype: torch.dtype, m: int = 512, k: int = 2880, n: int = 5760, repeats: int = 7) -> float:
    """FLOP/s (median) of a torch matrix product of prefill's shape on all threads."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    times = []
    with cpu_kernels.torch_threads(cpu_kernels.kernel_threads()):
        torch.matmul(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


@dataclass
class BenchResult:
    load_s: float
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    bandwidth_gb_s: float = 0.0  # median of bandwidth_runs
    bandwidth_runs: list[float] = field(default_factory=list)
    bytes_per_token: int = 0
    matmul_flop_s: float = 0.0
    flops_per_token: int = 0
    peak_rss_gib: float = 0.0

    @property
    def roofline_tok_s(self) -> float:
        return self.bandwidth_gb_s * 1e9 / self.bytes_per_token

    def report(self, llm: LLM, prompt_tokens: int, gen_tokens: int) -> str:
        cfg = llm.config
        prefill, decode = statistics.median(self.prefill_tok_s), statistics.median(self.decode_tok_s)
        runs = len(self.decode_tok_s)
        lines = [
            f"model        {llm.path} ({llm.layout} layout, {cfg.num_layers} layers, {cfg.num_experts} experts, "
            f"{str(llm.dtype).removeprefix('torch.')}{', q8' if llm.quantization else ''})",
            f"machine      {cpu_kernels.kernel_threads()} threads, {llm.backend.name} backend"
            + (f", kernels: {cpu_kernels.kernel_path()}" if llm.backend.name == "cpu" else ""),
            f"load         {self.load_s:.2f} s",
            f"peak RSS     {self.peak_rss_gib:.2f} GiB (loading and generating)",
            f"prefill      {prefill:.1f} tok/s ({prompt_tokens}-token prompt, median of {runs}; "
            f"{prefill * self.flops_per_token / 1e9:.0f} GFLOP/s = "
            f"{prefill * self.flops_per_token / self.matmul_flop_s:.0%} of the measured "
            f"{self.matmul_flop_s / 1e9:.0f} GFLOP/s bf16 matmul)",
            f"decode       {decode:.2f} tok/s ({gen_tokens} tokens, median of {runs}; runs: "
            + ", ".join(f"{x:.2f}" for x in self.decode_tok_s) + ")",
            f"roofline     {self.roofline_tok_s:.2f} tok/s = {self.bandwidth_gb_s:.1f} GB/s measured read bandwidth "
            f"/ {self.bytes_per_token / 1e9:.2f} GB read per token (bandwidth beside each run: "
            + ", ".join(f"{b:.1f}" for b in self.bandwidth_runs) + " GB/s)",
            f"decode share {decode / self.roofline_tok_s:.0%} of the roofline "
            f"({decode * self.bytes_per_token / 1e9:.1f} GB/s effective)",
        ]
        return "\n".join(lines)


def run_bench(llm: LLM, prompt_tokens: int = 64, gen_tokens: int = 32, runs: int = 5,
              progress: bool = True, depth: int = 0) -> BenchResult:
    """Prefill a random prompt and greedily decode `gen_tokens`, `runs` times, through the model runner as the
    engine runs them; measure the machine's limits. depth: that many tokens of context computed first, untimed
    (llama-bench's -d): the timed prompt and decode then attend to them too."""
    from tqdm import tqdm

    res = BenchResult(load_s=llm.load_seconds)
    gen = torch.Generator().manual_seed(0)
    # the machine's bandwidth drifts (shared hosts): it is measured beside every run, reading the unembedding
    # (1.2 GB at 20b; its 8-bit values in the q8 mode), which decoding keeps resident and is larger than any cache
    unembedding = llm.model.w.unembedding
    resident = unembedding if isinstance(unembedding, torch.Tensor) else unembedding.values
    bar = tqdm(total=runs * (prompt_tokens + gen_tokens), desc="benchmark", unit="tok", disable=not progress)
    for run in range(runs + 1):  # run 0 warms up (page faults on first touch of the weights) and is dropped
        prompt = torch.randint(0, N_ORDINARY, (depth + prompt_tokens,), generator=gen).tolist()
        # gen_tokens decode steps after the prompt's (the first token comes with the prefill)
        seq = Sequence(prompt, SamplingParams(max_tokens=gen_tokens + 1, temperature=0, stop_token_ids=[]))
        while seq.num_computed < depth:  # the context before the timed prompt
            llm.runner.run([seq], [min(llm.runner.prefill_chunk, depth - seq.num_computed)])
        t0 = time.perf_counter()
        (tok,) = llm.runner.run([seq])  # the whole prompt: prompt_tokens <= prefill_chunk
        while tok is None:
            (tok,) = llm.runner.run([seq])
        seq.append(tok)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        while not seq.finished:
            seq.append(llm.runner.run([seq])[0])
        t_decode = time.perf_counter() - t0
        llm.runner.free(seq)
        if run > 0:
            res.prefill_tok_s.append(prompt_tokens / t_prefill)
            res.decode_tok_s.append(gen_tokens / t_decode)
            res.bandwidth_runs.append(measure_bandwidth(resident, repeats=3))
            bar.update(prompt_tokens + gen_tokens)
    bar.close()
    res.peak_rss_gib = peak_rss_gib()
    res.bandwidth_gb_s = statistics.median(res.bandwidth_runs) if res.bandwidth_runs else \
        measure_bandwidth(resident)
    res.bytes_per_token = bytes_per_token(llm.config, llm.model.w, depth + prompt_tokens + gen_tokens // 2)
    res.matmul_flop_s = measure_matmul_flops(llm.dtype)
    res.flops_per_token = matmul_flops_per_token(llm.config)
    return res
