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


@dataclass(frozen=True)
class MatmulRate:
    """The best rate a torch matrix product reached, and the product that reached it."""

    flop_s: float
    dtype: torch.dtype
    shape: tuple[int, int, int]  # m, k, n


PREFILL_SHAPE = (512, 2880, 5760)  # a 512-token chunk through the 20b's widest expert product


def measure_matmul_flops(dtype: torch.dtype, shape: tuple[int, int, int] = PREFILL_SHAPE, repeats: int = 3,
                         budget_s: float = 2.0) -> MatmulRate:
    """FLOP/s of a torch matrix product on all threads, growing towards prefill's shape (m x k @ k x n) for at most
    about `budget_s`: products of small shapes first, each next one (2-4x the work) only when the last one's time
    says it fits what is left. The rate is that of the largest product measured; the smallest always is.

    Why bounded: torch's bf16 product is pathological on CPUs without AVX-512 BF16 (a 32 x 2880 x 5760 product took
    26.5 s on a Zen 3, 0.17 s in float32), and `ossie bench` measured the full shape unconditionally: it never
    finished there."""
    m, k, n = shape
    shapes = [(min(8, m), k // d, n // d) for d in (8, 4, 2) if k // d and n // d]
    rows = min(8, m)
    while True:
        shapes.append((rows, k, n))
        if rows >= m:
            break
        rows = min(m, rows * 2)
    last, deadline = None, time.perf_counter() + budget_s
    with cpu_kernels.torch_threads(cpu_kernels.kernel_threads()):
        for mm, kk, nn in shapes:
            flops = 2 * mm * kk * nn
            if last is not None and time.perf_counter() + flops / last.flop_s * (repeats + 1) > deadline:
                break  # the next product would run past the budget (judged from the last one's rate)
            a, b = torch.randn(mm, kk).to(dtype), torch.randn(kk, nn).to(dtype)
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
                if time.perf_counter() > deadline:
                    break
            rate = flops / statistics.median(times[1:] or times)
            last = MatmulRate(rate, dtype, (mm, kk, nn))
            if time.perf_counter() > deadline:
                break
    return last


def matmul_ceiling(dtype: torch.dtype, budget_s: float = 4.0) -> MatmulRate:
    """The compute ceiling prefill is set against: the faster of torch's products in the model's dtype and in
    float32 (ossie's own kernels compute in either), each measured within half the budget."""
    rates = [measure_matmul_flops(d, budget_s=budget_s / 2) for d in dict.fromkeys((dtype, torch.float32))]
    return max(rates, key=lambda r: r.flop_s)


@dataclass
class Speculation:
    """What the timed decodes guessed, over all runs (engine counters)."""
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # decoded
    steps: int = 0  # the decode steps that gave them


@dataclass
class BenchResult:
    load_s: float
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    bandwidth_gb_s: float = 0.0  # median of bandwidth_runs
    bandwidth_runs: list[float] = field(default_factory=list)
    bytes_per_token: int = 0
    matmul: MatmulRate | None = None  # the compute ceiling
    flops_per_token: int = 0
    peak_rss_gib: float = 0.0
    speculation: Speculation | None = None  # with --speculative: what the decodes guessed

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
            + (f", {cpu_kernels.path_summary()}" if llm.backend.name == "cpu" else ""),
            f"load         {self.load_s:.2f} s",
            f"peak RSS     {self.peak_rss_gib:.2f} GiB (loading and generating)",
            f"prefill      {prefill:.1f} tok/s ({prompt_tokens}-token prompt, median of {runs}; "
            f"{prefill * self.flops_per_token / 1e9:.0f} GFLOP/s{self._ceiling(prefill)})",
            f"decode       {decode:.2f} tok/s ({gen_tokens} tokens, median of {runs}; runs: "
            + ", ".join(f"{x:.2f}" for x in self.decode_tok_s) + ")",
            f"roofline     {self.roofline_tok_s:.2f} tok/s = {self.bandwidth_gb_s:.1f} GB/s measured read bandwidth "
            f"/ {self.bytes_per_token / 1e9:.2f} GB read per token (bandwidth beside each run: "
            + ", ".join(f"{b:.1f}" for b in self.bandwidth_runs) + " GB/s)",
            f"decode share {decode / self.roofline_tok_s:.0%} of the roofline "
            f"({decode * self.bytes_per_token / 1e9:.1f} GB/s effective)",
        ]
        if self.speculation is not None:
            sp = self.speculation
            lines.append(f"speculation  {llm.args.speculative}: {sp.drafted} tokens guessed, {sp.accepted} kept "
                         f"({sp.accepted / sp.drafted if sp.drafted else 0:.0%}); {sp.tokens / sp.steps:.2f} tokens "
                         f"a decode step (a random prompt gives little to guess: real text repeats more)")
        return "\n".join(lines)

    def _ceiling(self, prefill: float) -> str:
        if self.matmul is None:
            return "; the matrix product rate was not measured"
        m = self.matmul
        shape = "" if m.shape == PREFILL_SHAPE else \
            f" at {m.shape[0]}x{m.shape[1]}x{m.shape[2]}: the {PREFILL_SHAPE[0]}-row product would take too long"
        return (f" = {prefill * self.flops_per_token / m.flop_s:.0%} of the measured {m.flop_s / 1e9:.0f} GFLOP/s "
                f"{str(m.dtype).removeprefix('torch.')} matmul{shape}")


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
        if llm.engine.speculator is not None:  # through the engine, which guesses (depth is refused with it)
            t_prefill, t_decode = _engine_decode(llm, prompt, gen_tokens, res, counted=run > 0)
        else:
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
            llm.runner.kv.free(seq)
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
    res.matmul = matmul_ceiling(llm.dtype)
    res.flops_per_token = matmul_flops_per_token(llm.config)
    return res


def _engine_decode(llm: LLM, prompt: list[int], gen_tokens: int, res: BenchResult,
                   counted: bool) -> tuple[float, float]:
    """One greedy request through the engine, as a user's decodes with speculation: (seconds to its first token,
    seconds for the gen_tokens after it); its guesses and steps added to res.speculation if `counted`."""
    tokens = iter(llm.generate(prompt, max_tokens=gen_tokens + 1, temperature=0, stop_token_ids=[]))
    t0 = time.perf_counter()
    next(tokens)
    t_prefill = time.perf_counter() - t0
    before = llm.engine.snapshot()
    t0 = time.perf_counter()
    decoded = sum(1 for _ in tokens)
    t_decode = time.perf_counter() - t0
    after = llm.engine.snapshot()
    if counted:
        sp = res.speculation = res.speculation or Speculation()
        sp.drafted += after.drafted_tokens - before.drafted_tokens
        sp.accepted += after.accepted_tokens - before.accepted_tokens
        sp.tokens += decoded
        sp.steps += after.steps - before.steps
    return t_prefill, t_decode
