"""`ossie chat`: an interactive terminal chat, as a user of `ollama run` expects it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console

from .chat import harmony
from .tokenizer import cache_dir

HELP = """Commands:
  /effort [low|medium|high]  reasoning effort (alone: the current one)
  /system TEXT               set the instructions (empty: clear them)
  /reset                     forget the conversation
  /save FILE                 save the conversation as JSON
  /load FILE                 go on with a saved conversation
  /bye                       exit (or Ctrl-D)
Start and end multi-line input with \"\"\". Ctrl-C stops an answer. Arrow keys edit the line and go through the
history (kept between runs)."""
EFFORTS = ("low", "medium", "high")


class Input:
    """Reads the user's lines: with prompt_toolkit on a terminal (line editing, history kept in ossie's cache
    folder), plainly otherwise (a pipe, or a dumb terminal that cannot edit a line)."""

    def __init__(self, console: Console):
        self.console, self.session, self.more = console, None, None
        if sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb":
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            class History(FileHistory):
                """The history file, where a multi-line message is one entry, recalled whole: its opening line is
                not kept alone (its other lines are read without history), the whole is added when it ends."""

                def append_string(self, string: str) -> None:
                    if not opens_block(string):
                        super().append_string(string)

            history = cache_dir() / "chat_history"
            history.parent.mkdir(parents=True, exist_ok=True)
            self.session = PromptSession(history=History(str(history)))
            self.more = PromptSession(history=InMemoryHistory())  # a multi-line message's following lines

    def line(self, prompt: str, more: bool = False) -> str:
        if self.session is not None:
            return (self.more if more else self.session).prompt(prompt)
        return self.console.input(prompt)

    def message(self) -> str:
        """One user message; lines between \"\"\" markers form one multi-line message (\"\"\"one line\"\"\"
        too)."""
        line = self.line(">>> ")
        stripped = line.strip()
        if not stripped.startswith('"""'):
            return line
        if not opens_block(stripped):
            return stripped[3:-3]
        lines = [stripped[3:]]
        while True:
            nxt = self.line("... ", more=True)
            if nxt.rstrip().endswith('"""'):
                lines.append(nxt.rstrip()[:-3])
                message = "\n".join(lines).strip("\n")
                if self.session is not None:
                    self.session.history.append_string(f'"""{message}"""')
                return message
            lines.append(nxt)


def opens_block(line: str) -> bool:
    """Whether a line opens a multi-line message (\"\"\" without its closing \"\"\" on the same line)."""
    stripped = line.strip()
    return stripped.startswith('"""') and not (len(stripped) >= 6 and stripped.endswith('"""'))


class Chat:
    def __init__(self, llm: Any, args: argparse.Namespace, tools: list[dict] | None, options: dict[str, Any],
                 builtin: list[str] | None = None, tool_settings: Any = None):
        self.llm, self.tools, self.options = llm, tools, dict(options)
        self.builtin, self.tool_settings = builtin or [], tool_settings
        self.sessions = self._new_sessions()  # the built-in tools' state lasts the conversation
        self.show_reasoning = not args.no_reasoning
        self.system: str | None = args.system
        self.messages: list[dict] = []
        self.console = Console(highlight=False)
        self.input = Input(self.console)

    def _new_sessions(self) -> Any:
        if not self.builtin:
            return None
        from .tools import BuiltinTools

        return BuiltinTools(self.builtin, self.tool_settings)

    def _fresh_conversation(self) -> None:
        if self.sessions is not None:
            self.sessions.close()
            self.sessions = self._new_sessions()

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit. A mistake is said, and the chat goes on."""
        cmd, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd == "/effort":
            if not rest:
                self.console.print(f"reasoning effort: {self.options['reasoning_effort']}")
            elif rest in EFFORTS:
                self.options["reasoning_effort"] = rest
                self.console.print(f"reasoning effort: {rest}")
            else:
                self.error(f"/effort takes low, medium or high, not {rest!r}")
        elif cmd == "/system":
            self.system = rest or None
            self.console.print("instructions set" if rest else "instructions cleared")
        elif cmd == "/reset":
            self.messages = []
            self._fresh_conversation()
            self.console.print("conversation cleared")
        elif cmd == "/save":
            self.save(rest)
        elif cmd == "/load":
            self.load(rest)
        elif cmd in ("/help", "/?"):
            self.console.print(HELP, markup=False)
        else:
            self.error(f"unknown command {cmd}; /help lists them")
        return True

    def error(self, text: str) -> None:
        self.console.print(text, style="red", markup=False)

    def save(self, path: str) -> None:
        if not path:
            return self.error("/save needs a file name")
        try:
            with open(path, "w") as f:
                json.dump({"system": self.system, "reasoning_effort": self.options["reasoning_effort"],
                           "tools": self.tools, "messages": self.messages}, f, indent=2)
        except OSError as e:
            return self.error(f"cannot save to {path}: {e.strerror or e}")
        self.console.print(f"saved {len(self.messages)} messages to {path}", markup=False)

    def load(self, path: str) -> None:
        if not path:
            return self.error("/load needs a file name")
        try:
            with open(path) as f:
                saved = json.load(f)
            messages = saved["messages"]
            if not isinstance(messages, list):
                raise ValueError("messages is not a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return self.error(f"cannot load {path}: {getattr(e, 'strerror', None) or e}")
        self.messages, self.system = messages, saved.get("system")
        self._fresh_conversation()
        if saved.get("reasoning_effort") in EFFORTS:
            self.options["reasoning_effort"] = saved["reasoning_effort"]
        self.tools = saved.get("tools") or self.tools
        self.console.print(f"loaded {len(messages)} messages from {path}", markup=False)

    def answer(self) -> None:
        """Stream one assistant turn; when it calls tools, ask for their results and continue."""
        while True:
            prefix = [{"role": "system", "content": self.system}] if self.system else []
            extra = {"builtin_tools": self.sessions} if self.sessions is not None else {}
            stream = self.llm.chat(prefix + self.messages, tools=self.tools, stream=True, **self.options, **extra)
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
                    elif d.kind in ("builtin_call", "builtin_result"):
                        if section is not None:
                            self.console.print()
                        title = f"▸ {d.name}" if d.kind == "builtin_call" else f"◂ {d.name}"
                        self.console.print(title, style="dim bold", markup=False)
                        self.console.print(d.text.rstrip("\n"), style="dim", markup=False, highlight=False)
                        section = "tool"
                    elif d.kind == "reasoning":
                        reasoning += d.text
                        if self.show_reasoning:
                            if section not in ("reasoning", None):
                                self.console.print()
                            if section != "reasoning":
                                self.console.print("Thinking...", style="dim italic")
                            self.console.print(d.text, style="dim", end="", markup=False)
                            section = "reasoning"
                    else:
                        content += d.text
                        if section in ("reasoning", "tool"):
                            self.console.print("\n")
                        section = "content"
                        self.console.print(d.text, end="", markup=False)
            except KeyboardInterrupt:
                stream.close()
                self.console.print("\n[stopped]", style="yellow", markup=False)
            elapsed = time.perf_counter() - t0
            self.console.print()
            if result is None and not (content or reasoning or calls):
                return  # stopped before anything was shown: no empty assistant message
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
                value = self.input.line(f"result of {call.name}> ")
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": value})

    def run(self) -> int:
        self.console.print(f"ossie chat: {self.llm.path} ({self.llm.layout} layout). /help for commands, "
                           "Ctrl-D to exit.", style="bold", markup=False)
        if self.llm.synthetic:
            self.console.print("This is a random synthetic checkpoint (ossie synth): its answers are random text.",
                               style="yellow")
        while True:
            try:
                line = self.input.message()
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


def run_chat(llm: Any, args: argparse.Namespace, tools: list[dict] | None, options: dict[str, Any],
             builtin: list[str] | None = None, tool_settings: Any = None) -> int:
    chat = Chat(llm, args, tools, options, builtin, tool_settings)
    try:
        return chat.run()
    finally:
        if chat.sessions is not None:
            chat.sessions.close()
