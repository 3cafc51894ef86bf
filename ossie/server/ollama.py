"""Ollama's native API (/api/*), beside the OpenAI one, for the clients that speak it (Open WebUI, Continue, Zed,
LangChain's ChatOllama, Codex's --oss mode, the `ollama` Python library...).

POST /api/chat and /api/generate stream newline-delimited JSON by default (`stream: false` for one object), with
gpt-oss's reasoning in `thinking` and `think` choosing the reasoning effort; GET /api/tags, /api/ps and
/api/version, POST /api/show and /api/pull describe the served model. Model names are those served, with or
without Ollama's ":latest", and "gpt-oss:20b" / "gpt-oss:120b" / "gpt-oss:latest" when the model has that shape.
Errors have Ollama's shape, {"error": "..."} (app.py renders them so for every /api path).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from ..chat import harmony
from ..model.config import PRESETS, ModelConfig
from .chat_completions import chat_deltas, start_chat
from .protocol import SEED_RANGE, APIError, SamplingRequest, StrictBody, check_schema, check_tools
from .serving import Serving
from .streaming import Run, cancel_on_disconnect, streamed

router = APIRouter()

OLLAMA_VERSION = "0.13.0"  # the Ollama API version ossie answers to (clients check a minimum)
# Ollama's default context (OLLAMA_CONTEXT_LENGTH): a request that sets neither num_predict (or sets it to 0 or
# below, "no limit") nor num_ctx generates at most this many tokens, as it would in Ollama, instead of running to the
# end of gpt-oss's 131k context (what the Ollama clients' default requests did here).
DEFAULT_NUM_CTX = 4096
THINK_LEVELS = {True: "medium", False: "low", "low": "low", "medium": "medium", "high": "high"}
FAMILY = "gptoss"  # as Ollama names gpt-oss's architecture


class OllamaOptions(StrictBody):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    num_predict: int | None = None  # -1: no limit, -2: fill the context
    num_ctx: int | None = Field(default=None, ge=1)  # the prompt and its answer fit within it
    stop: str | list[str] | None = None


class _OllamaRequest(StrictBody):
    model: str
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None  # accepted: the model stays loaded while ossie serves


class OllamaChatRequest(_OllamaRequest):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaModelRequest(StrictBody):
    model: str | None = None
    name: str | None = None  # older clients' field
    stream: bool = True

    @property
    def which(self) -> str:
        if not (self.model or self.name):
            raise APIError(400, "model is required")
        return self.model or self.name


# ---- the served model as Ollama describes models ----------------------------------------------------------------


def aliases(serving: Serving) -> list[str]:
    """Ollama-style names for the served model when it has a published shape."""
    shape = {name: cfg for name, cfg in PRESETS.items() if name in ("20b", "120b")}
    for size, cfg in shape.items():
        if (serving.config.num_layers, serving.config.num_experts) == (cfg.num_layers, cfg.num_experts):
            return [f"gpt-oss:{size}"] + (["gpt-oss:latest", "gpt-oss"] if size == "20b" else [])
    return []


def resolve(serving: Serving, name: str) -> str:
    """The served model `name` designates, or Ollama's 404."""
    candidates = {name, name.removesuffix(":latest")}
    if candidates & set(serving.names) or candidates & set(aliases(serving)):
        return serving.names[0]
    raise APIError(404, f'model "{name}" not found, try pulling it first', "model", "model_not_found")


def parameter_count(cfg: ModelConfig) -> int:
    h, e = cfg.hidden_size, cfg.num_experts
    per_layer = cfg.qkv_dim * h + cfg.num_heads * cfg.head_dim * h + e * h + e * 3 * cfg.intermediate_size * h
    return cfg.num_layers * per_layer + 2 * cfg.vocab_size * h


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def details(serving: Serving) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": FAMILY, "families": [FAMILY],
            "parameter_size": _size_label(parameter_count(serving.config)), "quantization_level": "MXFP4"}


def _modified(serving: Serving) -> str:
    stamp = serving.model_path.stat().st_mtime if serving.model_path else serving.created
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def _digest(serving: Serving) -> str:
    return hashlib.sha256(f"{serving.model_path}:{serving.config.to_hf_dict()}".encode()).hexdigest()


def _disk_bytes(serving: Serving) -> int:
    path = serving.model_path
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path else serving.weight_bytes


def model_entry(serving: Serving, name: str) -> dict:
    return {"name": name, "model": name, "modified_at": _modified(serving), "size": _disk_bytes(serving),
            "digest": _digest(serving), "details": details(serving)}


@router.get("/api/version")
async def version() -> dict:
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    serving: Serving = request.app.state.serving
    return {"models": [model_entry(serving, n) for n in serving.names + aliases(serving)]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    serving: Serving = request.app.state.serving
    on_gpu = serving.weight_bytes if serving.device != "cpu" else 0
    return {"models": [{**model_entry(serving, n), "size": serving.weight_bytes, "size_vram": on_gpu,
                        "expires_at": "2318-08-08T00:00:00Z", "context_length": serving.config.max_context}
                       for n in serving.names]}


@router.post("/api/show")
async def show(req: OllamaModelRequest, request: Request) -> dict:
    serving: Serving = request.app.state.serving
    resolve(serving, req.which)
    cfg = serving.config
    info = {"general.architecture": FAMILY, "general.parameter_count": parameter_count(cfg),
            f"{FAMILY}.context_length": cfg.max_context, f"{FAMILY}.embedding_length": cfg.hidden_size,
            f"{FAMILY}.block_count": cfg.num_layers, f"{FAMILY}.expert_count": cfg.num_experts,
            f"{FAMILY}.expert_used_count": cfg.experts_per_token, f"{FAMILY}.attention.head_count": cfg.num_heads,
            f"{FAMILY}.attention.head_count_kv": cfg.num_kv_heads,
            f"{FAMILY}.attention.sliding_window": cfg.sliding_window}
    return {"modelfile": f"# served by ossie\nFROM {serving.model_path}\n", "parameters": "temperature 1",
            "template": "{{ harmony }}", "details": details(serving), "model_info": info,
            "capabilities": ["completion", "tools", "thinking"],
            "thinking": {"values": list(harmony.REASONING_EFFORTS), "default": "medium"},
            "modified_at": _modified(serving)}


@router.post("/api/pull")
async def pull(req: OllamaModelRequest, request: Request):
    """The served model is here: its files reported as pulled layers (Ollama's progress objects), then success.
    ossie serves the one model it was started with; another name gets an error that says how to serve it."""
    serving: Serving = request.app.state.serving
    try:
        resolve(serving, req.which)
    except APIError:
        raise APIError(404, f'pull model manifest: this server serves only {serving.names[0]}; to serve '
                            f'"{req.which}", run `ossie pull {req.which}` and then `ossie serve {req.which}`',
                       "model", "model_not_found") from None
    if not req.stream:
        return {"status": "success"}
    events = [{"status": "pulling manifest"}, *_layers(serving), {"status": "verifying sha256 digest"},
              {"status": "writing manifest"}, {"status": "success"}]
    return StreamingResponse(iter(json.dumps(e) + "\n" for e in events), media_type="application/x-ndjson")


def _layers(serving: Serving) -> list[dict]:
    """Each file of the served checkpoint as a pulled layer: its size, and its digest where the Hugging Face cache
    names its blob by SHA-256 (no file is hashed again for this)."""
    folder = serving.model_path
    if folder is None:
        return []
    out = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        blob = os.path.basename(os.path.realpath(f))
        size = f.stat().st_size
        event = {"status": f"pulling {f.name}", "total": size, "completed": size}
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
            event = {**event, "status": f"pulling {blob[:12]}", "digest": f"sha256:{blob}"}
        out.append(event)
    return out


# ---- generation ---------------------------------------------------------------------------------------------------


def _messages(raw: list[dict[str, Any]]) -> list[dict]:
    """Ollama messages as OpenAI chat messages (which harmony.render reads): `thinking` is the reasoning, tool
    calls carry their arguments as objects, a tool result names its tool with `tool_name`."""
    out: list[dict] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        if m.get("images"):
            raise APIError(400, f"{where}: images are not supported (gpt-oss reads text)", f"{where}.images")
        msg: dict[str, Any] = {"role": m.get("role"), "content": m.get("content")}
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise APIError(400, f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            msg["tool_calls"] = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"{where}.tool_calls[{j}] needs function.name", f"{where}.tool_calls")
                args = fn.get("arguments") or {}
                msg["tool_calls"].append({"id": f"call_{i}_{j}", "type": "function", "function": {
                    "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if m.get("role") == "tool" and m.get("tool_name"):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def _response_format(fmt: str | dict | None) -> dict | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        try:
            check_schema(fmt, "format")
        except ValueError as e:
            raise APIError(400, str(e), "format") from None
        return {"type": "json_schema", "json_schema": {"schema": fmt}}
    raise APIError(400, f'format must be "json" or a JSON schema, got {fmt!r}', "format")


def _sampling(req: _OllamaRequest) -> tuple[SamplingRequest, int | None, list[str] | None]:
    o = req.options or OllamaOptions()
    sampling = SamplingRequest(model=req.model, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                               min_p=o.min_p, seed=o.seed)
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return sampling, max_tokens, o.stop


def _effort(think: bool | str | None) -> tuple[str, bool]:
    """(reasoning effort, whether the reasoning is returned)."""
    if think is None:
        return "medium", True
    if think not in THINK_LEVELS:
        raise APIError(400, f'think must be true, false, "low", "medium" or "high", got {think!r}', "think")
    return THINK_LEVELS[think], think is not False


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


async def _generate(run: Run, stops: list[str] | None, show_thinking: bool, start: float,
                    chunk: Any) -> AsyncIterator[dict]:
    """Ollama's stream for a chat run: `chunk(content, thinking)` makes a piece; tool calls come whole, then the
    final object with done_reason and the counters."""
    first = None
    async for d in chat_deltas(run, stops):
        if first is None:
            first = time.perf_counter()
        if d.kind == "reasoning" and show_thinking:
            yield chunk(content="", thinking=d.text)
        elif d.kind == "content":
            yield chunk(content=d.text, thinking=None)
        elif d.kind == "finish":
            result = d.result
            if result.tool_calls:
                yield chunk(content="", thinking=None, tool_calls=[
                    {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in result.tool_calls])
            end = time.perf_counter()
            first = first or end
            yield {"done": True, "done_reason": "length" if result.finish_reason == "length" else "stop",
                   "total_duration": _ns(end - start), "load_duration": 0,
                   "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": _ns(first - start),
                   "eval_count": result.completion_tokens, "eval_duration": _ns(end - first)}


def _ndjson(run: Run, pieces: AsyncIterator[dict], request: Request) -> StreamingResponse:
    """Newline-delimited JSON; a failure mid-stream is a last {"error": ...} line (the ollama client raises it)."""
    return streamed((json.dumps(piece) + "\n" async for piece in pieces), run, request,
                    lambda e: json.dumps({"error": e.message}) + "\n", "application/x-ndjson")


async def _start(serving: Serving, request: Request, req: _OllamaRequest, messages: list[dict],
                 tools: list[dict] | None) -> tuple[Run, list[str] | None, bool]:
    effort, show_thinking = _effort(req.think)
    sampling, max_tokens, stops = _sampling(req)
    num_ctx = req.options.num_ctx if req.options else None
    run = await start_chat(serving, request, sampling, messages, tools, tool_choice=None,
                           response_format=_response_format(req.format), effort=effort, max_tokens=max_tokens,
                           max_tokens_param="options.num_predict", messages_param="messages", context=num_ctx,
                           default_max_tokens=None if num_ctx else DEFAULT_NUM_CTX,
                           builtin=serving.options.builtin_tools)
    return run, stops, show_thinking


@router.post("/api/chat")
async def chat(req: OllamaChatRequest, request: Request):
    serving: Serving = request.app.state.serving
    name, start = req.model, time.perf_counter()
    resolve(serving, name)
    if not req.messages:  # Ollama's way to load a model
        return {"model": name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    try:
        check_tools(req.tools, nested=True)
    except ValueError as e:
        raise APIError(400, str(e), "tools") from None
    run, stops, show_thinking = await _start(serving, request, req, _messages(req.messages), req.tools)

    def chunk(content: str, thinking: str | None, tool_calls: list | None = None) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"model": name, "created_at": _now(), "message": message, "done": False}

    async def pieces() -> AsyncIterator[dict]:
        async for piece in _generate(run, stops, show_thinking, start, chunk):
            if piece.get("done"):
                piece = {"model": name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                         **piece}
            yield piece

    async def merge(parts: AsyncIterator[dict]) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        async for piece in parts:
            if piece.get("done"):
                return {**piece, "message": message}
            got = piece["message"]
            message["content"] += got["content"]
            if got.get("thinking"):
                message["thinking"] = message.get("thinking", "") + got["thinking"]
            if got.get("tool_calls"):
                message["tool_calls"] = got["tool_calls"]
        raise APIError(500, "the generation ended without a final message", type="server_error")

    if req.stream:
        return _ndjson(run, pieces(), request)
    async with cancel_on_disconnect(run, request):
        return await merge(pieces())


@router.post("/api/generate")
async def generate(req: OllamaGenerateRequest, request: Request):
    serving: Serving = request.app.state.serving
    name, start = req.model, time.perf_counter()
    resolve(serving, name)
    if req.images:
        raise APIError(400, "images are not supported (gpt-oss reads text)", "images")
    if not req.prompt:  # Ollama's way to load a model
        return {"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if req.raw:
        raise APIError(400, "raw prompts are served by POST /v1/completions (no chat template)", "raw")
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": "user", "content": req.prompt}]
    run, stops, show_thinking = await _start(serving, request, req, messages, None)

    def chunk(content: str, thinking: str | None, tool_calls: list | None = None) -> dict:
        piece: dict[str, Any] = {"model": name, "created_at": _now(), "response": content, "done": False}
        if thinking:
            piece["thinking"] = thinking
        return piece

    async def pieces() -> AsyncIterator[dict]:
        async for piece in _generate(run, stops, show_thinking, start, chunk):
            if piece.get("done"):
                piece = {"model": name, "created_at": _now(), "response": "", **piece}
            yield piece

    async def merge(parts: AsyncIterator[dict]) -> dict:
        response, thinking = "", ""
        async for piece in parts:
            if piece.get("done"):
                return {**piece, "response": response, **({"thinking": thinking} if thinking else {})}
            response += piece["response"]
            thinking += piece.get("thinking") or ""
        raise APIError(500, "the generation ended without a final message", type="server_error")

    if req.stream:
        return _ndjson(run, pieces(), request)
    async with cancel_on_disconnect(run, request):
        return await merge(pieces())
