"""`ossie serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for gpt-oss, split by endpoint as vLLM's
entrypoints are: app (errors, routers, the uvicorn server), middleware (access log, API key, body limit),
protocol (requests and responses), serving (the options and what the endpoints share), tokenizing (prompts off
the event loop), streaming (running a generation from async code, SSE), one module per OpenAI endpoint, and
ollama (Ollama's native API)."""

from .app import OLLAMA_PORT, create_app, default_model_name, run_server, serving_app
from .serving import ServerOptions, Serving

__all__ = ["OLLAMA_PORT", "ServerOptions", "Serving", "create_app", "default_model_name", "run_server",
           "serving_app"]
