"""The serving engine, split as nano-vllm splits it: a `Sequence` per request, a `Scheduler` that picks each
step's batch, a `ModelRunner` that owns the model and the KV memory and samples, and the `Engine` loop that
ties them together on one thread and reports typed events."""

from .llm_engine import Cancelled, Engine, EngineStats, Event, Failed, Finished, Handle, Token, stream
from .model_runner import PREFILL_CHUNK, ModelRunner
from .prefix_cache import DEFAULT_BUDGET_GB, PrefixCache
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status, check_prompt

__all__ = ["DEFAULT_BUDGET_GB", "PREFILL_CHUNK", "Cancelled", "Engine", "EngineStats", "Event", "Failed", "Finished",
           "Handle", "ModelRunner", "PrefixCache", "SamplingParams", "Scheduler", "Sequence", "Status", "Token",
           "check_prompt", "sample", "stream"]
