"""What constrained decoding costs a token: the same model and sampling, free, steered to a JSON answer
(response_format) and steered to a tool call (tool_choice), and the steering's own time per step (its mask and
its automaton) measured inside the same runs.

    python benchmarks/steering.py /tmp/tiny          # a checkpoint folder (ossie synth DIR makes one)
"""

from __future__ import annotations

import argparse
import statistics
import time

import ossie
from ossie.chat import constraints, harmony
from ossie.engine import SamplingParams, Sequence, stream
from ossie.special_tokens import STOP_TOKEN_IDS


class Timed:
    """A steering whose mask and advance are timed."""

    def __init__(self, steering: constraints.Steering):
        self.steering, self.seconds, self.slowest = steering, 0.0, 0.0

    def mask(self, logits):
        t0 = time.perf_counter()
        out = self.steering.mask(logits)
        self.seconds += time.perf_counter() - t0
        self.slowest = max(self.slowest, time.perf_counter() - t0)
        return out

    def advance(self, token: int) -> None:
        t0 = time.perf_counter()
        self.steering.advance(token)
        self.seconds += time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    llm = ossie.LLM(args.model, progress=False, enable_prefix_caching=False)
    constraints.prepare()  # once per process, as `ossie serve` does at startup
    prompt = harmony.render([{"role": "user", "content": "Give me the weather as JSON"}])
    kinds = {"free": lambda: None, "json answer": lambda: constraints.answer_steering(json=True),
             "tool call": lambda: constraints.tool_call_steering(["get_weather", "get_time"])}
    for name, make in kinds.items():
        per_token, steering_ms, slowest = [], [], 0.0
        for run in range(args.runs):
            steering = make()
            timed = Timed(steering) if steering is not None else None
            seq = Sequence(prompt, SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=run,
                                                  stop_token_ids=list(STOP_TOKEN_IDS)), timed)
            t0 = time.perf_counter()
            n = len(list(stream(llm.runner, seq)))
            per_token.append((time.perf_counter() - t0) / n * 1e3)
            if timed is not None:
                steering_ms.append(timed.seconds / n * 1e3)
                slowest = max(slowest, timed.slowest)
        extra = (f", of which steering {statistics.fmean(steering_ms):.2f} ms (slowest step {slowest * 1e3:.1f} ms)"
                 if steering_ms else "")
        print(f"{name}: {statistics.fmean(per_token):.2f} ms a token (mean of {args.runs} runs){extra}")


if __name__ == "__main__":
    main()
