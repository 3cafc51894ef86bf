"""What every endpoint needs: the engine, the served model names, the server's options and the checks they share
(vLLM's `OpenAIServing`). One `Serving` lives on `app.state.serving`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import Engine
from ..model.config import ModelConfig
from ..tools import ToolSettings
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard
from .tokenizing import Tokenizing


@dataclass
class ServerOptions:
    """What `ossie serve`'s options set."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS: origins a browser app may call from ("*": any)
    max_running: int = 16  # requests generating at once (one batch)
    max_queued: int = 256  # requests waiting beyond those; more get 429 with Retry-After
    prefill_while_decoding: int | None = 64  # prompt tokens a step computes while others decode (None: a chunk)
    max_prompt_tokens: int | None = None  # longest prompt accepted (None: the context less one token)
    default_max_tokens: int | None = None  # for requests that give no max_tokens (None: the rest of the context)
    request_timeout_s: float | None = None  # a request generates this long at most, then ends as at max_tokens
    max_body_bytes: int = 16 * 2**20
    drain_s: float = 30.0  # on SIGTERM, how long requests in flight may finish before they are cut
    builtin_tools: tuple[str, ...] = ()  # run by the server: "python", "browser" (chat completions declare them)
    tool_settings: ToolSettings = field(default_factory=ToolSettings)


@dataclass
class Serving:
    engine: Engine
    config: ModelConfig
    names: list[str]
    options: ServerOptions = field(default_factory=ServerOptions)
    tokenizing: Tokenizing = field(default_factory=Tokenizing)
    created: int = field(default_factory=lambda: int(time.time()))
    model_path: Path | None = None  # the checkpoint folder (Ollama's /api/tags reports its size and date)
    weight_bytes: int = 0  # the weights in memory
    device: str = "cpu"

    def check_model(self, model: str) -> str:
        if model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(self.names)}", "model",
                           "model_not_found")
        return model

    def check_request(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        """What chat and text completions refuse alike: an unknown model, several choices, logprobs."""
        self.check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")

    def check_capacity(self) -> None:
        """A 429 when the queue is full, before any work is spent on the request."""
        waiting = self.engine.snapshot().waiting
        if waiting >= self.options.max_queued:
            retry = max(1, math.ceil(waiting / max(1, self.options.max_running)))
            raise APIError(429, f"the server is busy ({waiting} requests waiting); retry in {retry} s",
                           code="server_busy", type="rate_limit_error", headers={"Retry-After": str(retry)})

    def budget(self, prompt: list[int], requested: int | None, param: str, prompt_param: str = "messages",
               context: int | None = None) -> int:
        """The tokens a request may generate: what it asks for (or the default, or all the room left), if the
        prompt is within the prompt limit and the whole fits the context (the model's, or a smaller one the
        request gives, as Ollama's num_ctx)."""
        context = min(context or self.config.max_context, self.config.max_context)
        limit = min(self.options.max_prompt_tokens or context, context - 1)
        if len(prompt) > limit:
            which = "the prompt limit" if limit < context - 1 else "the model's context"
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than {which} ({limit} tokens)",
                           prompt_param, "context_length_exceeded")
        room = context - len(prompt)
        if requested is None:
            return min(room, self.options.default_max_tokens or room)
        if requested > room:
            raise APIError(400, f"{param}={requested} plus the prompt ({len(prompt)} tokens) exceeds the "
                                f"context of {context} tokens", param, "context_length_exceeded")
        return requested

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, max_model_len=self.config.max_context)
