"""POST /v1/responses and GET /v1/responses/{id}: the Responses API over harmony chat (function tools,
reasoning items, previous_response_id from a bounded store of recent responses)."""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from ..chat import harmony
from ..tools import BuiltinTools
from .chat_completions import chat_deltas, start_chat
from .middleware import principal
from .protocol import (
    APIError,
    InputTokensDetails,
    OutputTokensDetails,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from .serving import Serving
from .streaming import Run, cancel_on_disconnect, named_event, sse

router = APIRouter()

STORED_RESPONSES = 1000  # responses kept for previous_response_id (least recently used dropped first)


class ResponseStore:
    """Stored responses and the conversation each ends (for previous_response_id), least recently used dropped
    first beyond `capacity`. Each is its principal's: another principal asking for its id finds nothing."""

    def __init__(self, capacity: int = STORED_RESPONSES):
        self.capacity = capacity
        # (principal, id) -> (response, messages)
        self.items: OrderedDict[tuple[str | None, str], tuple[dict, list[dict]]] = OrderedDict()

    def put(self, owner: str | None, rid: str, response: dict, messages: list[dict]) -> None:
        self.items[owner, rid] = (response, messages)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def response(self, owner: str | None, rid: str) -> dict | None:
        item = self.items.get((owner, rid))
        return item[0] if item else None

    def messages(self, owner: str | None, rid: str) -> list[dict] | None:
        if (owner, rid) not in self.items:
            return None
        self.items.move_to_end((owner, rid))
        return list(self.items[owner, rid][1])


# ---- Responses items <-> chat messages ----------------------------------------------------------------------


def _part_text(content: Any, where: str) -> str:
    """Text of a list of content parts ({"type": "input_text" | "output_text" | ..., "text": ...})."""
    if not isinstance(content, list) or not all(isinstance(p, dict) and isinstance(p.get("text", ""), str)
                                                for p in content):
        raise APIError(400, f"{where} must be a list of text parts", where)
    return "".join(p.get("text", "") for p in content)


def input_to_messages(items: str | list[dict]) -> list[dict]:
    """Responses `input` (a string, or message / reasoning / function_call / function_call_output items) as
    Chat Completions messages, which harmony.render understands. An assistant message followed by function calls
    is one turn: its text is the calls' preamble (harmony's commentary), as chat completions has it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: str | None = None  # a reasoning item belongs to the assistant turn that follows it
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object", where)
        kind = item.get("type", "message")
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
            reasoning = _part_text(parts, f"{where}.content")
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not item["name"] or not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}: a function_call item needs name and call_id (strings)", where)
            arguments = item.get("arguments") or "{}"
            if not isinstance(arguments, str):
                raise APIError(400, f"{where}.arguments must be a string of JSON", f"{where}.arguments")
            call = harmony.ToolCall(item["call_id"], item["name"], arguments).to_openai()
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:  # the same assistant turn
                last.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            if reasoning:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}: a function_call_output item needs call_id (a string)", where)
            output = item.get("output")
            if isinstance(output, list):
                output = _part_text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind in ("code_interpreter_call", "web_search_call"):
            continue  # a built-in tool's work, sent back: its results are already in the reasoning it fed
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
            call = harmony.ToolCall(item["call_id"], item["name"], item["arguments"])
            message.setdefault("tool_calls", []).append(call.to_openai())
    return message


class OutputItems:
    """Chat deltas as Responses output items (reasoning, message, function_call, code_interpreter_call,
    web_search_call) and their stream events."""

    def __init__(self, tools: BuiltinTools | None = None) -> None:
        self.output: list[dict] = []
        self.item: dict | None = None  # the item being streamed
        self.call_index: int | None = None
        self.builtin_id: str | None = None  # the built-in call whose item is open
        self.tools = tools

    def _events_close(self, status: str = "completed") -> Iterable[tuple[str, dict]]:
        item, self.item = self.item, None
        if item is None:
            return
        at = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["status"] = status
        if item["type"] in ("reasoning", "message"):
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            yield f"response.{kind}.done", {**at, "content_index": 0, "text": part["text"]}
            yield "response.content_part.done", {**at, "content_index": 0, "part": part}
        elif item["type"] == "function_call":
            yield "response.function_call_arguments.done", {**at, "arguments": item["arguments"]}
        elif item["type"] == "code_interpreter_call":
            yield "response.code_interpreter_call.completed", at
        else:
            yield "response.web_search_call.completed", at
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

        elif d.kind == "builtin_call":
            yield from self._builtin_call(d)
        elif d.kind == "builtin_result" and self.item is not None and self.builtin_id == d.id:
            if self.item["type"] == "code_interpreter_call":
                self.item["outputs"] = [{"type": "logs", "logs": d.text}]
            elif self.item["action"]["type"] == "open_page":
                browser = self.tools.sessions.get("browser") if self.tools else None
                if browser is not None and browser.pages:
                    self.item["action"]["url"] = browser.pages[-1].url  # the page opened (a link id named it)
            yield from self._events_close()

    def _builtin_call(self, d: harmony.ChatDelta) -> Iterable[tuple[str, dict]]:
        """A built-in tool call as OpenAI's code_interpreter_call or web_search_call item; it completes when the
        tool's result comes."""
        self.builtin_id = d.id
        if d.name == "python":
            item = {"id": "ci_" + uuid.uuid4().hex, "type": "code_interpreter_call", "status": "in_progress",
                    "code": d.text, "container_id": "ossie_sandbox", "outputs": None}
            yield from self._open(item)
            at = {"item_id": item["id"], "output_index": len(self.output) - 1}
            yield "response.code_interpreter_call.in_progress", at
            yield "response.code_interpreter_call_code.delta", {**at, "delta": d.text}
            yield "response.code_interpreter_call_code.done", {**at, "code": d.text}
            yield "response.code_interpreter_call.interpreting", at
            return
        try:
            args = json.loads(d.text or "{}")
        except json.JSONDecodeError:
            args = {}
        args = args if isinstance(args, dict) else {}
        function = d.name.partition(".")[2]
        if function == "search":
            action = {"type": "search", "query": str(args.get("query", ""))}
        elif function == "find":
            action = {"type": "find", "pattern": str(args.get("pattern", "")), "url": None}
            browser = self.tools.sessions.get("browser") if self.tools else None
            if browser is not None and browser.pages:
                action["url"] = browser.pages[-1].url
        else:
            target = args.get("id")
            action = {"type": "open_page", "url": target if isinstance(target, str) else None}
        item = {"id": "ws_" + uuid.uuid4().hex, "type": "web_search_call", "status": "in_progress", "action": action}
        yield from self._open(item)
        at = {"item_id": item["id"], "output_index": len(self.output) - 1}
        yield "response.web_search_call.in_progress", at
        yield "response.web_search_call.searching", at

    def close(self, incomplete: bool = False) -> Iterable[tuple[str, dict]]:
        """The last item's closing events; `incomplete`: the token budget cut it (OpenAI marks it so)."""
        yield from self._events_close("incomplete" if incomplete else "completed")


BUILTIN_TYPES = {"code_interpreter": "python", "web_search_preview": "browser", "web_search": "browser",
                 "web_search_preview_2025_03_11": "browser"}


def split_tools(tools: list[dict] | None, enabled: tuple[str, ...]) -> tuple[list[dict], tuple[str, ...]]:
    """Responses tools as (chat completions function tools, the built-in tools asked for: code_interpreter is
    python, web_search the browser, which the server runs only if it was started with them)."""
    functions, builtin = [], []
    for i, t in enumerate(tools or []):
        kind = t.get("type")
        if kind in BUILTIN_TYPES:
            name = BUILTIN_TYPES[kind]
            if name not in enabled:
                raise APIError(400, f"tools[{i}]: this server does not run the {kind} tool (start it with "
                                    f"--builtin-tools {name})", f"tools[{i}].type")
            if name not in builtin:
                builtin.append(name)
            continue
        if kind != "function":
            raise APIError(400, f"tools[{i}]: type {kind!r} is not supported (function, code_interpreter, "
                                "web_search_preview)", f"tools[{i}].type")
        functions.append({"type": "function",
                          "function": {k: t.get(k) for k in ("name", "description", "parameters")}})
    return functions, tuple(builtin)


def chat_options(req: ResponsesRequest) -> tuple[Any, dict | None, str]:
    """(tool_choice, response_format, reasoning effort) of a Responses request, in chat completions' terms."""
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
    return choice, response_format, effort


@dataclass
class Answer:
    output: list[dict]  # the response's output items
    result: harmony.ChatResult


async def collect(run: Run) -> AsyncIterator[tuple[str, dict] | Answer]:
    """The output items' stream events (kind, fields) as the answer comes, then the whole Answer."""
    items = OutputItems(run.tools)
    async for d in chat_deltas(run, None):
        if d.kind == "finish":
            result = d.result
        else:
            for event in items.feed(d):
                yield event
    message = items.item if items.item is not None and items.item["type"] == "message" else None
    if message is not None and result.citations:  # the browser's citations in the answer, with their URLs
        text = message["content"][0]["text"]
        offset = len(result.content) - len(text)  # the message item holds the answer's last stretch of content
        message["content"][0]["annotations"] = [
            {"type": "url_citation", "start_index": c.start - offset, "end_index": c.end - offset, "url": c.url,
             "title": c.title} for c in result.citations if c.start >= offset]
    for event in items.close(incomplete=result.finish_reason == "length"):
        yield event
    yield Answer(items.output, result)


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    serving: Serving = request.app.state.serving
    store: ResponseStore = request.app.state.responses
    serving.check_model(req.model)
    history: list[dict] = []
    if req.previous_response_id:
        history = store.messages(principal(request.scope), req.previous_response_id)
        if history is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                           "previous_response_id", "previous_response_not_found")
    new_messages = input_to_messages(req.input)
    messages = ([{"role": "developer", "content": req.instructions}] if req.instructions else []) + history \
        + new_messages
    tools, builtin = split_tools(req.tools, serving.options.builtin_tools)
    choice, response_format, effort = chat_options(req)
    run = await start_chat(serving, request, req, messages, tools, tool_choice=choice, response_format=response_format,
                           effort=effort, max_tokens=req.max_output_tokens, max_tokens_param="max_output_tokens",
                           messages_param="input", builtin=builtin)
    base = ResponseObject(
        id="resp_" + uuid.uuid4().hex, created_at=int(time.time()), model=req.model, instructions=req.instructions,
        tools=req.tools or [], tool_choice=req.tool_choice or "auto", temperature=req.temperature, top_p=req.top_p,
        max_output_tokens=req.max_output_tokens, previous_response_id=req.previous_response_id,
        reasoning={"effort": effort, "summary": None}, store=req.store, text=req.text or {"format": {"type": "text"}},
        metadata=req.metadata or {})

    def finish(answer: Answer) -> dict:
        result = answer.result
        incomplete = result.finish_reason == "length"
        body = base.model_copy(update={
            "status": "incomplete" if incomplete else "completed", "output": answer.output,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "usage": ResponseUsage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens,
                                   total_tokens=result.prompt_tokens + result.completion_tokens,
                                   input_tokens_details=InputTokensDetails(cached_tokens=result.cached_tokens),
                                   output_tokens_details=OutputTokensDetails(
                                       reasoning_tokens=result.reasoning_tokens))}).model_dump()
        if req.store:
            store.put(principal(request.scope), body["id"], body,
                      history + new_messages + [output_to_message(answer.output)])
        return body

    if req.stream:
        return sse(responses_stream(run, base, finish), run, request)
    async with cancel_on_disconnect(run, request):
        async for event in collect(run):
            answer = event
    return finish(answer)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict:
    body = request.app.state.responses.response(principal(request.scope), response_id)
    if body is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", "response_id", "not_found")
    return body


async def responses_stream(run: Run, base: ResponseObject,
                           finish: Callable[[Answer], dict]) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return named_event(kind, {"type": kind, "sequence_number": seq - 1, **fields})

    async for comment in run.queued():
        yield comment
    start = base.model_dump()
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    try:
        async for item in collect(run):
            if isinstance(item, Answer):
                body = finish(item)
                yield event("response.incomplete" if body["status"] == "incomplete" else "response.completed",
                            response=body)
            else:
                kind, fields = item
                yield event(kind, **fields)
    except APIError as e:  # the Responses API's ending of a failed stream: an error event, then response.failed
        code = e.code or e.type
        yield event("error", code=code, message=e.message, param=e.param)
        yield event("response.failed", response={**start, "status": "failed",
                                                 "error": {"code": code, "message": e.message}})
