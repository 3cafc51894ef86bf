"""`ossie serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for gpt-oss, split by endpoint as vLLM's
entrypoints are: app (middleware, errors, routers), protocol (requests and responses), serving (what the
endpoints share), streaming (running a generation from async code, SSE), and one module per endpoint."""

from .app import create_app

__all__ = ["create_app"]
