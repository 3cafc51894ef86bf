"""`ossie serve`'s application: one engine, error handlers, the API key check, and the endpoints' routers.

Endpoints: GET /health, /metrics, /v1/models; POST /v1/chat/completions (chat_completions.py), /v1/responses
(responses.py), /v1/completions (completions.py). Errors are OpenAI-shaped: {"error": {"message", "type",
"param", "code"}} with a 4xx status for anything the client got wrong; one failing request never takes the
server down.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..llm import LLM
from . import chat_completions, completions, responses
from .protocol import APIError, ModelCard, ModelList, error_body
from .serving import Serving

log = logging.getLogger("ossie")

info = APIRouter()


@info.get("/health")
async def health(request: Request) -> dict:
    serving: Serving = request.app.state.serving
    return {"status": "ok", "model": serving.names[0], **vars(serving.engine.snapshot())}


@info.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    s = request.app.state.serving.engine.snapshot()
    hit_rate = s.cached_prompt_tokens / s.prompt_tokens if s.prompt_tokens else 0.0
    lines = [f"ossie_requests_waiting {s.waiting}", f"ossie_requests_running {s.running}",
             f"ossie_requests_finished_total {s.finished}", f"ossie_requests_cancelled_total {s.cancelled}",
             f"ossie_requests_failed_total {s.failed}", f"ossie_prompt_tokens_total {s.prompt_tokens}",
             f"ossie_prompt_tokens_cached_total {s.cached_prompt_tokens}",
             f"ossie_prefix_cache_hit_rate {hit_rate:.4f}",
             f"ossie_generation_tokens_total {s.generated_tokens}",
             f"ossie_kv_cache_running_bytes {s.kv_running_bytes}",
             f"ossie_kv_cache_prefix_bytes {s.kv_cached_bytes}",
             f"ossie_kv_cache_prefix_blocks {s.kv_cached_blocks}"]
    return PlainTextResponse("\n".join(lines) + "\n")


@info.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    serving: Serving = request.app.state.serving
    return ModelList(data=[serving.model_card(n) for n in serving.names])


@info.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    serving: Serving = request.app.state.serving
    return serving.model_card(serving.check_model(model))


def create_app(llm: LLM, served_model_names: Iterable[str] | None = None, api_key: str | None = None,
               max_running: int = 16) -> FastAPI:
    """The server for `llm` (its runner serves every request through one Engine)."""
    engine = Engine(llm.runner, max_running=max_running)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="ossie", description="OpenAI-compatible server for gpt-oss", lifespan=lifespan)
    app.state.serving = Serving(engine, llm.config, list(served_model_names or [str(llm.path)]))
    app.state.responses = responses.ResponseStore()
    for router in (info, chat_completions.router, completions.router, responses.router):
        app.include_router(router)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            msg, param = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", ".".join(loc) or None
        return JSONResponse(status_code=400, content=error_body(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=e.status_code, content=error_body(str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(status_code=500, content=error_body(f"internal error: {e}", "server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return JSONResponse(status_code=401, content=error_body(
                    "Incorrect API key provided", code="invalid_api_key"))
        return await call_next(request)

    return app
