"""What the server's tokenizing worker processes run: rendering a conversation and encoding text, each failure of
the tokenizer turned into the message of why (a str). It imports harmony and the tokenizer only (no torch, no
server), so a worker starts in a fraction of a second and holds little memory."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

from ..tokenizer import harmony_encoding
from . import harmony


def render(messages: list[dict], tools: list[dict] | None, effort: str,
           builtin_tools: tuple[str, ...] = ()) -> list[int] | str:
    try:
        return harmony.render(messages, tools, effort, builtin_tools=builtin_tools)
    except harmony.ChatFormatError as e:
        return str(e)


def encode(text: str) -> list[int] | str:
    return list(harmony_encoding().encode(text, allowed_special="all"))


def guarded(fn: Any, *args: Any) -> Any:
    """fn(*args): tokens, or the message of why the input cannot be tokenized (a str)."""
    try:  # (lone surrogates were refused with the request body: protocol.StrictBody)
        return fn(*args)
    except UnicodeEncodeError:
        return "the text is not valid Unicode (it holds a lone surrogate such as \\ud800)"
    except ValueError as e:  # openai-harmony refusing the conversation it was given
        return f"the conversation cannot be rendered: {e}"
    except BaseException as e:  # a Rust panic in the tokenizer arrives as pyo3's PanicException, a BaseException
        if type(e).__name__ != "PanicException":
            raise
        return "the tokenizer cannot encode this text"


def serve(conn: Connection) -> None:
    """A worker's loop: (fn, args) in, guarded(fn, *args) out, until the server closes the pipe. Ctrl-C at the
    terminal reaches the whole process group: the server drains its requests then, and a worker must not die
    under the request it is tokenizing (the server ends the workers itself)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(guarded(fn, *args))
