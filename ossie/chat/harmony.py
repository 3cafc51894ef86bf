"""Harmony chat: OpenAI-style messages -> harmony prompt tokens, and completion tokens -> reasoning, content
and tool calls. Rendering and parsing are openai-harmony's; this module maps between the two worlds.

One parser serves streaming and non-streaming alike (the non-streaming result is the sum of the streamed
deltas), so the two can never disagree. Tool calls are held back until their message is complete and
their arguments are checked: a call either arrives whole as a tool call or, malformed, as plain text with
a warning. Harmony syntax never reaches `content`.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    ToolDescription,
)

from ..special_tokens import CALL, CHANNEL, START
from ..tokenizer import TextDecoder, harmony_encoding
from ..tools import TOOLS

log = logging.getLogger("ossie")

REASONING_EFFORTS = ("low", "medium", "high")
# A model that writes no harmony header at all (a random synthetic checkpoint does it in every answer): said in the
# log once per process, not at every answer, and in the same words whether streamed or not.
NO_HEADER = "output has no harmony header; returned as text"
_logged_once: set[str] = set()
HEADERLESS_AFTER = 16  # completion tokens without a harmony header after which the text is streamed as it is


class ChatFormatError(ValueError):
    """The messages or tools cannot be expressed in harmony (unknown role, tool result without a call...)."""


# ---- messages -> harmony ---------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of parts of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(f"{where}: content part of type {kind!r} is not supported (text only)")
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def _tool_descriptions(tools: Sequence[dict] | None) -> list[ToolDescription]:
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise ChatFormatError(f"tools[{i}] must be an object")
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if fn is None:
            raise ChatFormatError(f"tools[{i}]: type {tool.get('type')!r} is not supported (function tools only)")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"tools[{i}]: a function tool needs a name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ChatFormatError(f"tools[{i}] ({name}): parameters must be a JSON Schema object")
        out.append(ToolDescription.new(name, fn.get("description") or "", parameters=params))
    return out


def build_conversation(messages: Sequence[dict], tools: Sequence[dict] | None = None,
                       reasoning_effort: str = "medium", builtin_tools: Iterable[str] = (),
                       conversation_start_date: str | None = None, model_identity: str | None = None,
                       knowledge_cutoff: str | None = None) -> Conversation:
    """Map Chat Completions messages to a harmony conversation, as the gpt-oss model card and vLLM do."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    system = system.with_conversation_start_date(conversation_start_date or datetime.date.today().isoformat())
    if model_identity:
        system = system.with_model_identity(model_identity)
    if knowledge_cutoff:
        system = system.with_knowledge_cutoff(knowledge_cutoff)
    for name in builtin_tools:
        if name not in TOOLS:
            raise ChatFormatError(f"unknown built-in tool {name!r}; choose from {tuple(TOOLS)}")
        system = TOOLS[name].declare(system)

    instructions, rest = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatFormatError(f"messages[{i}] must be an object with a role")
        if m["role"] in ("system", "developer"):
            instructions.append(_text(m.get("content"), f"messages[{i}]"))
        else:
            rest.append((i, m))
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    functions = _tool_descriptions(tools)
    if instructions or functions:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if functions:
            dev = dev.with_function_tools(functions)
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    call_names: dict[str, str] = {}
    for i, m in rest:
        role, where = m["role"], f"messages[{i}]"
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), where)))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if reasoning:
                out.append(Message.from_role_and_content(Role.ASSISTANT, _text(reasoning, where))
                           .with_channel("analysis"))
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}.tool_calls must be a list of tool calls")
            content = _text(m.get("content"), where)
            if content:  # text beside a call is a preamble (commentary); alone it is the final answer
                out.append(Message.from_role_and_content(Role.ASSISTANT, content)
                           .with_channel("commentary" if calls else "final"))
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ChatFormatError(f"{where}.tool_calls[{j}] needs function.name (a string)")
                args = fn.get("arguments") or "{}"
                if not isinstance(args, str):
                    args = json.dumps(args)
                call_names[str(call.get("id"))] = fn["name"]
                out.append(Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
                           .with_recipient(f"functions.{fn['name']}").with_content_type("<|constrain|>json"))
        elif role == "tool":
            name = call_names.get(str(m.get("tool_call_id"))) or m.get("name")
            if not name:
                raise ChatFormatError(f"{where}: tool result with tool_call_id {m.get('tool_call_id')!r} "
                                      "answers no earlier assistant tool call")
            author = Author.new(Role.TOOL, f"functions.{name}")
            out.append(Message.from_author_and_content(author, _text(m.get("content"), where))
                       .with_recipient("assistant").with_channel("commentary"))
        else:
            raise ChatFormatError(f"{where}: unknown role {role!r}")
    return Conversation.from_messages(out)


def render(messages: Sequence[dict], tools: Sequence[dict] | None = None, reasoning_effort: str = "medium",
           **options: Any) -> list[int]:
    """Exact prompt token ids, ending with `<|start|>assistant`."""
    conversation = build_conversation(messages, tools, reasoning_effort, **options)
    return list(harmony_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT))


def continuation(prompt: list[int], completed: Sequence[Message], call: BuiltinCall, output: str) -> list[int]:
    """The prompt after a built-in tool ran: `prompt` (which ends with `<|start|>assistant`), the assistant's
    messages of the round that ended in `call`, the tool's message with `output`, and `<|start|>assistant`, all as
    harmony renders the conversation (which writes a call's recipient before its channel, where the model may
    have written it after: the model is shown the history as it was trained on it)."""
    enc, start = harmony_encoding(), _assistant_start()
    if prompt[-len(start):] != start:
        raise ValueError("the prompt does not end with <|start|>assistant")
    author = Author.new(Role.TOOL, call.recipient)
    result = Message.from_author_and_content(author, output).with_recipient("assistant").with_channel(call.channel)
    rendered = [t for m in [*completed, result] for t in enc.render(m)]
    return prompt[:-len(start)] + rendered + start


@functools.cache
def _assistant_start() -> list[int]:
    return list(harmony_encoding().render_conversation_for_completion(Conversation.from_messages([]),
                                                                      Role.ASSISTANT))


# ---- completion tokens -> reasoning / content / tool calls -----------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    def to_openai(self) -> dict[str, Any]:
        """As an OpenAI chat message's tool call (which `render` reads back)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class BuiltinCall:
    """A call to a built-in tool (python, browser.search/open/find), run by ossie rather than returned."""

    id: str
    recipient: str  # "python", "browser.search", ...
    arguments: str  # the code, or the JSON arguments
    channel: str = "analysis"
    output: str | None = None  # the tool's message, once run


@dataclass
class ChatDelta:
    """One streamed piece. kind "tool_call": `index`, then `id` and `name` on a call's first piece and
    argument text in `text`. kind "builtin_call": a whole call to a built-in tool (`id`, `name` the recipient,
    `text` the code or arguments); "builtin_result": its output (`id`, `name`, `text`). kind "finish" comes last
    and carries the whole `result`."""

    kind: Literal["reasoning", "content", "tool_call", "builtin_call", "builtin_result", "finish"]
    text: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    result: ChatResult | None = None


@dataclass
class ChatResult:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    builtin_calls: list[BuiltinCall] = field(default_factory=list)
    citations: list[Any] = field(default_factory=list)  # the browser's 【cursor†Lx】 marks in content, with URLs
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls"
    warnings: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those served from the prefix cache
    completion_tokens: int = 0
    reasoning_tokens: int = 0


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChatParser:
    """Feed completion tokens one at a time; get ChatDeltas back; `finish()` closes the stream.

    Calls to the built-in tools named in `builtin` ("python", "browser") come out as "builtin_call" deltas; when
    one ends a round, `take_builtin_call()` returns it, `tool_result()` records what it returned, and after
    `next_round()` the parser reads the completion that follows the tool's message. The result sums all rounds."""

    def __init__(self, prompt_tokens: int = 0, builtin: Iterable[str] = ()):
        self.enc = harmony_encoding()
        self.builtin = frozenset(builtin)
        self.result = ChatResult(prompt_tokens=prompt_tokens)
        self.pending: BuiltinCall | None = None
        self.next_round()

    def next_round(self) -> None:
        """Read a new completion (after a built-in tool's message), adding to the same result."""
        self.parser = StreamableParser(self.enc, role=Role.ASSISTANT)
        self.pending = None
        self.n_messages = 0
        self.message_tokens: list[int] = []  # tokens of the message being parsed (for fallback text)
        self.call_pieces: list[str] = []  # argument pieces of a call not yet complete
        self.broken = False  # the parser gave up: the rest is kept as text
        self.headerless: TextDecoder | None = None  # plain text with no harmony header: streamed as content
        self.last_token: int | None = None

    def _apply(self, delta: ChatDelta) -> ChatDelta:
        r = self.result
        if delta.kind == "reasoning":
            r.reasoning += delta.text
        elif delta.kind == "content":
            r.content += delta.text
        return delta

    def _plain(self, tokens: list[int]) -> str:
        return self.enc.decode([t for t in tokens if not self.enc.is_special_token(t)])

    def _warn(self, text: str, once: bool = False) -> None:
        """Record a warning in the result, and log it (`once`: the first time in this process only)."""
        if not once:
            log.warning("model output: %s", text)
        elif text not in _logged_once:
            _logged_once.add(text)
            log.warning("model output: %s (said once)", text)
        self.result.warnings.append(text)

    def feed(self, token: int) -> list[ChatDelta]:
        self.result.completion_tokens += 1
        self.last_token = token
        self.message_tokens.append(token)
        if self.headerless is not None:
            text = self.headerless.push(token)
            return [self._apply(ChatDelta("content", text))] if text else []
        if self.broken:
            return []
        if self._no_header():  # a model that writes plain text (a random one): stream it rather than hold it
            self.headerless = TextDecoder()
            text = "".join(self.headerless.push(t) for t in self.message_tokens)
            self._warn(NO_HEADER, once=True)
            return [self._apply(ChatDelta("content", text))] if text else []
        channel_before = self.parser.current_channel
        try:
            self.parser.process(token)
        except HarmonyError as e:
            self.broken = True
            self._warn(f"malformed harmony output ({e}); returned as text")
            return []
        # reasoning tokens: every token of an analysis message, its header (counted once the channel is known)
        # and its <|end|> included
        if channel_before == "analysis":
            self.result.reasoning_tokens += 1
        elif self.parser.current_channel == "analysis":
            self.result.reasoning_tokens += len(self.message_tokens)
        out: list[ChatDelta] = []
        delta = self.parser.last_content_delta
        if delta and self.parser.state == StreamState.CONTENT:
            recipient = self.parser.current_recipient
            if recipient and recipient != "assistant":
                self.call_pieces.append(delta)  # held back until the call is complete and checked
            elif self.parser.current_channel == "analysis":
                out.append(self._apply(ChatDelta("reasoning", delta)))
            else:  # final answer, or a commentary preamble meant for the user
                out.append(self._apply(ChatDelta("content", delta)))
        messages = self.parser.messages
        while self.n_messages < len(messages):
            out += self._complete(messages[self.n_messages])
            self.n_messages += 1
            self.message_tokens = []
        return out

    def _no_header(self) -> bool:
        """HEADERLESS_AFTER tokens into the completion, no special token and no recipient: no header is coming
        (a harmony message starts with <|channel|> at once, a call with ' to=' and <|channel|> a few tokens on)."""
        tokens = self.message_tokens
        return (self.n_messages == 0 and len(tokens) >= HEADERLESS_AFTER and self.parser.state == StreamState.HEADER
                and not any(self.enc.is_special_token(t) for t in tokens)
                and not self._plain(tokens).lstrip().startswith("to="))

    def take_builtin_call(self) -> BuiltinCall | None:
        """The built-in tool call that ended this round (its <|call|> the last token), if one did."""
        call, self.pending = self.pending, None
        return call if call is not None and self.last_token == CALL else None

    def round_messages(self) -> list[Message]:
        """The messages this round completed (after a built-in call, the call last)."""
        return list(self.parser.messages)

    def tool_result(self, call: BuiltinCall, output: str) -> ChatDelta:
        call.output = output
        return ChatDelta("builtin_result", output, id=call.id, name=call.recipient)

    def _complete(self, message: Message) -> list[ChatDelta]:
        recipient = message.recipient
        if not recipient or recipient == "assistant":
            return []
        pieces, self.call_pieces = self.call_pieces, []
        arguments = "".join(pieces)
        if recipient.split(".")[0] in self.builtin:
            call = BuiltinCall(_new_call_id(), recipient, arguments, message.channel or "analysis")
            self.result.builtin_calls.append(call)
            self.pending = call
            return [ChatDelta("builtin_call", arguments, id=call.id, name=recipient)]
        name = recipient.removeprefix("functions.")
        try:
            json.loads(arguments or "{}")
        except json.JSONDecodeError:
            self._warn(f"call to {recipient} has invalid JSON arguments; returned as text")
            return [self._apply(ChatDelta("content", arguments))]
        call = ToolCall(_new_call_id(), name, arguments or "{}")
        index = len(self.result.tool_calls)
        self.result.tool_calls.append(call)
        out = [ChatDelta("tool_call", "", index=index, id=call.id, name=name)]
        args = [ChatDelta("tool_call", p, index=index) for p in pieces if p]
        return out + (args or [ChatDelta("tool_call", "{}", index=index)])

    def finish(self, hit_length: bool = False, drop_partial_call: bool = False) -> list[ChatDelta]:
        """Close the stream (after a stop token, or after max_tokens when hit_length). A call cut short is returned
        as text, or with drop_partial_call (the request demanded a call) dropped: whole or not at all."""
        out: list[ChatDelta] = []
        r = self.result
        if self.headerless is not None:
            text = self.headerless.flush()
            if text:
                out.append(self._apply(ChatDelta("content", text)))
        elif self.broken:
            text = self._plain(self.message_tokens)
            if text:
                out.append(self._apply(ChatDelta("content", text)))
        elif self.parser.state == StreamState.HEADER and self.message_tokens:
            plain = self._plain(self.message_tokens)
            if CHANNEL in self.message_tokens or START in self.message_tokens or plain.lstrip().startswith("to="):
                self._warn("output ended inside a message header; the partial header was dropped")
            else:  # no header at all: the model wrote plain text
                self._warn(NO_HEADER, once=True)
                out.append(self._apply(ChatDelta("content", plain)))
        elif self.call_pieces and drop_partial_call:
            self._warn(f"output ended inside a call to {self.parser.current_recipient}; the partial call was dropped")
            self.call_pieces = []
        elif self.call_pieces:
            self._warn(f"output ended inside a call to {self.parser.current_recipient}; returned as text")
            out.append(self._apply(ChatDelta("content", "".join(self.call_pieces))))
            self.call_pieces = []
        if hit_length:
            r.finish_reason = "length"
        elif self.last_token == CALL and r.tool_calls:
            r.finish_reason = "tool_calls"
        else:
            r.finish_reason = "stop"
        out.append(ChatDelta("finish", result=r))
        return out
