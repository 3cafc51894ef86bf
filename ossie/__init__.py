"""ossie: an exact, fast inference engine and server for OpenAI's gpt-oss models."""

from .checkpoint import CheckpointError, ModelNotFoundError
from .config import ConfigError, ModelConfig
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "ModelConfig", "CheckpointError", "ConfigError", "ModelNotFoundError"]
__version__ = "0.1.0"
