"""ossie: an exact, fast inference engine and server for OpenAI's gpt-oss models.

The public names are imported on first use (PEP 562), so `ossie --help` and `ossie --version` answer without
loading torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams", "ModelConfig", "CheckpointError", "ConfigError", "ModelNotFoundError"]
__version__ = "0.1.0"

_WHERE = {"LLM": ".llm", "SamplingParams": ".engine.sampling", "ModelConfig": ".model.config",
          "ConfigError": ".model.config", "CheckpointError": ".model.checkpoint",
          "ModelNotFoundError": ".model.checkpoint"}

if TYPE_CHECKING:
    from .engine.sampling import SamplingParams
    from .llm import LLM
    from .model.checkpoint import CheckpointError, ModelNotFoundError
    from .model.config import ConfigError, ModelConfig


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'ossie' has no attribute {name!r}")
