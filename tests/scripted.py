"""A model runner that replays scripted harmony completions instead of sampling, for tests that need a
completion of a known shape (tool calls, stop strings). The replay still goes through each request's steering:
a scripted token the steering forbids is replaced by the first one it allows.

A script is a list of harmony texts, used in turn, and {"match": TEXT, "completion": TEXT} entries, used when
TEXT is in the prompt (the marker latest in the prompt, that is in the newest message, decides).
Tests inject it: `llm.runner = ScriptedRunner(llm.runner, script)`, or for a subprocess, `python -m
tests.scripted_main SCRIPT.json COMMAND ...` runs the ossie command line with it. `seconds_per_token` paces the
replay like a slow model, for tests that must interrupt an answer while it is still coming.
"""

from __future__ import annotations

import time

import torch

from ossie.engine import ModelRunner, Sequence
from ossie.engine.kv_manager import KVManager
from ossie.special_tokens import RETURN
from ossie.tokenizer import harmony_encoding

DEFAULT_TURN = "<|channel|>final<|message|><|return|>"


class ScriptedRunner:
    def __init__(self, runner: ModelRunner, script: list[str | dict], seconds_per_token: float = 0.0):
        self.config, self.device, self.prefill_chunk = runner.config, runner.device, runner.prefill_chunk
        self.kv = KVManager(runner.config, runner.model.dtype, runner.device)  # no budget, no prefix cache
        self.script, self.turn, self.seconds_per_token = script, 0, seconds_per_token
        self.completions: dict[int, list[int]] = {}  # sequence id -> its scripted completion

    def run(self, batch: list[Sequence], sizes: list[int] | None = None) -> list[int | None]:
        time.sleep(self.seconds_per_token)
        return [self._next(seq) for seq in batch]

    def _next(self, seq: Sequence) -> int:
        seq.num_computed = seq.num_tokens  # as if the model had read it all
        if seq.id not in self.completions:
            self.completions[seq.id] = self._choose(seq.prompt)
        completion = self.completions[seq.id]
        want = completion[len(seq.output)] if len(seq.output) < len(completion) else RETURN
        if seq.steering is None:
            return want
        prefer = torch.zeros(self.config.vocab_size)
        prefer[want] = 1.0
        return int(torch.argmax(seq.steering.mask(prefer)))

    def _choose(self, prompt: list[int]) -> list[int]:
        enc = harmony_encoding()
        prompt_text = enc.decode(prompt)
        found = [(prompt_text.rfind(e["match"]), e["completion"]) for e in self.script
                 if isinstance(e, dict) and e["match"] in prompt_text]
        if found:
            text = max(found)[1]
        else:
            turns = [e for e in self.script if isinstance(e, str)] or [DEFAULT_TURN]
            text = turns[self.turn % len(turns)]
            self.turn += 1
        return list(enc.encode(text, allowed_special="all"))
