"""POST /v1/chat/completions: harmony chat, streamed or not, with tools, tool_choice and response_format.

Conventions follow vLLM's for gpt-oss: the answer's reasoning is `reasoning_content` (and `reasoning`), harmony
tool calls become `tool_calls` with finish_reason "tool_calls".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ..chat import constraints, harmony
from ..chat.answer import Answer
from ..special_tokens import STOP_TOKEN_IDS
from ..tools import BuiltinTools
from .middleware import client_of
from .protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    FunctionCallDelta,
    SamplingRequest,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .serving import Serving
from .streaming import Run, cancel_on_disconnect, data, sse

router = APIRouter()


def chat_steering(tools: list | None, tool_choice: Any,
                  response_format: dict | None) -> tuple[constraints.Steering | None, list[dict]]:
    """What tool_choice and response_format demand: (the steering that enforces it or None, developer messages
    to add to the conversation so the model knows what is expected)."""
    declared = [t.get("function", t).get("name") for t in tools or [] if isinstance(t, dict)]
    instructions: list[dict] = []
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            if not isinstance(spec.get("schema"), dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                               "response_format")
            instructions.append({"role": "developer", "content": "Answer with a JSON object matching this JSON "
                                 "schema, and nothing else:\n" + json.dumps(spec["schema"])})
        elif kind == "json_object":
            instructions.append({"role": "developer", "content": "Answer with a JSON object, and nothing else."})
        elif kind != "text":
            raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                                "json_schema)", "response_format")
    wants_json = response_format is not None and response_format.get("type") != "text"
    if tool_choice in (None, "auto"):
        steering = constraints.answer_steering(json=True) if wants_json else None
    elif tool_choice == "none":
        steering = constraints.answer_steering(json=wants_json)
    elif tool_choice == "required":
        if not declared:
            raise APIError(400, "tool_choice 'required' needs tools", "tool_choice")
        steering = constraints.tool_call_steering(declared)
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if name not in declared:
            raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
        steering = constraints.tool_call_steering([name])
    else:
        raise APIError(400, f"unknown tool_choice {tool_choice!r} (auto, none, required, or "
                            '{"type": "function", "function": {"name": ...}})', "tool_choice")
    return steering, instructions


def reasoning_budget(max_tokens: int) -> int:
    """When the answer is demanded (tool_choice, response_format), reasoning gets at most half of max_tokens and
    leaves at least 64 tokens for the answer."""
    return max(0, min(max_tokens // 2, max_tokens - 64))


async def start_chat(serving: Serving, request: Request, req: SamplingRequest, messages: list[dict],
                     tools: list[dict] | None, *, tool_choice: Any, response_format: dict | None, effort: str,
                     max_tokens: int | None, max_tokens_param: str, messages_param: str,
                     context: int | None = None, default_max_tokens: int | None = None,
                     builtin: tuple[str, ...] = ()) -> Run:
    """Render the conversation with what tool_choice and response_format demand and the built-in tools declared
    (off the event loop when it is large), and start its generation with the request's sampling, within `context`
    tokens if given; default_max_tokens: the API's own limit when the request gives none. The *_param names are
    what a 400 points at."""
    serving.check_capacity()
    steering, instructions = chat_steering(tools, tool_choice, response_format)
    if steering is not None and req.min_tokens:  # the demanded call or JSON ends with a stop token min_tokens forbids
        raise APIError(400, "min_tokens cannot be combined with a tool_choice or response_format that demands an "
                            "answer", "min_tokens")
    size = int(request.headers.get("content-length") or 0)
    prompt = await serving.tokenizing.render(size, messages + instructions, tools, effort, messages_param, builtin,
                                             client_of(request.scope))
    budget = serving.budget(prompt, max_tokens, max_tokens_param, messages_param, context, default_max_tokens)
    if steering is not None:
        steering.reasoning_budget = reasoning_budget(budget)
        steering.budget = budget  # a demanded JSON object is closed in time to fit
    run = Run(serving.engine, prompt, req.to_sampling_params(budget, list(STOP_TOKEN_IDS)), steering,
              serving.options.request_timeout_s, serving.cache_scope(request, prompt, req.cache_salt))
    run.context = min(context or serving.config.max_context, serving.config.max_context)
    if builtin:
        run.tools = BuiltinTools(builtin, serving.options.tool_settings)
    request.state.run = run  # for the access log
    return run


async def chat_deltas(run: Run, stop: str | list[str] | None) -> AsyncIterator[harmony.ChatDelta]:
    """chat/answer.py's Answer driven from the event loop (`LLM.chat` drives the same on its caller's thread): the
    round's tokens come from the engine, a built-in call runs in a thread, and the next round is `run.resume`
    (tool_choice and response_format steer the first round only). The tools are closed at the end."""
    answer = Answer(run.prompt, run.params.max_tokens, run.context, run.tools, stop, run.demanded)
    try:
        while True:
            async with contextlib.aclosing(run.tokens()) as tokens:  # leaving early cancels the generation at once
                async for tok in tokens:
                    for d in answer.feed(tok):
                        yield d
                    if answer.stopped:
                        break
            call = answer.end_round(run.finish_reason, run.cached_tokens, run.disconnected)
            if call is None:
                break
            delta, prompt, room = answer.resume(call, await asyncio.to_thread(run.tools.run, call.recipient,
                                                                              call.arguments))
            yield delta
            if prompt is None:
                break
            run.resume(prompt, room)
        for d in answer.finish():
            yield d
    finally:
        if run.tools is not None:
            await asyncio.to_thread(run.tools.close)


def chat_usage(result: harmony.ChatResult) -> Usage:
    return Usage.of(result.prompt_tokens, result.completion_tokens, result.reasoning_tokens, result.cached_tokens)


async def chat_stream(run: Run, stop: str | list[str] | None, cid: str, now: int, model_name: str,
                      include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        body = ChatCompletionChunk(id=cid, created=now, model=model_name,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
        return data(body, exclude=None if include_usage else {"usage"})  # OpenAI: usage: null until the last

    async for comment in run.queued():
        yield comment
    yield chunk(ChatDelta(role="assistant", content=""))
    async for d in chat_deltas(run, stop):
        if d.kind == "reasoning":
            yield chunk(ChatDelta(reasoning_content=d.text, reasoning=d.text))
        elif d.kind == "content":
            yield chunk(ChatDelta(content=d.text))
        elif d.kind == "tool_call":
            first = d.name is not None
            yield chunk(ChatDelta(tool_calls=[ToolCallDelta(
                index=d.index, id=d.id if first else None, type="function" if first else None,
                function=FunctionCallDelta(name=d.name, arguments=d.text))]))
        elif d.kind == "finish":
            yield chunk(ChatDelta(), d.result.finish_reason)
            if include_usage:
                yield data(ChatCompletionChunk(id=cid, created=now, model=model_name, choices=[],
                                               usage=chat_usage(d.result)))
    yield data("[DONE]")


def chat_message(result: harmony.ChatResult) -> ChatMessage:
    """The answer's message; the browser's citations in its text as url_citation annotations (as OpenAI's chat
    completions give web search citations)."""
    if result.tool_calls:
        content = result.content or None
    else:
        content = result.content
    annotations = [{"type": "url_citation", "url_citation": {"start_index": c.start, "end_index": c.end,
                                                             "url": c.url, "title": c.title}}
                   for c in result.citations]
    return ChatMessage(content=content, reasoning_content=result.reasoning or None,
                       reasoning=result.reasoning or None,
                       tool_calls=[ToolCall.of(c) for c in result.tool_calls] or None, annotations=annotations or None)


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    serving.check_request(req)
    builtin = serving.options.builtin_tools  # run by the server, kept out of tool_calls
    run = await start_chat(serving, request, req, list(req.messages), req.tools, tool_choice=req.tool_choice,
                           response_format=req.response_format, effort=req.reasoning_effort or "medium",
                           max_tokens=req.max_completion_tokens or req.max_tokens,
                           max_tokens_param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                           messages_param="messages", builtin=builtin)
    cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    if req.stream:
        return sse(chat_stream(run, req.stop, cid, now, req.model, req.include_usage), run, request)
    result = None
    async with cancel_on_disconnect(run, request):
        async for delta in chat_deltas(run, req.stop):
            if delta.kind == "finish":
                result = delta.result
    return ChatCompletion(id=cid, created=now, model=req.model, usage=chat_usage(result),
                          choices=[ChatChoice(message=chat_message(result),
                                              finish_reason=result.finish_reason)])
