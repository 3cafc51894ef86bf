"""What checking k guessed tokens in one step costs against one decoding step, how many experts it reads, and
what speculative decoding gains at each acceptance.

    python benchmarks/speculative.py CHECKPOINT [--k 1 2 4 7] [--reps 5] [--quantization q8]
    python benchmarks/speculative.py CHECKPOINT --acceptance 0 0.5 0.7 0.9 1 [--gen-tokens 32] [--guesses 4]

--acceptance: a greedy run gives the reference tokens; then the same request decodes with guesses taken from them,
each guess replaced by a wrong token with probability 1 - acceptance (an oracle draft, to set the acceptance at
will), once with `--guesses` guesses a step whatever they cost and once as the engine chooses (guessing only where
this machine's timed steps say it pays), beside plain decoding in the same minutes; every run's tokens must be the
reference's.

A sequence reads a random prompt, then alternates one-token steps with steps that check k candidates (taken back
at once: the cache is as before), in the same minutes, and prints each step's median time, the ratio, the distinct
experts the k+1 rows chose per layer (each read once for all of them) and the read bandwidth measured beside, so
that the ratio can be read against the bytes: a step's cost is mostly the weights it reads. With random routing
(a synthetic checkpoint) k+1 tokens choose nearly independent experts, ~(1 - (1 - 4/32)^(k+1)) x 32 of them a layer
in the 20b; a real model's routing is correlated from token to token and reads fewer. Speculation pays where the
ratio is below 1 + the guesses kept per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ossie import LLM
from ossie.backends import cpu_kernels
from ossie.bench import measure_bandwidth
from ossie.engine import SamplingParams, Sequence, Speculator
from ossie.special_tokens import N_ORDINARY


class OracleDraft:
    """A draft source (ossie.engine.DraftSource) that guesses from a known continuation, each guess wrong with
    probability 1 - acceptance"""

    def __init__(self, reference: list[int], prompt_length: int, acceptance: float, gen: torch.Generator):
        self.reference, self.prompt_length, self.acceptance, self.gen = reference, prompt_length, acceptance, gen
        self.told = 0

    def extend(self, tokens: list[int]) -> None:
        self.told += len(tokens)

    def propose(self, k: int) -> list[int]:
        done = self.told - self.prompt_length
        truth = self.reference[done:done + k]
        wrong = torch.rand(len(truth), generator=self.gen) >= self.acceptance
        return [(t + 1) % N_ORDINARY if w else t for t, w in zip(truth, wrong.tolist(), strict=True)]


class Oracle(Speculator):
    """The engine's guessing with an oracle's drafts; `fixed`: every guess costs nothing, so it always makes `k`"""

    def __init__(self, reference: list[int], acceptance: float, k: int, rows: int, fixed: bool):
        gen = torch.Generator().manual_seed(1)
        super().__init__(k, rows, draft=lambda seq: OracleDraft(reference, len(seq.prompt), acceptance, gen))
        self.fixed = fixed

    def cost(self, rows: int) -> float:
        return 1.0 if self.fixed else super().cost(rows)


def decode_runs(llm: LLM, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, N_ORDINARY, (args.prompt_tokens,), generator=gen).tolist()
    params = dict(max_tokens=args.gen_tokens, temperature=0, stop_token_ids=[])
    plain = llm.engine.speculator
    reference = list(llm.generate(prompt, **params))
    rows = llm.backend.decoding_rows

    def timed(speculator: Speculator | None) -> tuple[float, int, int]:
        llm.engine.speculator = speculator
        before = llm.engine.snapshot()
        t0 = time.perf_counter()
        out = list(llm.generate(prompt, **params))
        took = time.perf_counter() - t0
        after = llm.engine.snapshot()
        assert out == reference, "speculation changed a token"
        return (args.gen_tokens / took, after.drafted_tokens - before.drafted_tokens,
                after.accepted_tokens - before.accepted_tokens)

    print(f"decoding {args.gen_tokens} greedy tokens after a {args.prompt_tokens}-token prompt; tok/s (kept/guessed)")
    for a in args.acceptance:
        base = timed(None)[0]
        fixed, d1, k1 = timed(Oracle(reference, a, args.guesses, rows, fixed=True))
        chosen, d2, k2 = timed(Oracle(reference, a, args.guesses, rows, fixed=False))
        print(f"acceptance {a:4.2f}: plain {base:5.2f}; {args.guesses} guesses a step {fixed:5.2f} ({k1}/{d1}) = "
              f"{fixed / base:4.2f}x; as the engine chooses {chosen:5.2f} ({k2}/{d2}) = {chosen / base:4.2f}x")
    llm.engine.speculator = plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 7])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--quantization", choices=["q8"], default=None)
    ap.add_argument("--acceptance", type=float, nargs="+", help="measure decoding at these acceptances instead")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--guesses", type=int, default=4)
    args = ap.parse_args()
    llm = LLM(args.checkpoint, quantization=args.quantization, enable_prefix_caching=False)
    if args.acceptance:
        return decode_runs(llm, args)
    runner, cfg = llm.runner, llm.config
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, N_ORDINARY, (args.prompt_tokens,), generator=gen).tolist()
    seq = Sequence(prompt, SamplingParams(max_tokens=10**6, temperature=0, stop_token_ids=[]))
    while (tok := runner.run([seq])[0]) is None:
        pass
    seq.append(tok)
    chosen: list[torch.Tensor] = []
    route = llm.model.ops.experts

    def counting(x, lw, picked, weight, cfg_, alone=()):
        chosen.append(picked)
        return route(x, lw, picked, weight, cfg_, alone)

    def one_step() -> float:
        t0 = time.perf_counter()
        seq.append(runner.run([seq])[0])
        return time.perf_counter() - t0

    def checked(k: int) -> tuple[float, float]:
        seq.propose(torch.randint(0, N_ORDINARY, (k,), generator=gen).tolist())
        chosen.clear()
        llm.model.ops.experts = counting
        t0 = time.perf_counter()
        runner.run([seq])
        took = time.perf_counter() - t0
        llm.model.ops.experts = route
        runner.kv.rollback(seq, k + 1)
        seq.candidates = []
        distinct = statistics.mean(len(p.unique()) for p in chosen)
        return took, distinct

    one_step()
    path = cpu_kernels.kernel_path() if llm.backend.name == "cpu" else llm.backend.name
    print(f"{args.checkpoint}: {cfg.num_layers} layers, {cfg.num_experts} experts, {cfg.experts_per_token} a token; "
          f"{llm.backend.name} backend ({path}), {'q8' if args.quantization else 'exact'} mode")
    for k in args.k:
        ones, checks, experts = [], [], []
        for _ in range(args.reps):
            ones.append(one_step())
            took, distinct = checked(k)
            checks.append(took)
            experts.append(distinct)
        one, check = statistics.median(ones), statistics.median(checks)
        gb_s = measure_bandwidth(llm.model.w.unembedding if isinstance(llm.model.w.unembedding, torch.Tensor)
                                 else llm.model.w.unembedding.values, repeats=3)
        print(f"k={k:2d}: one-token step {one * 1e3:7.1f} ms, checking {k} guesses {check * 1e3:7.1f} ms = "
              f"{check / one:4.2f}x; experts read a layer {statistics.mean(experts):4.1f} of {cfg.num_experts} "
              f"(one token: {cfg.experts_per_token}); read bandwidth beside {gb_s:.1f} GB/s")


if __name__ == "__main__":
    main()
