"""`ossie.LLM`: load a checkpoint, run forward passes, generate tokens and chat (vLLM's API shape).

A thin facade: loading builds the model (ossie.model) on a backend chosen once (ossie.backends), a `ModelRunner`
that owns it and an `Engine` (ossie.engine) that schedules its requests; `generate` and `chat` are the engine's
blocking clients, with the scheduling, KV budget, preemption and prefix cache that the server's requests get.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .backends import Backend, cpu_kernels, select_backend
from .chat import harmony
from .chat.answer import Answer
from .engine import (
    DEFAULT_BUDGET_GB,
    PREFILL_CHUNK,
    Engine,
    Generation,
    ModelRunner,
    PrefixCache,
    SamplingParams,
    check_prompt,
)
from .model.checkpoint import detect_layout, is_synthetic, load_config, load_weights, resolve_model
from .model.q8 import KV_DTYPES, QUANTIZATIONS, quantize_weights
from .model.transformer import Transformer
from .special_tokens import STOP_TOKEN_IDS
from .tools import BuiltinTools, ToolSettings

log = logging.getLogger("ossie")
# LLM freezes what loading made (gc.freeze); at exit it goes back within the collector's reach, so that the
# interpreter's last collections free it as they would have (extension modules count what is never freed)
atexit.register(gc.unfreeze)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


class LLM:
    """A gpt-oss model ready to run.

    model: a local folder (Hugging Face layout, the original layout, or a repo folder holding both) or a
    Hugging Face repo id such as "openai/gpt-oss-20b". backend: "auto" (default), "cpu" (ossie's C kernels)
    or "torch" (the reference), or a Backend object. prefill_chunk: tokens computed per step (a prompt chunk;
    in the server, the step's budget for all requests together). kv_cache_gb: KV memory for the running
    requests and cached prefixes together (the server preempts and evicts to stay within it).
    enable_prefix_caching: keep the KV of computed tokens so that a prompt that starts like an earlier one
    computes only the rest. quantization="q8": the attention projections and the unembedding held in 8 bits
    (ossie.model.q8), for faster decoding on a CPU at a small, measured cost in accuracy; None: exact.
    kv_cache_dtype="q8": keys and values cached as q8 (int8 and a float16 scale per 32: 13 KiB a position for the
    20b instead of 24 KiB in bf16), so that the full 131,072-token context fits beside the 20b in 16 GiB (CPU); "auto":
    the model's dtype, exact. max_num_seqs: requests generating at once (one batch; more wait their turn).
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "bfloat16", layout: str | None = None,
                 num_threads: int | None = None, progress: bool = True, backend: str | Backend | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, enable_prefix_caching: bool = True,
                 kv_cache_gb: float = DEFAULT_BUDGET_GB, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", max_num_seqs: int = 16):
        if kv_cache_gb < 0:
            raise ValueError(f"kv_cache_gb must be >= 0, got {kv_cache_gb}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        cpu_kernels.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        t0 = time.perf_counter()
        self.path = resolve_model(model, layout)
        self.layout, folder = detect_layout(self.path, layout)
        self.config = load_config(folder, self.layout)
        self.synthetic = is_synthetic(folder)  # random weights (ossie synth): what they say is random
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (this torch build: "
                             f"{torch.__version__}); use --device cpu")
        self.backend = backend if isinstance(backend, Backend) else select_backend(self.device, backend)
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
        if quantization and (self.device.type != "cpu" or self.dtype != torch.bfloat16):
            raise ValueError(f"quantization {quantization!r} is for bf16 models on the CPU")
        if kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_DTYPES}, got {kv_cache_dtype!r}")
        if kv_cache_dtype == "q8" and self.device.type != "cpu":
            raise ValueError("kv_cache_dtype 'q8' is for the CPU (the GPU kernels read a bf16 cache)")
        if kv_cache_dtype == "q8" and self.config.head_dim % 32:
            raise ValueError(f"kv_cache_dtype 'q8' scales each 32 values of a head: head_dim {self.config.head_dim} "
                             "is not a multiple of 32")
        weights = load_weights(folder, self.layout, self.config, self.dtype, self.device, progress=progress)
        if quantization == "q8":
            quantize_weights(weights, cpu_kernels.quantize_q8 if cpu_kernels.available() else None)
        self.quantization = quantization
        self.model = Transformer(self.config, weights, self.dtype, self.backend)
        budget = int(kv_cache_gb * 2**30)
        prefix_cache = PrefixCache(self.config, budget) if enable_prefix_caching else None
        self.kv_cache_dtype = kv_cache_dtype
        self.runner = ModelRunner(self.model, prefill_chunk, prefix_cache, kv_budget=budget,
                                  quantized_kv=kv_cache_dtype == "q8")
        self.engine = Engine(self.runner, max_running=max_num_seqs)
        # What loading made lives as long as the model: moved out of the collector's reach, so the full collections
        # that decoding's allocations trigger now and then do not walk it (they cost ~2 % of the 20b's decode time)
        gc.collect()
        gc.freeze()
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s (%s layout, %d layers, %d experts, %s backend) in %.1f s", folder, self.layout,
                 self.config.num_layers, self.config.num_experts, self.backend.name, self.load_seconds)

    # ---- public API -----------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One full forward pass: float32 logits [len(token_ids), vocab]."""
        ids = check_prompt(token_ids, self.config.vocab_size)
        self._check_context(len(ids))
        return self.runner.logits(ids)

    def generate(self, token_ids: Sequence[int] | torch.Tensor, max_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 sampling_params: SamplingParams | None = None) -> Iterator[int]:
        """Yield new token ids as they are produced; a stop token, if reached, is yielded last.

        stop_token_ids=None stops at harmony's <|return|> and <|call|>. temperature=0 is greedy.
        """
        return iter(self._generation(token_ids, sampling_params or SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            stop_token_ids=None if stop_token_ids is None else list(stop_token_ids))))

    def _generation(self, token_ids: Sequence[int] | torch.Tensor, params: SamplingParams) -> Generation:
        params.validate()
        ids = check_prompt(token_ids, self.config.vocab_size)
        self._check_context(len(ids) + params.max_tokens)
        return Generation(self.engine, ids, params)

    # ---- harmony chat -----------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               reasoning_effort: str = "medium", **options: Any) -> list[int]:
        """The exact harmony prompt token ids for OpenAI-style `messages` (ends with `<|start|>assistant`).

        options: builtin_tools=["browser", "python"], conversation_start_date, model_identity, knowledge_cutoff.
        """
        return harmony.render(messages, tools, reasoning_effort, **options)

    def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, reasoning_effort: str = "medium",
             stream: bool = False, max_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, seed: int | None = None, builtin_tools: Sequence[Any] = (),
             tool_settings: ToolSettings | None = None, stop: str | list[str] | None = None,
             **options: Any) -> harmony.ChatResult | Iterator[harmony.ChatDelta]:
        """Answer a conversation. Returns a ChatResult (.reasoning, .content, .tool_calls, .finish_reason), or
        with stream=True an iterator of ChatDeltas (reasoning / content / tool_call pieces, then "finish").

        builtin_tools: "python" and/or "browser" (or PythonTool / BrowserTool objects, or a BuiltinTools holding a
        conversation's sessions across turns; objects stay yours): declared to the model as harmony declares them
        and run when it calls them, until it answers; each call and its output is in .builtin_calls (streamed as
        builtin_call / builtin_result deltas). tool_settings: how the
        named ones are made (sandbox limits, search backend, call limit). max_tokens=None allows the rest of the
        context window (all rounds together).
        """
        if isinstance(builtin_tools, BuiltinTools):  # a conversation's sessions, kept by the caller across turns
            session, owned = builtin_tools, False
            session.calls = 0  # the call limit is per answer
        else:
            session, owned = (BuiltinTools(builtin_tools, tool_settings) if builtin_tools else None), True
        names = session.names if session else ()
        prompt = self.render(messages, tools, reasoning_effort, builtin_tools=names, **options)
        if max_tokens is None:
            max_tokens = self.config.max_context - len(prompt)
        first = self._generation(prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                        top_k=top_k, min_p=min_p, seed=seed,
                                                        stop_token_ids=list(STOP_TOKEN_IDS)))
        answer = Answer(prompt, max_tokens, self.config.max_context, session, stop)
        deltas = self._chat_deltas(first, answer, owned)
        if stream:
            return deltas
        for delta in deltas:
            if delta.kind == "finish":
                return delta.result
        raise AssertionError("the chat stream ended without a finish delta")

    def _chat_deltas(self, gen: Generation, answer: Answer, owned: bool) -> Iterator[harmony.ChatDelta]:
        """chat/answer.py's Answer driven on this thread (the server drives the same from its event loop)."""
        try:
            while True:
                tokens = iter(gen)
                try:
                    for tok in tokens:
                        yield from answer.feed(tok)
                        if answer.stopped:
                            break
                finally:
                    tokens.close()  # the consumer stopped early (Ctrl-C, a stop string): stop generating
                call = answer.end_round(gen.finish_reason, gen.cached_tokens)
                if call is None:
                    break
                delta, prompt, room = answer.resume(call, answer.tools.run(call.recipient, call.arguments))
                yield delta
                if prompt is None:
                    break
                gen = Generation(self.engine, prompt, dataclasses.replace(gen.params, max_tokens=room))
            yield from answer.finish()
        finally:
            if answer.tools is not None and owned:
                answer.tools.close()  # the sessions this answer made (python's sandbox...): nothing outlives it

    def _check_context(self, n: int) -> None:
        if n > self.config.max_context:
            raise ValueError(f"{n} tokens exceed the model's context of {self.config.max_context}")
