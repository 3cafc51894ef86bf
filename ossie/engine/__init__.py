"""The serving engine, split as nano-vllm splits it: a `Sequence` per request, a `Scheduler` that picks each
step's batch, a `ModelRunner` that owns the model and the KV memory and samples, and the `Engine` loop that
ties them together on one thread and reports typed events."""

from ..defaults import DEFAULT_BUDGET_GB, PREFILL_CHUNK
from .llm_engine import Cancelled, Engine, EngineStats, Event, Failed, Finished, Handle, Token, stream
from .model_runner import ModelRunner
from .prefix_cache import EVERYONE, CacheScope, PrefixCache
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status, check_prompt

__all__ = ["DEFAULT_BUDGET_GB", "EVERYONE", "PREFILL_CHUNK", "CacheScope", "Cancelled", "Engine", "EngineStats",
           "Event", "Failed", "Finished", "Handle", "ModelRunner", "PrefixCache", "SamplingParams", "Scheduler",
           "Sequence", "Status", "Token", "check_prompt", "sample", "stream"]
