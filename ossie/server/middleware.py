"""The server's ASGI middleware: the access log with request ids, the API key check, the request body limit, and
request bodies read as JSON whatever their Content-Type.

Both are plain ASGI callables, not Starlette's BaseHTTPMiddleware (`@app.middleware("http")`): that one runs the
endpoint behind a channel of its own, and `request.is_disconnected()` then never sees a client leave, so a
non-streaming request whose client had gone generated to its end.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_for

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers' probes)

access_log = logging.getLogger("ossie.access")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Prefixes what is logged while a request is served (a warning about its model output, say) with its id."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid is not None and not getattr(record, "request_id", None):
            record.request_id = rid
            record.msg = f"{rid}: {record.msg}"
        return True


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class AccessLog:
    """Gives each request an id (`x-request-id` on the response, `request_id` in the request's state, named in
    warnings) and logs a line when its response ends: method, path, status, tokens, seconds. Never the prompt."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        REQUEST_ID.set(rid)  # this request's task, and the tasks it starts, see it
        start, status = time.perf_counter(), 0

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        def log_line() -> None:
            run = state.get("run")  # the generation, if the request started one (streaming.Run)
            tokens = f" {run.prompt_tokens}+{run.completion_tokens} tokens" if run is not None else ""
            who = principal(scope)
            access_log.info("%s %s%s %s %d%s %.2fs", rid, f"[{who}] " if who else "", scope["method"], scope["path"],
                            status, tokens, time.perf_counter() - start)

        try:
            await self.app(scope, receive, logging_send)
        except Exception:  # the 500 goes out from Starlette's error middleware, outside this one
            status = 500
            log_line()
            raise


def principal(scope: Scope) -> str | None:
    """The API principal a request was authenticated as (APIKeyCheck), or None (no key, or none configured)."""
    return scope.get("state", {}).get("principal")


def client_of(scope: Scope) -> str:
    """Who a request comes from, for per-client limits: its principal, else its address."""
    name = principal(scope)
    if name is not None:
        return "principal:" + name
    client = scope.get("client")
    return "address:" + (client[0] if client else "")


class APIKeyCheck:
    """Every path but /health and the `open` ones (the chat page's files, which must load to ask for the key and hold
    nothing of the API) needs `Authorization: Bearer KEY` with one of `keys` (key -> the principal's name, which the
    request then carries in its state: its prefix cache and stored responses are its own, and the access log names
    it). The scheme is case-insensitive (RFC 7235); the token is compared with every key in constant time, so the
    time taken says nothing about which is close."""

    def __init__(self, app: ASGIApp, keys: dict[str, str], open_paths: frozenset[str] = frozenset(),
                 open_prefixes: tuple[str, ...] = ()):
        self.app = app
        self.keys = [(key.encode(), name) for key, name in keys.items()]
        self.open_paths, self.open_prefixes = OPEN_PATHS | open_paths, open_prefixes

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        if scope["method"] == "OPTIONS" or path in self.open_paths:
            return True
        return scope["method"] in ("GET", "HEAD") and path.startswith(self.open_prefixes) and ".." not in path

    def _principal(self, scope: Scope) -> str | None:
        for header, value in scope.get("headers", ()):
            if header == b"authorization":
                scheme, _, token = value.partition(b" ")
                found = None
                for key, name in self.keys:
                    if hmac.compare_digest(token.strip(), key):
                        found = name
                return found if scheme.lower() == b"bearer" else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = self._principal(scope)
        if name is None and not self._open(scope):
            await _send_json(send, 401, error_for(scope["path"], "Incorrect or missing API key: send "
                                                  "'Authorization: Bearer KEY'", code="invalid_api_key"),
                             [(b"www-authenticate", b'Bearer realm="ossie"')])
            return
        scope.setdefault("state", {})["principal"] = name
        await self.app(scope, receive, send)


class BodyLimit:
    """Request bodies above `max_bytes` get a 413 before they are read whole (by their Content-Length, or as
    they arrive when it is absent)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, scope: Scope) -> dict:
        return error_for(scope["path"], f"the request body exceeds {self.max_bytes} bytes (ossie serve "
                                        "--max-body-mb)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_json(send, 413, self._too_large(scope))
                return
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._too_large(scope))


class _BodyTooLarge(Exception):
    pass


class JSONBodies:
    """Every request body is read as JSON, whatever its Content-Type says, as Ollama reads them: `curl -d '{...}'`
    sends application/x-www-form-urlencoded, and Ollama's API docs write every example that way. FastAPI hands
    such a body to validation as raw bytes, which was a 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
