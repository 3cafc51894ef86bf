"""gpt-oss's built-in tools, run by ossie: `PythonTool` (a stateful interpreter in a sandbox) and `BrowserTool`
(search / open / find), each a `Tool` (base.py) listed in `TOOLS`. Each object is one session an agent can use
directly; `BuiltinTools` holds the sessions of one conversation for the chat loop (`ossie.LLM.chat(...,
builtin_tools=["python", "browser"])`, the server)."""

from __future__ import annotations

from collections.abc import Iterable

from .base import Tool
from .browser import Backend, BrowserError, BrowserTool, Citation, LocalBackend, SearchResult, make_backend
from .python import PythonTool, SandboxUnavailable
from .settings import Limits, ToolSettings

__all__ = ["Backend", "BrowserError", "BrowserTool", "BuiltinTools", "Citation", "Limits", "LocalBackend",
           "PythonTool", "SandboxUnavailable", "SearchResult", "TOOLS", "Tool", "ToolSettings", "make_backend"]

TOOLS: dict[str, type[Tool]] = {tool.name: tool for tool in (BrowserTool, PythonTool)}
NAMES = tuple(TOOLS)


class BuiltinTools:
    """The built-in tools of one conversation. `tools` are names ("python", "browser"), made on first use from
    `settings` and closed by `close()`, or tool objects (PythonTool, BrowserTool), which stay the caller's."""

    def __init__(self, tools: Iterable[str | Tool], settings: ToolSettings | None = None):
        self.settings = settings or ToolSettings()
        self.sessions: dict[str, Tool] = {}
        self.owned: set[str] = set()
        self.names: list[str] = []
        for tool in tools:
            name = tool if isinstance(tool, str) else getattr(tool, "name", None)
            if name not in NAMES:
                raise ValueError(f"unknown built-in tool {tool!r}; choose from {NAMES}")
            if name in self.names:
                raise ValueError(f"built-in tool {name!r} given twice")
            self.names.append(name)
            if not isinstance(tool, str):
                self.sessions[name] = tool
        self.calls = 0

    def _session(self, name: str) -> Tool:
        if name not in self.sessions:
            self.sessions[name] = TOOLS[name].from_settings(self.settings)
            self.owned.add(name)
        return self.sessions[name]

    @property
    def exhausted(self) -> bool:
        """The model was told the limit is reached (the call after the last allowed): another call ends the
        answer."""
        return self.calls > self.settings.max_calls

    def run(self, recipient: str, arguments: str) -> str:
        """Run one call (`python` with code, `browser.<function>` with JSON arguments); the tool's message.
        Failures come back as text for the model, never as exceptions."""
        self.calls += 1
        if self.calls > self.settings.max_calls:
            return (f"Error: this answer has reached its limit of {self.settings.max_calls} tool calls. Answer "
                    "with what you have.")
        namespace, _, function = recipient.partition(".")
        if namespace not in self.names:
            return f"Error: there is no tool {recipient!r}"
        try:
            return self._session(namespace).process(function, arguments)
        except (SandboxUnavailable, ValueError, RuntimeError) as e:
            return f"Error: the {namespace} tool is unavailable: {e}"

    def citations(self, text: str) -> list[Citation]:
        return [c for session in self.sessions.values() for c in session.citations(text)]

    def close(self) -> None:
        for name in self.owned:
            self.sessions.pop(name).close()
        self.owned.clear()

    def __enter__(self) -> BuiltinTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
