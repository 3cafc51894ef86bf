"""What every endpoint needs: the engine, the served model names, the server's options and the checks they share
(vLLM's `OpenAIServing`). One `Serving` lives on `app.state.serving`."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from ..chat import harmony
from ..engine import CacheScope, EngineClient
from ..model.config import ModelConfig
from ..tools import ToolSettings
from .middleware import principal
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard
from .tokenizing import Tokenizing

RETRY_AFTER_MAX_S = 600  # a Retry-After longer than this tells the client nothing useful


@dataclass
class ServerOptions:
    """What `ossie serve`'s options set."""

    api_keys: dict[str, str] = field(default_factory=dict)  # key -> principal name (none: no key needed)
    trust_cache_salt: bool = False  # requests' cache_salt comes from a trusted gateway: it narrows the cache scope
    shared_prefixes: tuple[str, ...] = ()  # system prompts whose rendered tokens every principal may share cached
    allowed_origins: tuple[str, ...] = ()  # CORS: origins a browser app may call from ("*": any)
    max_queued: int = 256  # requests waiting beyond those; more get 429 with Retry-After
    max_prompt_tokens: int | None = None  # longest prompt accepted (None: the context less one token)
    default_max_tokens: int | None = None  # for requests that give no max_tokens (None: the rest of the context)
    request_timeout_s: float | None = None  # a request generates this long at most, then ends as at max_tokens
    max_body_bytes: int = 16 * 2**20
    drain_s: float = 30.0  # on SIGTERM, how long requests in flight may finish before they are cut
    builtin_tools: tuple[str, ...] = ()  # run by the server: "python", "browser" (chat completions declare them)
    tool_settings: ToolSettings = field(default_factory=ToolSettings)
    webui: bool = True  # the chat page at / (--no-webui: off)


class SharedPrefixes:
    """The prompt prefixes the operator declared public (`ossie serve --shared-prefix`): each system prompt as
    harmony renders it at each reasoning effort (rendered again when the date in harmony's system message changes).
    A prompt's shared length is the longest run of tokens it starts with in common with one of them: tokens that say
    nothing about what anyone sent."""

    def __init__(self, texts: tuple[str, ...]):
        self.texts, self._day, self._tokens = texts, None, []

    def length(self, prompt: list[int]) -> int:
        if not self.texts:
            return 0
        today = datetime.date.today()
        if today != self._day:
            self._tokens = [harmony.render([{"role": "system", "content": text}], None, effort)
                            for text in self.texts for effort in harmony.REASONING_EFFORTS]
            self._day = today
        return max(_common_length(prompt, tokens) for tokens in self._tokens)


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class Serving:
    engine: EngineClient
    config: ModelConfig
    names: list[str]
    options: ServerOptions = field(default_factory=ServerOptions)
    tokenizing: Tokenizing = field(default_factory=Tokenizing)
    created: int = field(default_factory=lambda: int(time.time()))
    model_path: Path | None = None  # the checkpoint folder (Ollama's /api/tags reports its size and date)
    weight_bytes: int = 0  # the weights in memory
    device: str = "cpu"
    shared_prefixes: SharedPrefixes = field(init=False)

    def __post_init__(self) -> None:
        self.shared_prefixes = SharedPrefixes(self.options.shared_prefixes)

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
        """A 429 when the queue is full, before any work is spent on the request. The queue is what waits beyond
        the free slots: requests the engine has not yet picked up count as waiting, so a burst that arrives during
        a step found "waiting" requests while slots were free (191 of 200 refused with 16 slots, 9-13 used).
        Retry-After: when a place in the queue should free, from how long requests take now."""
        s = self.engine.snapshot()
        slots = self.engine.max_running
        queued = s.waiting + s.running - slots  # beyond what the slots take
        if queued < self.options.max_queued:
            return
        waves = (queued - self.options.max_queued) // slots + 1  # slot turnovers to wait for
        retry = min(RETRY_AFTER_MAX_S, max(1, math.ceil(waves * (s.mean_request_s or 1.0))))
        raise APIError(429, f"the server is busy ({s.waiting} requests waiting); retry in {retry} s",
                       code="server_busy", type="rate_limit_error", headers={"Retry-After": str(retry)})

    def budget(self, prompt: list[int], requested: int | None, param: str, prompt_param: str = "messages",
               context: int | None = None, default: int | None = None) -> int:
        """The tokens a request may generate: what it asks for (or the server's default, or the API's `default`,
        or all the room left), if the prompt is within the prompt limit and the whole fits the context (the
        model's, or a smaller one the request gives, as Ollama's num_ctx)."""
        context = min(context or self.config.max_context, self.config.max_context)
        limit = min(self.options.max_prompt_tokens or context, context - 1)
        if len(prompt) > limit:
            which = "the prompt limit" if limit < context - 1 else "the model's context"
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than {which} ({limit} tokens)",
                           prompt_param, "context_length_exceeded")
        room = context - len(prompt)
        if requested is None:
            return min(room, self.options.default_max_tokens or default or room)
        if requested > room:
            raise APIError(400, f"{param}={requested} plus the prompt ({len(prompt)} tokens) exceeds the "
                                f"context of {context} tokens", param, "context_length_exceeded")
        return requested

    def cache_scope(self, request: Request, prompt: list[int], cache_salt: str | None = None) -> CacheScope:
        """Whose cached prefixes a request may reuse, and who may reuse its own: its API principal's only (with a
        trusted gateway's cache_salt, that principal's for that salt); the tokens it shares with a prefix the
        operator declared public are everyone's. Without API keys every request is the same principal."""
        owner = principal(request.scope)
        if cache_salt and self.options.trust_cache_salt:
            owner = f"{owner or ''}\x00{cache_salt}"
        return CacheScope(owner, self.shared_prefixes.length(prompt))

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, max_model_len=self.config.max_context)
