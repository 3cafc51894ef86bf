"""`Answer`: one chat answer from its tokens to its deltas, whoever generates the tokens and wherever the deltas go.

Every front end drives it the same way (the library's `LLM.chat` on its caller's thread, the server's chat
completions, responses and Ollama endpoints from the event loop): feed each token of a round, `end_round` when the
round's generation ends, run the built-in call it returns (if any) and `resume` with its output, and `finish`. The
harmony parse, the stop strings, the built-in tool rounds, the finish reason, the cached tokens and the citations
live here once: they were written twice, in the library and in the server, and had begun to differ (the library
had no stop strings).

A round generates until a stop token. When it stops at the `<|call|>` of a built-in tool call, the call runs and
the next round's prompt is the round's prompt, its messages (the call last), the tool's message and
`<|start|>assistant`, exactly as harmony renders the conversation so far (the prefix cache serves what the rounds
share). The answer ends with a round that stops otherwise (a final message, a call to one of the user's functions),
at a stop string, at max_tokens, or when the model keeps calling past the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import harmony
from .stops import StopStrings

if TYPE_CHECKING:
    from ..tools import BuiltinTools


class Answer:
    """prompt: the first round's (ends with `<|start|>assistant`). max_tokens: for all rounds together; context:
    no round's prompt and completion may exceed it. tools: the built-in tools the model may call (None: none).
    stop: stop strings. demanded: the request demanded a call or a JSON answer (a call cut short is dropped)."""

    def __init__(self, prompt: list[int], max_tokens: int, context: int, tools: BuiltinTools | None = None,
                 stop: str | list[str] | None = None, demanded: bool = False):
        self.parser = harmony.ChatParser(prompt_tokens=len(prompt), builtin=tools.names if tools else ())
        self.tools, self.stops, self.demanded = tools, StopStrings(stop), demanded
        self.prompt, self.max_tokens, self.context = list(prompt), max_tokens, context
        self.round_tokens = 0  # this round's completion tokens
        self.used = 0  # completion tokens of the rounds before
        self.sent = ""  # the content given out so far (cut at a stop string)
        self.cached: int | None = None  # the first round's cached prompt tokens (the prompt the client sent)
        self.hit_length = False

    @property
    def stopped(self) -> bool:
        """A stop string completed: stop generating."""
        return self.stops.hit

    def feed(self, token: int) -> list[harmony.ChatDelta]:
        self.round_tokens += 1
        return [d for d in self.parser.feed(token) if self._cut(d)]

    def end_round(self, finish_reason: str | None, cached_tokens: int, disconnected: bool = False
                  ) -> harmony.BuiltinCall | None:
        """The round's generation ended (finish_reason "stop", "length" or "cancelled"): the built-in call to run
        before the next round, or None when the answer is over."""
        if self.cached is None:
            self.cached = cached_tokens
        self.hit_length = finish_reason == "length"
        if self.tools is None or self.hit_length or self.stopped or disconnected:
            return None
        call = self.parser.take_builtin_call()
        if call is not None and self.tools.exhausted:
            self.parser.result.warnings.append("the model kept calling tools past the limit; the answer was cut")
            return None
        return call

    def resume(self, call: harmony.BuiltinCall, output: str) -> tuple[harmony.ChatDelta, list[int] | None, int]:
        """Record the tool's output: (its delta, the next round's prompt and the tokens it may generate), or
        (delta, None, 0) when max_tokens or the context is spent (the answer then ends as at max_tokens)."""
        delta = self.parser.tool_result(call, output)
        self.used += self.round_tokens
        self.prompt = harmony.continuation(self.prompt, self.parser.round_messages(), call, output)
        self.round_tokens = 0
        self.parser.next_round()
        room = min(self.max_tokens - self.used, self.context - len(self.prompt))
        if room <= 0:
            self.hit_length = True
            return delta, None, 0
        return delta, self.prompt, room

    def finish(self) -> list[harmony.ChatDelta]:
        """The last deltas: content held back for a possible stop string, and "finish" with the ChatResult."""
        out = []
        tail = self.stops.flush()
        if tail:
            self.sent += tail
            out.append(harmony.ChatDelta("content", tail))
        self.parser.result.cached_tokens = self.cached
        for d in self.parser.finish(hit_length=self.hit_length, drop_partial_call=self.demanded):
            if d.kind == "content":
                d.text = self.stops.push(d.text) + self.stops.flush()
                self.sent += d.text
                if not d.text:
                    continue
            if d.kind == "finish":
                if self.stops.stops:
                    d.result.content = self.sent
                    if self.stops.hit:
                        d.result.finish_reason = "stop"
                if self.tools is not None:
                    d.result.citations = self.tools.citations(d.result.content)
            out.append(d)
        return out

    def _cut(self, d: harmony.ChatDelta) -> bool:
        """Cut a content delta at a stop string; whether anything of it is left to give out."""
        if d.kind != "content":
            return True
        d.text = self.stops.push(d.text)
        self.sent += d.text
        return bool(d.text)
