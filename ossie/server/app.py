"""`ossie serve`'s application: one engine, error handlers, the API key check, and the endpoints' routers.

Endpoints: GET /health, /metrics, /v1/models, and the chat page at / (webui.py); POST /v1/chat/completions
(chat_completions.py), /v1/responses (responses.py), /v1/completions (completions.py). Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}} with a 4xx status for anything the client got wrong; one failing
request never takes the server down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import constraints
from ..engine import Engine
from ..llm import LLM
from . import chat_completions, completions, ollama, responses, webui
from .metrics import ServerMetrics
from .middleware import AccessLog, APIKeyCheck, BodyLimit, JSONBodies, RequestIdFilter, principal
from .protocol import APIError, ModelCard, ModelList, error_for
from .serving import ServerOptions, Serving
from .streaming import ServerShuttingDown

log = logging.getLogger("ossie")

info = APIRouter()


@info.get("/health")
async def health(request: Request) -> dict:
    """Liveness for anyone (load balancers' probes carry no key); the engine's counters only with a key where keys
    are required: they tell how much others send and how much of it the cache served."""
    serving: Serving = request.app.state.serving
    if serving.options.api_keys and principal(request.scope) is None:
        return {"status": "ok"}
    return {"status": "ok", "model": serving.names[0], **vars(serving.engine.snapshot())}


@info.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


@info.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    serving: Serving = request.app.state.serving
    return ModelList(data=[serving.model_card(n) for n in serving.names])


@info.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    serving: Serving = request.app.state.serving
    return serving.model_card(serving.check_model(model))


def create_app(llm: LLM, served_model_names: Iterable[str] | None = None,
               options: ServerOptions | None = None) -> FastAPI:
    """The server for `llm`: every request goes through its engine (llm.engine, its options llm.args')."""
    # the LLM's engine, stepped by a thread of its own while the server runs: the library's calls in this process
    # (llm.generate, llm.chat) share its batch, budget and prefix cache, and step it themselves again afterwards
    engine = llm.engine.start()
    return serving_app(Serving(engine, llm.config, list(served_model_names or [default_model_name(llm.path)]),
                               options or ServerOptions(), model_path=llm.path, weight_bytes=llm.model.w.nbytes(),
                               device=str(llm.device)))


def serving_app(serving: Serving) -> FastAPI:
    """The server over `serving.engine`, whatever it is: an engine in this process (create_app), or replicas behind
    a Ray Serve router (ossie.replicas)."""
    engine, options = serving.engine, serving.options
    if not any(isinstance(f, RequestIdFilter) for f in log.filters):
        log.addFilter(RequestIdFilter())
    metrics = ServerMetrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        constraints.prepare()  # the steering's tables, before the first request that needs them
        yield
        engine.observers.remove(metrics.observe)
        engine.shutdown()
        serving.tokenizing.close()

    app = FastAPI(title="ossie", description="OpenAI-compatible server for gpt-oss", lifespan=lifespan)
    app.state.serving, app.state.metrics = serving, metrics
    app.state.responses = responses.ResponseStore()
    for router in (info, chat_completions.router, completions.router, responses.router, ollama.router):
        app.include_router(router)
    if options.webui:
        app.state.webui_files = webui.static_files()
        app.include_router(webui.router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(status_code=e.status, headers=e.headers,
                            content=error_for(request.url.path, e.message, e.type, e.param, e.code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            msg, param = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", ".".join(loc) or None
        return JSONResponse(status_code=400, content=error_for(request.url.path, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=e.status_code,
                            content=error_for(request.url.path, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        rid = request.scope.get("state", {}).get("request_id", "")
        log.exception("internal error")
        # uvicorn closes the connection after an unhandled error: say so, or the client's next request on it fails
        return JSONResponse(status_code=500, headers={"Connection": "close"}, content=error_for(
            request.url.path, f"internal error (request {rid}; the server's log has the details)", "server_error"))

    # pure ASGI middleware (see middleware.py), innermost first: bodies as JSON, the body limit, the key check, CORS
    # outermost (a browser's preflight carries no key), the access log around everything
    app.add_middleware(JSONBodies)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    if options.api_keys:
        opened = (frozenset({"/"}), webui.OPEN_PREFIXES) if options.webui else (frozenset(), ())
        app.add_middleware(APIKeyCheck, keys=options.api_keys, open_paths=opened[0], open_prefixes=opened[1])
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"])
    app.add_middleware(AccessLog)
    return app


def default_model_name(checkpoint: Path) -> str:
    """The served name when none is given: the checkpoint folder's name (a Hugging Face cache's snapshot is named
    by its repo, "openai/gpt-oss-20b"), never the path as typed."""
    path = checkpoint.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.parent.name if path.name == "original" else path.name


class _Server(uvicorn.Server):
    """uvicorn's server, draining for `drain_s` on SIGTERM / Ctrl-C: new connections are refused at once, requests
    in flight may finish; when the drain time is over the ones left are ended (streams with an error event,
    non-streaming requests with a 503) before the connections close. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float, on_ready: Callable[[], None]):
        super().__init__(config)
        self.engine, self.drain_s, self.on_ready = engine, drain_s, on_ready
        self._drain: threading.Timer | None = None

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the port is bound
            self.on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None:
            log.info("stopping: requests in flight have %.0f s to finish", self.drain_s)
            self._drain = threading.Timer(self.drain_s, self.engine.abort_all,
                                          [ServerShuttingDown("the server is shutting down")])
            self._drain.daemon = True
            self._drain.start()
        super().handle_exit(sig, frame)


OLLAMA_PORT = 11434  # where Ollama's clients look for it


def run_server(app: FastAPI, host: str, ports: list[int], log_level: str, on_ready: Callable[[], None]) -> None:
    """Serve `app` on `ports` until SIGTERM or Ctrl-C, draining as _Server says; on_ready() once they are bound."""
    serving: Serving = app.state.serving
    grace = serving.options.drain_s + 5  # after the drain, time for the cut requests to send their endings
    config = uvicorn.Config(app, host=host, port=ports[0], log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=grace)
    sockets = []
    for port in ports:  # one app, one engine, every port
        config.port = port
        sockets.append(config.bind_socket())
    _Server(config, serving.engine, serving.options.drain_s, on_ready).run(sockets=sockets)
