"""`ossie serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for gpt-oss.

Endpoints: GET /health, /metrics, /v1/models; POST /v1/chat/completions, /v1/responses, /v1/completions.
Conventions follow vLLM's for gpt-oss: the answer's reasoning is `reasoning_content` (and `reasoning`),
harmony tool calls become `tool_calls` with finish_reason "tool_calls". Every request goes through one
`Engine` (engine.py), which owns the model. Errors are OpenAI-shaped: {"error": {"message", "type", "param",
"code"}} with a 4xx status for anything the client got wrong; one failing request never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import constraints, harmony
from .engine import Engine
from .engine import Request as EngineRequest
from .llm import LLM
from .sampling import SamplingParams
from .tokenizer import harmony_encoding, token_bytes

log = logging.getLogger("ossie")

STORED_RESPONSES = 1000  # responses kept for previous_response_id (least recently used dropped first)
ENDOFTEXT = 199_999


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param,
                                                                        self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request bodies (unknown fields are accepted and ignored, as vLLM does) ---------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What every generating request has."""
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stream: bool = False


class _Completions(_Sampling):
    """What chat completions and completions share."""
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)


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


class ResponsesRequest(_Sampling):
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


# ---- running a generation from async code -------------------------------------------------------------------


class Run:
    """One request in the engine, seen from the event loop: `async for tok in run.tokens()`; closing that iterator
    early (a disconnect, a stop string) cancels the generation, which frees its KV cache."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams,
                 steering: constraints.Steering | None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.finish_reason: str | None = None
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.handle = engine.submit(EngineRequest(prompt, params, steering), self._on_event)

    def _on_event(self, kind: str, value: Any) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def tokens(self) -> AsyncIterator[int]:
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "token":
                    self.completion_tokens += 1
                    yield value
                elif kind == "done":
                    self.finish_reason = value
                    return
                elif kind == "error":
                    raise APIError(500, f"generation failed: {value}", type="server_error")
                else:  # cancelled
                    self.finish_reason = "cancelled"
                    return
        finally:
            self.handle.cancel()  # a no-op once finished


async def _watch_disconnect(request: Request, run: Run) -> None:
    """Non-streaming requests: a client that goes away cancels its generation."""
    while run.finish_reason is None:
        if await request.is_disconnected():
            run.handle.cancel()
            return
        await asyncio.sleep(0.25)


class StopStrings:
    """Cuts text at the first stop string, holding back a tail that could be the start of one."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.pending = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextDecoder:
    """Token ids to text as they come, never splitting a UTF-8 character; special tokens are skipped."""

    def __init__(self) -> None:
        self.buf = b""
        self.vocab = token_bytes()

    def push(self, tok: int) -> str:
        if tok >= len(self.vocab):
            return ""
        self.buf += self.vocab[tok]
        for end in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:end].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[end:]
            return text
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""  # not UTF-8 at all
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text


# ---- the app ------------------------------------------------------------------------------------------------------


def create_app(llm: LLM, served_model_names: Iterable[str] | None = None, api_key: str | None = None,
               max_running: int = 16) -> FastAPI:
    names = list(served_model_names or [str(llm.path)])
    engine = Engine(llm, max_running=max_running)
    stored: OrderedDict[str, dict] = OrderedDict()  # response id -> {"response": ..., "messages": ...}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="ossie", description="OpenAI-compatible server for gpt-oss", lifespan=lifespan)
    app.state.engine, app.state.llm = engine, llm

    # -- errors
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            msg, param = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", ".".join(loc) or None
        return JSONResponse(status_code=400, content=error_body(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=e.status_code, content=error_body(str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(status_code=500, content=error_body(f"internal error: {e}", "server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return JSONResponse(status_code=401, content=error_body(
                    "Incorrect API key provided", code="invalid_api_key"))
        return await call_next(request)

    def check_model(model: str) -> str:
        if model not in names:
            raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(names)}", "model",
                           "model_not_found")
        return model

    def check_request(req: ChatCompletionRequest | CompletionRequest) -> None:
        """What chat and text completions refuse alike: an unknown model, several choices, logprobs."""
        check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")

    def budget(prompt: list[int], requested: int | None, param: str) -> int:
        room = llm.config.max_context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) fills the model's context of "
                                f"{llm.config.max_context} tokens", "messages", "context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"{param}={requested} plus the prompt ({len(prompt)} tokens) exceeds the model's "
                                f"context of {llm.config.max_context} tokens", param, "context_length_exceeded")
        return requested

    def params(req: _Sampling, max_tokens: int, stop_ids: list[int] | None) -> SamplingParams:
        p = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_token_ids=stop_ids,
                           top_k=req.top_k or 0, min_p=req.min_p or 0.0)
        try:
            p.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return p

    # -- info
    @app.get("/health")
    async def health() -> dict:
        s = engine.snapshot()
        return {"status": "ok", "model": names[0], **vars(s)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        s = engine.snapshot()
        lines = [f"ossie_requests_waiting {s.waiting}", f"ossie_requests_running {s.running}",
                 f"ossie_requests_finished_total {s.finished}", f"ossie_requests_cancelled_total {s.cancelled}",
                 f"ossie_requests_failed_total {s.failed}", f"ossie_prompt_tokens_total {s.prompt_tokens}",
                 f"ossie_generation_tokens_total {s.generated_tokens}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "ossie",
                "max_model_len": llm.config.max_context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return model_card(check_model(model))

    # -- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_request(req)
        messages, tools = list(req.messages), req.tools
        steering = chat_steering(tools, req.tool_choice, req.response_format, messages)
        try:
            prompt = harmony.render(messages, tools, req.reasoning_effort or "medium")
        except harmony.ChatFormatError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = budget(prompt, req.max_completion_tokens or req.max_tokens,
                            "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        if steering is not None:
            steering.reasoning_budget = reasoning_budget(max_tokens)
        run = Run(engine, prompt, params(req, max_tokens, list(harmony.STOP_TOKEN_IDS)), steering)
        cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        stops = StopStrings(req.stop)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return sse(chat_stream(run, stops, cid, now, req.model, usage))
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            result = None
            async for delta in chat_deltas(run, stops):
                if delta.kind == "finish":
                    result = delta.result
        finally:
            watcher.cancel()
        message: dict[str, Any] = {"role": "assistant", "content": result.content or None,
                                   "reasoning_content": result.reasoning or None, "reasoning": result.reasoning or None}
        if result.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in result.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                             "logprobs": None}],
                "usage": chat_usage(result)}

    def chat_steering(tools: list | None, tool_choice: Any, response_format: dict | None,
                      messages: list[dict]) -> constraints.Steering | None:
        declared = [t.get("function", t).get("name") for t in tools or [] if isinstance(t, dict)]
        if response_format is not None:
            kind = response_format.get("type")
            if kind == "json_schema":
                spec = response_format.get("json_schema") or {}
                if not isinstance(spec.get("schema"), dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                                   "response_format")
                messages.append({"role": "developer", "content": "Answer with a JSON object matching this JSON "
                                 "schema, and nothing else:\n" + json.dumps(spec["schema"])})
            elif kind == "json_object":
                messages.append({"role": "developer", "content": "Answer with a JSON object, and nothing else."})
            elif kind != "text":
                raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                                    "json_schema)", "response_format")
        if tool_choice in (None, "auto"):
            pass
        elif tool_choice == "none":
            return constraints.answer_steering(json=response_format is not None
                                               and response_format.get("type") != "text")
        elif tool_choice == "required":
            if not declared:
                raise APIError(400, "tool_choice 'required' needs tools", "tool_choice")
            return constraints.tool_call_steering(declared)
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
            if name not in declared:
                raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools",
                               "tool_choice")
            return constraints.tool_call_steering([name])
        else:
            raise APIError(400, f"unknown tool_choice {tool_choice!r} (auto, none, required, or "
                                '{"type": "function", "function": {"name": ...}})', "tool_choice")
        if response_format is not None and response_format.get("type") != "text":
            return constraints.answer_steering(json=True)
        return None

    async def chat_deltas(run: Run, stops: StopStrings) -> AsyncIterator[harmony.ChatDelta]:
        """The parser's deltas, with the answer cut at a stop string (which ends the generation)."""
        parser = harmony.ChatParser(prompt_tokens=run.prompt_tokens)
        sent = ""
        async with contextlib.aclosing(run.tokens()) as tokens:  # leaving early cancels the generation at once
            async for tok in tokens:
                for d in parser.feed(tok):
                    if d.kind == "content":
                        d.text = stops.push(d.text)
                        sent += d.text
                        if not d.text:
                            continue
                    yield d
                if stops.hit:
                    break
        tail = stops.flush()
        if tail:
            sent += tail
            yield harmony.ChatDelta("content", tail)
        for d in parser.finish(hit_length=run.finish_reason == "length"):
            if d.kind == "content":
                d.text = stops.push(d.text) + stops.flush()
                sent += d.text
                if not d.text:
                    continue
            if d.kind == "finish" and stops.stops:
                d.result.content = sent
                if stops.hit:
                    d.result.finish_reason = "stop"
            yield d

    def chat_usage(result: harmony.ChatResult) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}

    async def chat_stream(run: Run, stops: StopStrings, cid: str, now: int, model_name: str,
                          include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                body["usage"] = None
            return data(body)

        yield chunk({"role": "assistant", "content": ""})
        content = ""
        async for d in chat_deltas(run, stops):
            if d.kind == "reasoning":
                yield chunk({"reasoning_content": d.text, "reasoning": d.text})
            elif d.kind == "content":
                content += d.text
                yield chunk({"content": d.text})
            elif d.kind == "tool_call":
                call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.text}}
                if d.name is not None:
                    call.update(id=d.id, type="function")
                    call["function"]["name"] = d.name
                yield chunk({"tool_calls": [call]})
            else:
                yield chunk({}, d.result.finish_reason)
                if include_usage:
                    yield data({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                "choices": [], "usage": chat_usage(d.result)})
        yield data("[DONE]")

    # -- completions (raw text, no harmony)
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_request(req)
        if isinstance(req.prompt, list) and req.prompt and all(isinstance(x, int) for x in req.prompt):
            prompt = list(req.prompt)
            if any(not 0 <= t < llm.config.vocab_size for t in prompt):
                raise APIError(400, "prompt holds token ids outside the vocabulary", "prompt")
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(texts) != 1:
                raise APIError(400, "give one prompt (a string or a list of token ids)", "prompt")
            prompt = list(harmony_encoding().encode(texts[0], allowed_special="all"))
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        run = Run(engine, prompt, params(req, budget(prompt, req.max_tokens, "max_tokens"),
                                         [ENDOFTEXT, *harmony.STOP_TOKEN_IDS]), None)
        cid, now = "cmpl-" + uuid.uuid4().hex, int(time.time())
        echo = harmony_encoding().decode(prompt) if req.echo else ""

        async def pieces() -> AsyncIterator[str]:
            decoder, stops = TextDecoder(), StopStrings(req.stop)
            if echo:
                yield echo
            async with contextlib.aclosing(run.tokens()) as tokens:
                async for tok in tokens:
                    text = stops.push(decoder.push(tok))
                    if text:
                        yield text
                    if stops.hit:
                        break
            tail = stops.push(decoder.flush()) + stops.flush()
            if tail:
                yield tail
            if stops.hit:
                run.finish_reason = "stop"

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": run.completion_tokens,
                    "total_tokens": len(prompt) + run.completion_tokens}

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            async def stream() -> AsyncIterator[str]:
                async for text in pieces():
                    yield data({"id": cid, "object": "text_completion", "created": now, "model": req.model,
                                      "choices": [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": None}]})
                yield data({"id": cid, "object": "text_completion", "created": now, "model": req.model,
                            "choices": [{"index": 0, "text": "", "logprobs": None,
                                         "finish_reason": run.finish_reason}]})
                if include_usage:
                    yield data({"id": cid, "object": "text_completion", "created": now, "model": req.model,
                                "choices": [], "usage": usage()})
                yield data("[DONE]")

            return sse(stream())
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            text = "".join([t async for t in pieces()])
        finally:
            watcher.cancel()
        return {"id": cid, "object": "text_completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}],
                "usage": usage()}

    # -- responses
    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        check_model(req.model)
        history: list[dict] = []
        if req.previous_response_id:
            if req.previous_response_id not in stored:
                raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                               "previous_response_id", "previous_response_not_found")
            stored.move_to_end(req.previous_response_id)
            history = list(stored[req.previous_response_id]["messages"])
        new_messages = input_to_messages(req.input)
        messages = ([{"role": "developer", "content": req.instructions}] if req.instructions else []) + history \
            + new_messages
        tools = []
        for i, t in enumerate(req.tools or []):
            if t.get("type") != "function":
                raise APIError(400, f"tools[{i}]: type {t.get('type')!r} is not supported (function tools only)",
                               f"tools[{i}].type")
            tools.append({"type": "function", "function": {k: t.get(k) for k in ("name", "description",
                                                                                  "parameters")}})
        choice = req.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            choice = {"type": "function", "function": {"name": choice["name"]}}
        fmt = (req.text or {}).get("format")
        response_format = None
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            response_format = {"type": fmt["type"], "json_schema": {"schema": fmt.get("schema")}}
        effort = (req.reasoning or {}).get("effort") or "medium"
        if effort not in harmony.REASONING_EFFORTS:
            raise APIError(400, f"reasoning.effort must be one of {harmony.REASONING_EFFORTS}", "reasoning.effort")
        render_messages = list(messages)
        steering = chat_steering(tools, choice, response_format, render_messages)
        try:
            prompt = harmony.render(render_messages, tools, effort)
        except harmony.ChatFormatError as e:
            raise APIError(400, str(e), "input") from None
        max_tokens = budget(prompt, req.max_output_tokens, "max_output_tokens")
        if steering is not None:
            steering.reasoning_budget = reasoning_budget(max_tokens)
        run = Run(engine, prompt, params(req, max_tokens, list(harmony.STOP_TOKEN_IDS)), steering)
        rid = "resp_" + uuid.uuid4().hex
        base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": req.model,
                "instructions": req.instructions, "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
                "parallel_tool_calls": True, "temperature": req.temperature, "top_p": req.top_p,
                "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
                "reasoning": {"effort": effort, "summary": None}, "store": req.store,
                "text": req.text or {"format": {"type": "text"}}, "metadata": req.metadata or {}, "error": None,
                "incomplete_details": None, "usage": None}

        def finish(output: list[dict], result: harmony.ChatResult) -> dict:
            incomplete = result.finish_reason == "length"
            body = {**base, "status": "incomplete" if incomplete else "completed", "output": output,
                    "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                    "usage": {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                              "total_tokens": result.prompt_tokens + result.completion_tokens,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}}
            if req.store:
                stored[rid] = {"response": body, "messages": history + new_messages + [output_to_message(output)]}
                while len(stored) > STORED_RESPONSES:
                    stored.popitem(last=False)
            return body

        if req.stream:
            return sse(responses_stream(run, base, finish))
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            items = OutputItems()
            result = None
            async for d in chat_deltas(run, StopStrings(None)):
                if d.kind == "finish":
                    result = d.result
                else:
                    list(items.feed(d))
            list(items.close())
        finally:
            watcher.cancel()
        return finish(items.output, result)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        if response_id not in stored:
            raise APIError(404, f"Response with id '{response_id}' not found.", "response_id", "not_found")
        return stored[response_id]["response"]

    async def responses_stream(run: Run, base: dict, finish) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            seq += 1
            return named_event(kind, {"type": kind, "sequence_number": seq - 1, **fields})

        start = {**base, "status": "in_progress", "output": []}
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        items = OutputItems()
        result = None
        async for d in chat_deltas(run, StopStrings(None)):
            if d.kind == "finish":
                result = d.result
                continue
            for kind, fields in items.feed(d):
                yield event(kind, **fields)
        for kind, fields in items.close():
            yield event(kind, **fields)
        body = finish(items.output, result)
        yield event("response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body)

    return app


def reasoning_budget(max_tokens: int) -> int:
    """When the answer is demanded (tool_choice, response_format), reasoning gets at most half of max_tokens and
    leaves at least 64 tokens for the answer."""
    return max(0, min(max_tokens // 2, max_tokens - 64))


def sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events. A generation failing mid-stream ends the stream with an OpenAI-style error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield data(error_body(e.message, e.type, e.param, e.code))

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def data(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def named_event(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n"


# ---- Responses API items <-> chat messages ------------------------------------------------------------------------


def input_to_messages(items: str | list[dict]) -> list[dict]:
    """Responses `input` (a string, or message / reasoning / function_call / function_call_output items) as
    Chat Completions messages, which harmony.render understands."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: str | None = None  # a reasoning item belongs to the assistant turn that follows it
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}: unknown role {role!r}", f"{where}.role")
            message = {"role": role, "content": item.get("content")}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            if not item.get("name") or not item.get("call_id"):
                raise APIError(400, f"{where}: a function_call item needs name and call_id", where)
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}]}
            if reasoning:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise APIError(400, f"{where}: a function_call_output item needs call_id", where)
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise APIError(400, f"{where}: input item type {kind!r} is not supported", f"{where}.type")
    return messages


def output_to_message(output: list[dict]) -> dict:
    """A response's output items as one assistant chat message (for previous_response_id)."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "reasoning":
            message["reasoning_content"] = "".join(c["text"] for c in item["content"])
        elif item["type"] == "message":
            message["content"] += "".join(c["text"] for c in item["content"])
        elif item["type"] == "function_call":
            message.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return message


class OutputItems:
    """Chat deltas as Responses output items (reasoning, message, function_call) and their stream events."""

    def __init__(self) -> None:
        self.output: list[dict] = []
        self.item: dict | None = None  # the item being streamed
        self.call_index: int | None = None

    def _events_close(self) -> Iterable[tuple[str, dict]]:
        item, self.item = self.item, None
        if item is None:
            return
        at = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["status"] = "completed"
        if item["type"] in ("reasoning", "message"):
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            yield f"response.{kind}.done", {**at, "content_index": 0, "text": part["text"]}
            yield "response.content_part.done", {**at, "content_index": 0, "part": part}
        else:
            yield "response.function_call_arguments.done", {**at, "arguments": item["arguments"]}
        yield "response.output_item.done", {"output_index": at["output_index"], "item": item}

    def _open(self, item: dict) -> Iterable[tuple[str, dict]]:
        yield from self._events_close()
        self.output.append(item)
        self.item = item
        shown = {**item, "status": "in_progress"}
        if item["type"] in ("reasoning", "message"):
            shown["content"] = []
        yield "response.output_item.added", {"output_index": len(self.output) - 1, "item": shown}
        if item["type"] in ("reasoning", "message"):
            yield "response.content_part.added", {"item_id": item["id"], "output_index": len(self.output) - 1,
                                                  "content_index": 0, "part": dict(item["content"][0])}

    def feed(self, d: harmony.ChatDelta) -> Iterable[tuple[str, dict]]:
        if d.kind in ("reasoning", "content"):
            kind = "reasoning" if d.kind == "reasoning" else "message"
            if self.item is None or self.item["type"] != kind:
                if kind == "reasoning":
                    item = {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "summary": [],
                            "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
                else:
                    item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant",
                            "status": "in_progress", "content": [{"type": "output_text", "text": "",
                                                                  "annotations": [], "logprobs": []}]}
                yield from self._open(item)
            self.item["content"][0]["text"] += d.text
            event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            yield event, {"item_id": self.item["id"], "output_index": len(self.output) - 1, "content_index": 0,
                          "delta": d.text}
        elif d.kind == "tool_call":
            if d.name is not None:
                self.call_index = d.index
                yield from self._open({"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "call_id": d.id,
                                       "name": d.name, "arguments": "", "status": "in_progress"})
            if d.text:
                self.item["arguments"] += d.text
                yield "response.function_call_arguments.delta", {
                    "item_id": self.item["id"], "output_index": len(self.output) - 1, "delta": d.text}

    def close(self) -> Iterable[tuple[str, dict]]:
        yield from self._events_close()
