"""`ossie chat`: an interactive terminal chat, as a user of `ollama run` expects it."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console

from .chat import harmony

HELP = """Commands:
  /effort low|medium|high   reasoning effort
  /system TEXT              set the instructions (empty: clear them)
  /reset                    forget the conversation
  /save FILE                save the conversation as JSON
  /bye                      exit (or Ctrl-D)
Start and end multi-line input with \"\"\". Ctrl-C stops an answer."""


def read_message(console: Console) -> str:
    """One user message; lines between \"\"\" markers form one multi-line message."""
    line = console.input("[bold green]>>> [/]")
    if not line.strip().startswith('"""'):
        return line
    lines = [line.strip()[3:]]
    while True:
        nxt = console.input("[green]... [/]")
        if nxt.rstrip().endswith('"""'):
            lines.append(nxt.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(nxt)


class Chat:
    def __init__(self, llm: Any, args: argparse.Namespace, tools: list[dict] | None, options: dict[str, Any]):
        self.llm, self.tools, self.options = llm, tools, dict(options)
        self.show_reasoning = not args.no_reasoning
        self.system: str | None = args.system
        self.messages: list[dict] = []
        self.console = Console(highlight=False)

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        cmd, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd == "/effort" and rest in ("low", "medium", "high"):
            self.options["reasoning_effort"] = rest
            self.console.print(f"reasoning effort: {rest}")
        elif cmd == "/system":
            self.system = rest or None
            self.console.print("instructions set" if rest else "instructions cleared")
        elif cmd == "/reset":
            self.messages = []
            self.console.print("conversation cleared")
        elif cmd == "/save" and rest:
            with open(rest, "w") as f:
                json.dump({"system": self.system, "reasoning_effort": self.options["reasoning_effort"],
                           "tools": self.tools, "messages": self.messages}, f, indent=2)
            self.console.print(f"saved {len(self.messages)} messages to {rest}")
        else:
            self.console.print(HELP)
        return True

    def answer(self) -> None:
        """Stream one assistant turn; when it calls tools, ask for their results and continue."""
        while True:
            prefix = [{"role": "system", "content": self.system}] if self.system else []
            stream = self.llm.chat(prefix + self.messages, tools=self.tools, stream=True, **self.options)
            reasoning, content, calls, result = "", "", {}, None
            section = None
            t0 = time.perf_counter()
            try:
                for d in stream:
                    if d.kind == "finish":
                        result = d.result
                    elif d.kind == "tool_call":
                        call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
                        call["arguments"] += d.text
                    elif d.kind == "reasoning":
                        reasoning += d.text
                        if self.show_reasoning:
                            if section != "reasoning":
                                self.console.print("Thinking...", style="dim italic")
                            self.console.print(d.text, style="dim", end="", markup=False)
                            section = "reasoning"
                    else:
                        content += d.text
                        if section == "reasoning":
                            self.console.print("\n")
                        section = "content"
                        self.console.print(d.text, end="", markup=False)
            except KeyboardInterrupt:
                stream.close()
                self.console.print("\n[stopped]", style="yellow", markup=False)
            elapsed = time.perf_counter() - t0
            self.console.print()
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = [harmony.ToolCall(**c).to_openai() for c in calls.values()]
            self.messages.append(msg)
            if result is None:
                return
            rate = result.completion_tokens / elapsed if elapsed > 0 else 0.0
            cached = f" ({result.cached_tokens} cached)" if result.cached_tokens else ""
            self.console.print(f"{result.completion_tokens} tokens ({result.reasoning_tokens} reasoning), "
                               f"{rate:.1f} tok/s, prompt {result.prompt_tokens} tokens{cached}, "
                               f"finish: {result.finish_reason}", style="dim")
            if result.finish_reason != "tool_calls":
                return
            for call in result.tool_calls:
                self.console.print(f"tool call: {call.name}({call.arguments})", style="cyan")
                value = self.console.input(f"[cyan]result of {call.name}> [/]")
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": value})

    def run(self) -> int:
        self.console.print(f"ossie chat: {self.llm.path} ({self.llm.layout} layout). /help for commands, "
                           "Ctrl-D to exit.", style="bold")
        while True:
            try:
                line = read_message(self.console)
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.console.print("\n(Ctrl-D or /bye to exit)")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.messages.append({"role": "user", "content": line})
            try:
                self.answer()
            except KeyboardInterrupt:
                self.console.print("\n[stopped]", style="yellow", markup=False)


def run_chat(llm: Any, args: argparse.Namespace, tools: list[dict] | None, options: dict[str, Any]) -> int:
    return Chat(llm, args, tools, options).run()
