"""ossie: an exact, fast inference engine and server for OpenAI's gpt-oss models."""

from .engine.sampling import SamplingParams
from .llm import LLM
from .model.checkpoint import CheckpointError, ModelNotFoundError
from .model.config import ConfigError, ModelConfig

__all__ = ["LLM", "SamplingParams", "ModelConfig", "CheckpointError", "ConfigError", "ModelNotFoundError"]
__version__ = "0.1.0"
