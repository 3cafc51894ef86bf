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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import backends
from .backends import Backend
from .chat import harmony
from .chat.answer import Answer
from .engine import Engine, Generation, ModelRunner, PrefixCache, SamplingParams, Speculator, check_prompt
from .engine_args import DTYPE_NAMES, EngineArgs
from .model.checkpoint import detect_layout, is_synthetic, load_config, load_weights, resolve_model
from .model.q8 import quantize_weights
from .model.transformer import Transformer
from .special_tokens import STOP_TOKEN_IDS
from .tools import BuiltinTools, ToolSettings

log = logging.getLogger("ossie")
# LLM freezes what loading made (gc.freeze); at exit it goes back within the collector's reach, so that the
# interpreter's last collections free it as they would have (extension modules count what is never freed)
atexit.register(gc.unfreeze)

DTYPES = {name: torch.bfloat16 if name.startswith("b") else torch.float32 for name in DTYPE_NAMES}


class LLM:
    """A gpt-oss model ready to run.

    model: a local folder (Hugging Face layout, the original layout, or a repo folder holding both) or a
    Hugging Face repo id such as "openai/gpt-oss-20b". options: EngineArgs' (ossie/engine_args.py), as keywords:
    device, dtype, layout, num_threads, backend ("auto", "cpu" for ossie's C kernels, "torch" for the reference,
    "cuda", or a Backend object), prefill_chunk, enable_prefix_caching, kv_cache_gb (KV memory for the running
    requests and cached prefixes together: the engine preempts and evicts to stay within it), quantization="q8"
    (the attention projections and the unembedding held in 8 bits and a prompt's experts on int8 activations,
    ossie.model.q8, for faster decoding and prompts on a CPU at a small, measured cost in accuracy; None: exact),
    kv_cache_dtype="q8" (keys and values cached as q8: 13 KiB a position for the 20b instead of 24 KiB in bf16, so
    that the full 131,072-token context fits beside the 20b in 16 GiB; CPU), max_num_seqs (requests generating at
    once), prefill_while_decoding.
    """

    def __init__(self, model: str | Path, progress: bool = True, **options: Any):
        self.args = args = EngineArgs(model, **options)
        backends.set_num_threads(args.num_threads)
        t0 = time.perf_counter()
        self.path = resolve_model(model, args.layout)
        self.layout, folder = detect_layout(self.path, args.layout)
        self.config = load_config(folder, self.layout)
        self.synthetic = is_synthetic(folder)  # random weights (ossie synth): what they say is random
        self.dtype, self.device = DTYPES[args.dtype], torch.device(args.device)
        backends.check_options(args, self.device, self.dtype, self.config.head_dim)
        backend = args.backend
        self.backend = backend if isinstance(backend, Backend) else backends.select_backend(self.device, backend)
        weights = load_weights(folder, self.layout, self.config, self.dtype, self.device, progress=progress)
        if args.quantization == "q8":
            quantize_weights(weights, backends.q8_quantizer())
        self.quantization, self.kv_cache_dtype = args.quantization, args.kv_cache_dtype
        self.model = Transformer(self.config, weights, self.dtype, self.backend)
        budget = int(args.kv_cache_gb * 2**30)
        prefix_cache = PrefixCache(self.config, budget) if args.enable_prefix_caching else None
        self.runner = ModelRunner(self.model, args.prefill_chunk, prefix_cache, kv_budget=budget,
                                  quantized_kv=args.kv_cache_dtype == "q8")
        speculator = (Speculator(args.num_speculative_tokens, rows=self.backend.decoding_rows)
                      if args.speculative == "ngram" else None)
        self.engine = Engine(self.runner, max_running=args.max_num_seqs,
                             prefill_while_decoding=args.prefill_while_decoding, speculator=speculator)
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
