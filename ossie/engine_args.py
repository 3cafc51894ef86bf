"""`EngineArgs`: every option of a loaded model and its engine, in one place (vLLM's `EngineArgs`). `ossie.LLM(model,
**options)` takes them as keywords, and the command line as flags that `from_cli_args` reads by name: an option is
added here, and to the flags, and nowhere between (it was threaded by hand through cli.py, LLM and the runner).
No torch here: the command line checks the values before anything heavy is imported."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_BUDGET_GB, NUM_SPECULATIVE_TOKENS, PREFILL_CHUNK

DTYPE_NAMES = ("bfloat16", "bf16", "float32", "fp32")
QUANTIZATIONS = ("q8",)  # None: exact
KV_CACHE_DTYPES = ("auto", "q8")
SPECULATIVE = ("ngram",)  # None: off
# options whose command-line flag has an older name than the option's (--threads, --max-running)
CLI_DEST = {"num_threads": "threads", "max_num_seqs": "max_running"}


@dataclass
class EngineArgs:
    """model: a local folder, a Hugging Face repo id or an Ollama-style name. device, dtype ("bfloat16" or "float32":
    the non-expert weights), layout ("hf" or "original" where a folder has both). num_threads: CPU threads (None: every
    core this process may use). backend: "auto", "cpu", "torch", "cuda", or a Backend object. prefill_chunk: tokens
    a step computes for one sequence (and for all together). enable_prefix_caching, kv_cache_gb: the KV memory of
    the running requests and the cached prefixes together (the engine preempts and evicts to stay within it).
    quantization: None (exact) or "q8" (ossie.model.q8). kv_cache_dtype: "auto" or "q8". max_num_seqs: requests
    generating at once (one batch; more wait). prefill_while_decoding: prompt tokens a step computes while other
    requests decode (None: a whole chunk; the server's default is 64). speculative: None (off) or "ngram" (requests
    guess what follows from their own text and check the guesses in one step; engine/speculative.py),
    num_speculative_tokens: the guesses a step checks at most for one request."""

    model: str | Path
    device: str = "cpu"
    dtype: str = "bfloat16"
    layout: str | None = None
    num_threads: int | None = None
    backend: Any = None
    prefill_chunk: int = PREFILL_CHUNK
    enable_prefix_caching: bool = True
    kv_cache_gb: float = DEFAULT_BUDGET_GB
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 16
    prefill_while_decoding: int | None = None
    speculative: str | None = None
    num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS

    def __post_init__(self) -> None:
        if self.speculative == "off":  # the command line's name for None
            self.speculative = None
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first option that cannot be (what needs the device or the model is checked where
        they are known: ossie.backends, LLM)."""
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.layout not in (None, "hf", "original"):
            raise ValueError(f"layout must be 'hf' or 'original', got {self.layout!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.speculative not in (None, *SPECULATIVE):
            raise ValueError(f"speculative must be one of {SPECULATIVE} or None, got {self.speculative!r}")
        for name in ("num_threads", "prefill_chunk", "max_num_seqs", "prefill_while_decoding",
                     "num_speculative_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kv_cache_gb < 0:
            raise ValueError(f"kv_cache_gb must be >= 0, got {self.kv_cache_gb}")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The options a command's flags gave (those it has; the rest keep their defaults)."""
        given = {f.name: getattr(args, CLI_DEST.get(f.name, f.name)) for f in fields(cls)
                 if hasattr(args, CLI_DEST.get(f.name, f.name))}
        return cls(**given)
