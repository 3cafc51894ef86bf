"""The OpenAI wire format: pydantic models of the requests ossie accepts and of the responses it sends, and the
OpenAI-shaped error (`APIError`). Request bodies accept and ignore unknown fields, as vLLM's do."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..chat import harmony
from ..engine import SamplingParams

# ---- errors ---------------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


class APIError(Exception):
    """A request that cannot be served: its HTTP status and the OpenAI-style body that says why."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


# ---- requests -------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """What every generating request has."""
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stream: bool = False

    def to_sampling_params(self, max_tokens: int, stop_token_ids: list[int] | None) -> SamplingParams:
        p = SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                           top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                           stop_token_ids=stop_token_ids, top_k=self.top_k or 0, min_p=self.min_p or 0.0)
        try:
            p.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return p


class _Completions(SamplingRequest):
    """What chat completions and completions share."""
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Completions):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None


class CompletionRequest(_Completions):
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None


class ResponsesRequest(SamplingRequest):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


# ---- responses ------------------------------------------------------------------------------------------------


class _Sparse(BaseModel):
    """Serialized with the fields it has (no nulls for the others): stream deltas, usage without details."""

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCall(BaseModel):
    name: str
    arguments: str


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, call: harmony.ToolCall) -> ToolCall:
        return cls.model_validate(call.to_openai())


class ToolCallDelta(_Sparse):
    """A piece of a streamed tool call: the first has id, type and the name; the rest argument text only."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # served from the prefix cache, as OpenAI reports its own prompt caching


class Usage(_Sparse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
           cached_tokens: int = 0) -> Usage:
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, completion_tokens_details=details,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text, under the name some clients read
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ossie"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class ResponseObject(BaseModel):
    """A Responses API response. Output items (reasoning, message, function_call) are built as their stream events
    are (responses.OutputItems) and kept as plain objects."""
    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    instructions: str | None = None
    output: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=dict)
    store: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    usage: ResponseUsage | None = None
