"""What every endpoint needs: the engine, the served model names and the checks they share (vLLM's
`OpenAIServing`). One `Serving` lives on `app.state.serving`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..engine import Engine
from ..model.config import ModelConfig
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard


@dataclass
class Serving:
    engine: Engine
    config: ModelConfig
    names: list[str]
    created: int = field(default_factory=lambda: int(time.time()))

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

    def budget(self, prompt: list[int], requested: int | None, param: str) -> int:
        """The tokens a request may generate: what it asks for (all the room left when None), if it fits."""
        context = self.config.max_context
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) fills the model's context of {context} tokens",
                           "messages", "context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"{param}={requested} plus the prompt ({len(prompt)} tokens) exceeds the model's "
                                f"context of {context} tokens", param, "context_length_exceeded")
        return requested

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, max_model_len=self.config.max_context)
