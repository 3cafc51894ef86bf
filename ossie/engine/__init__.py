"""The serving engine, split as nano-vllm splits it: a `Sequence` per request, a `Scheduler` that picks each
step's batch, a `ModelRunner` that owns the model and the KV memory and samples, and the `Engine` whose one
`step()` ties them together and reports typed events, to the library and the server alike (client.py)."""

from ..defaults import DEFAULT_BUDGET_GB, PREFILL_CHUNK
from .client import EngineClient, Generation
from .llm_engine import Cancelled, Engine, EngineStats, Event, Failed, Finished, Handle, RequestMetrics, Token
from .model_runner import ModelRunner
from .prefix_cache import EVERYONE, CacheScope, PrefixCache
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status, check_prompt
from .speculative import DraftSource, NgramDraft, Speculator

__all__ = ["DEFAULT_BUDGET_GB", "EVERYONE", "PREFILL_CHUNK", "CacheScope", "Cancelled", "DraftSource", "Engine",
           "EngineClient", "EngineStats", "Event", "Failed", "Finished", "Generation", "Handle", "ModelRunner",
           "NgramDraft", "PrefixCache", "RequestMetrics", "SamplingParams", "Scheduler", "Sequence", "Speculator",
           "Status", "Token", "check_prompt", "sample"]
