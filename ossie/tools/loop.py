"""The rounds of one answer that uses built-in tools, whoever drives the generation (`LLM.chat`, the server).

A round generates until a stop token. When it stops at the `<|call|>` of a built-in tool call, the call runs and
the next round's prompt is the round's prompt, its messages (the call last), the tool's message and
`<|start|>assistant`, exactly as harmony renders the conversation so far (the prefix cache serves what the
rounds share). The answer ends with a round that stops otherwise (a final
message, a call to one of the user's functions), at max_tokens, or when the model keeps calling past the limit.
"""

from __future__ import annotations

from ..chat import harmony
from . import BuiltinTools


class ToolLoop:
    def __init__(self, parser: harmony.ChatParser, tools: BuiltinTools | None, prompt: list[int], max_tokens: int,
                 context: int):
        self.parser, self.tools = parser, tools
        self.prompt, self.max_tokens, self.context = list(prompt), max_tokens, context
        self.completion: list[int] = []  # this round's
        self.used = 0  # completion tokens of the rounds before

    def feed(self, token: int) -> list[harmony.ChatDelta]:
        self.completion.append(token)
        return self.parser.feed(token)

    def pending_call(self, hit_length: bool) -> harmony.BuiltinCall | None:
        """The built-in call that ended the round, if another round is to follow it."""
        if self.tools is None or hit_length:
            return None
        call = self.parser.take_builtin_call()
        if call is not None and self.tools.exhausted:
            self.parser.result.warnings.append("the model kept calling tools past the limit; the answer was cut")
            return None
        return call

    def resume(self, call: harmony.BuiltinCall, output: str) -> tuple[harmony.ChatDelta, list[int], int]:
        """Record the tool's output; (its delta, the next round's prompt, the tokens that round may generate: 0
        when max_tokens or the context is spent)."""
        delta = self.parser.tool_result(call, output)
        self.used += len(self.completion)
        self.prompt = harmony.continuation(self.prompt, self.parser.round_messages(), call, output)
        self.completion = []
        self.parser.next_round()
        room = min(self.max_tokens - self.used, self.context - len(self.prompt))
        return delta, self.prompt, max(0, room)
