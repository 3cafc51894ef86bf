"""How the built-in tools of each conversation are made: the sandbox's limits and the server's and the CLI's tool
options. (A module of its own: the tools read it, and the package that lists the tools reads them.)"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_CALLS = 32  # built-in tool calls one answer may make; beyond, the model is told to answer


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 120.0  # a call's wall-clock time: the figure harmony's tool description gives the model
    memory_mb: int = 4096  # address space of each process in the sandbox
    processes: int = 64
    cpu_s: int = 3600  # CPU time of the whole session
    file_mb: int = 1024  # the largest file it may write
    max_output_chars: int = 16_000  # longer output is cut, with a note saying so


@dataclass(frozen=True)
class ToolSettings:
    """How the tools of each conversation are made (the server's and the CLI's options)."""

    python: Limits = field(default_factory=Limits)
    dangerously_unsandboxed: bool = False
    search_backend: str | None = None  # see browser.make_backend
    allow_private: bool = False  # the browser may open loopback and private addresses
    max_calls: int = MAX_CALLS
