"""`ossie.LLM`: load a checkpoint, run forward passes, generate tokens (vLLM's API shape)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import harmony
from .checkpoint import detect_layout, load_config, load_weights, resolve_model
from .constraints import Steering
from .engine import PREFILL_CHUNK, Generation
from .kernels import set_num_threads
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams

log = logging.getLogger("ossie")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


class LLM:
    """A gpt-oss model ready to run.

    model: a local folder (Hugging Face layout, the original layout, or a repo folder holding both) or a
    Hugging Face repo id such as "openai/gpt-oss-20b".
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "bfloat16", layout: str | None = None,
                 num_threads: int | None = None, progress: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        t0 = time.perf_counter()
        self.path = resolve_model(model, layout)
        self.layout, folder = detect_layout(self.path, layout)
        self.config = load_config(folder, self.layout)
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        weights = load_weights(folder, self.layout, self.config, self.dtype, self.device, progress=progress)
        self.model = Transformer(self.config, weights, self.dtype)
        self.load_seconds = time.perf_counter() - t0
        # Test-only hook: OSSIE_TEST_SCRIPT names a JSON list of completions (harmony text) that generation
        # replays instead of sampling (see _next_script), so tests can drive tool calls through the CLI and server.
        self._script = json.loads(Path(os.environ["OSSIE_TEST_SCRIPT"]).read_text()) \
            if os.environ.get("OSSIE_TEST_SCRIPT") else None
        self._script_turn = 0
        if self._script is not None:
            log.warning("OSSIE_TEST_SCRIPT is set: replaying scripted completions instead of sampling")
        log.info("loaded %s (%s layout, %d layers, %d experts) in %.1f s", folder, self.layout,
                 self.config.num_layers, self.config.num_experts, self.load_seconds)

    # ---- helpers --------------------------------------------------------------------------------------
    def _tokens(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty: give at least one token")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"token id {int(ids[i])} at position {i} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.to(self.device)

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.config, self.dtype, self.device, capacity)

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed prompt tokens in chunks; returns the last position's logits [vocab]."""
        for s in range(0, ids.numel(), PREFILL_CHUNK):
            logits = self.model.forward(ids[s:s + PREFILL_CHUNK], cache, last_only=True)
        return logits[-1]

    # ---- public API -----------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One full forward pass: float32 logits [len(token_ids), vocab]."""
        ids = self._tokens(token_ids)
        self._check_context(ids.numel())
        return self.model.forward(ids, self.new_cache(ids.numel()))

    def generate(self, token_ids: Sequence[int] | torch.Tensor, max_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 sampling_params: SamplingParams | None = None) -> Iterator[int]:
        """Yield new token ids as they are produced; a stop token, if reached, is yielded last.

        stop_token_ids=None stops at harmony's <|return|> and <|call|>. temperature=0 is greedy.
        """
        params = sampling_params or SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            stop_token_ids=None if stop_token_ids is None else list(stop_token_ids))
        params.validate()
        ids = self._tokens(token_ids)
        self._check_context(ids.numel() + params.max_tokens)
        return self._generate(ids, params)

    def _generate(self, ids: torch.Tensor, params: SamplingParams, steering: Steering | None = None) -> Iterator[int]:
        seq = Generation(self, ids, params, steering)
        try:
            while not seq.finished:
                tok = seq.step()
                if tok is not None:
                    yield tok
        finally:
            seq.free()  # also when the consumer stops early

    # ---- harmony chat -----------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               reasoning_effort: str = "medium", **options: Any) -> list[int]:
        """The exact harmony prompt token ids for OpenAI-style `messages` (ends with `<|start|>assistant`).

        options: builtin_tools=["browser", "python"], conversation_start_date, model_identity, knowledge_cutoff.
        """
        return harmony.render(messages, tools, reasoning_effort, **options)

    def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, reasoning_effort: str = "medium",
             stream: bool = False, max_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
             **options: Any) -> harmony.ChatResult | Iterator[harmony.ChatDelta]:
        """Answer a conversation. Returns a ChatResult (.reasoning, .content, .tool_calls, .finish_reason), or
        with stream=True an iterator of ChatDeltas (reasoning / content / tool_call pieces, then "finish").

        max_tokens=None allows the rest of the context window.
        """
        prompt = self.render(messages, tools, reasoning_effort, **options)
        if max_tokens is None:
            max_tokens = self.config.max_context - len(prompt)
        tokens = self.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               min_p=min_p, seed=seed, stop_token_ids=harmony.STOP_TOKEN_IDS)
        deltas = self._chat_deltas(tokens, len(prompt), max_tokens)
        if stream:
            return deltas
        for delta in deltas:
            if delta.kind == "finish":
                return delta.result
        raise AssertionError("the chat stream ended without a finish delta")

    @staticmethod
    def _chat_deltas(tokens: Iterator[int], n_prompt: int, max_tokens: int) -> Iterator[harmony.ChatDelta]:
        parser = harmony.ChatParser(prompt_tokens=n_prompt)
        n, tok = 0, None
        try:
            for tok in tokens:
                n += 1
                yield from parser.feed(tok)
        finally:
            if hasattr(tokens, "close"):
                tokens.close()  # the consumer stopped early (Ctrl-C, disconnect): stop generating
        yield from parser.finish(hit_length=n >= max_tokens and tok not in harmony.STOP_TOKEN_IDS)

    def _next_script(self, prompt: torch.Tensor) -> list[int]:
        """Test hook (OSSIE_TEST_SCRIPT): the token ids of the scripted completion for this prompt. Entries are
        harmony texts, used in turn, or {"match": TEXT, "completion": TEXT}, used when TEXT is in the prompt."""
        enc = harmony.harmony_encoding()
        text = None
        prompt_text = enc.decode(prompt.tolist())
        found = [(prompt_text.rfind(e["match"]), e["completion"]) for e in self._script
                 if isinstance(e, dict) and e.get("match", "\0") in prompt_text]
        if found:  # the marker latest in the prompt (the newest message) decides
            text = max(found)[1]
        if text is None:
            turns = [e for e in self._script if isinstance(e, str)] or ["<|channel|>final<|message|><|return|>"]
            text = turns[self._script_turn % len(turns)]
            self._script_turn += 1
        return list(enc.encode(text, allowed_special="all"))

    def _check_context(self, n: int) -> None:
        if n > self.config.max_context:
            raise ValueError(f"{n} tokens exceed the model's context of {self.config.max_context}")
