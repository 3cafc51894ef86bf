"""`Tool`: what a built-in tool is to ossie (openai/gpt-oss's `Tool`, shaped for harmony's built-ins): a name (the
namespace of the harmony recipient the model writes: `python`, `browser.search`), its declaration in the system
message, how a session is made from the server's or the CLI's settings (and whether it can be, checked before a model
loads), and a session's calls, citations and end. Each tool is one class; `ossie.tools.TOOLS` lists them, and every
other place (the prompt, the command line, the chat loop) reads that list instead of spelling the names again."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from openai_harmony import SystemContent

    from .settings import ToolSettings


class Tool(ABC):
    name: ClassVar[str]

    @staticmethod
    @abstractmethod
    def declare(system: SystemContent) -> SystemContent:
        """The system message with this tool declared, as harmony declares it."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: ToolSettings) -> Tool:
        """A new session."""

    @classmethod
    @abstractmethod
    def check(cls, settings: ToolSettings) -> None:
        """Raise ValueError, in one line, when a session could not be made with these settings."""

    @abstractmethod
    def process(self, function: str, arguments: str) -> str:
        """One call: `function` is what follows the namespace in the recipient ("" for python), `arguments` what
        the model wrote. Returns the tool's message; failures come back as text for the model."""

    def citations(self, text: str) -> list[Any]:
        """The sources an answer's text cites from this session (the browser's 【3†L10-L12】)."""
        return []

    @abstractmethod
    def close(self) -> None:
        """End the session (its sandbox, its files)."""
