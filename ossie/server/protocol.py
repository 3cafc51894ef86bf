"""The OpenAI wire format: pydantic models of the requests ossie accepts and of the responses it sends, and the
OpenAI-shaped error (`APIError`). Request bodies accept and ignore unknown fields, as vLLM's do."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

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


def error_for(path: str, message: str, type: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> dict:
    """The error body a client of `path` reads: Ollama's {"error": "..."} on Ollama's paths (its client shows an
    OpenAI-shaped body as a dict), OpenAI's everywhere else."""
    if path.startswith("/api/"):
        return {"error": message}
    return error_body(message, type, param, code)


class APIError(Exception):
    """A request that cannot be served: its HTTP status and the OpenAI-style body that says why."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


# ---- requests -------------------------------------------------------------------------------------------------

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_DESCRIPTION = 16384  # characters of a tool's description
MAX_SCHEMA_DEPTH = 32  # nesting of a tool's parameters schema
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
MAX_STOPS, MAX_STOP_CHARS = 16, 4096


def check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """A JSON Schema as far as ossie reads it: objects all the way down, `type` a JSON type (or a list of them),
    `properties` an object of schemas, `required` a list of names, bounded nesting."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON Schema object")
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{where}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
        raise ValueError(f"{where}.type must be one of {sorted(JSON_TYPES)} (or a list of them), got {kind!r}")
    if "required" in schema and not (isinstance(schema["required"], list)
                                     and all(isinstance(r, str) for r in schema["required"])):
        raise ValueError(f"{where}.required must be a list of property names")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties must be an object")
        for name, sub in props.items():
            check_schema(sub, f"{where}.properties.{name}", depth + 1)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            check_schema(schema[key], f"{where}.{key}", depth + 1)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if key in schema:
            if not isinstance(schema[key], list):
                raise ValueError(f"{where}.{key} must be a list of schemas")
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                check_schema(sub, f"{where}.{key}.{name}", depth + 1)


def check_function(fn: Any, where: str) -> None:
    """A function tool's definition: a valid name, a bounded description, a parameters schema."""
    if not isinstance(fn, dict):
        raise ValueError(f"{where} must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) < 80 else name[:80] + "..."
        raise ValueError(f"{where}.name must be 1-64 letters, digits, underscores or dashes, got {shown!r}")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.description must be a string")
    if description and len(description) > MAX_DESCRIPTION:
        raise ValueError(f"{where}.description is longer than {MAX_DESCRIPTION} characters")
    if fn.get("parameters") is not None:
        check_schema(fn["parameters"], f"{where}.parameters")


def check_tools(tools: list[Any] | None, nested: bool) -> list[Any] | None:
    """Function tools as Chat Completions (`nested`: {"type": "function", "function": {...}}) or the Responses API
    (the function's fields beside "type") declare them. Other tool types pass on (harmony refuses them)."""
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object")
        if tool.get("type", "function") == "function":
            check_function(tool.get("function") if nested else tool, f"tools[{i}]" + (".function" if nested else ""))
    return tools


def check_tool_choice(choice: Any, nested: bool) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function") if nested else choice
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return choice
    shape = '{"type": "function", "function": {"name": ...}}' if nested else '{"type": "function", "name": ...}'
    raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {shape}")


class StrictBody(BaseModel):
    # strict: "16" is not a number nor "yes" a boolean, and true is not 1 (pydantic's lax mode would take them)
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        """No lone surrogates ("\\ud800" in the JSON) anywhere: they are not text, and nothing downstream (the
        tokenizer, an error message naming the value) can encode them."""
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("the request holds a lone surrogate (such as \\ud800): not valid Unicode") from None
        except RecursionError:
            raise ValueError("the request nests too deeply") from None
        except TypeError:  # raw bytes: a body that reached validation unparsed (server.middleware.JSONBodies)
            raise ValueError("the request body must be a JSON object") from None
        return data


class StreamOptions(StrictBody):
    include_usage: bool = False


class SamplingRequest(StrictBody):
    """What every generating request has."""
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's: no stop token before this many tokens
    stream: bool = False
    cache_salt: str | None = Field(default=None, max_length=1024)  # vLLM's: honoured from a trusted gateway only

    def to_sampling_params(self, max_tokens: int, stop_token_ids: list[int] | None) -> SamplingParams:
        p = SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                           top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                           stop_token_ids=stop_token_ids, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
                           min_tokens=self.min_tokens or 0)
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

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        return stop

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class _WithTools(StrictBody):
    """Function tools and tool_choice, as Chat Completions (NESTED_TOOLS: {"type": "function", "function": {...}})
    or the Responses API (the function's fields beside "type") declares them."""
    NESTED_TOOLS: ClassVar[bool] = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools: list[Any] | None) -> list[Any] | None:
        return check_tools(tools, nested=cls.NESTED_TOOLS)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice: Any) -> Any:
        return check_tool_choice(choice, nested=cls.NESTED_TOOLS)


class ChatCompletionRequest(_Completions, _WithTools):
    messages: list[dict[str, Any]] = Field(min_length=1)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, fmt: dict | None) -> dict | None:
        if fmt is None:
            return fmt
        kind = fmt.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format.json_schema must be an object with a schema")
            check_schema(spec.get("schema"), "response_format.json_schema.schema")
        return fmt


class CompletionRequest(_Completions):
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None


class ResponsesRequest(SamplingRequest, _WithTools):
    NESTED_TOOLS: ClassVar[bool] = False
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, text: dict | None) -> dict | None:
        fmt = (text or {}).get("format")
        if fmt is None:
            return text
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"text.format.type must be text, json_object or json_schema, got {kind!r}")
        if kind == "json_schema":
            check_schema(fmt.get("schema"), "text.format.schema")
        return text


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
    annotations: list[dict] | None = None  # url_citation, when the server's browser tool was used


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
