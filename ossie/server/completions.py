"""POST /v1/completions: raw text completion of a prompt (text or token ids), no harmony."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ..chat.stops import StopStrings
from ..special_tokens import ENDOFTEXT, STOP_TOKEN_IDS
from ..tokenizer import TextDecoder, harmony_encoding
from .middleware import client_of
from .protocol import APIError, Completion, CompletionChoice, CompletionRequest, Usage
from .serving import Serving
from .streaming import Run, cancel_on_disconnect, data, sse

router = APIRouter()


async def prompt_tokens(serving: Serving, request: Request, req: CompletionRequest) -> list[int]:
    if isinstance(req.prompt, list) and req.prompt and all(isinstance(x, int) for x in req.prompt):
        prompt = list(req.prompt)
        if any(not 0 <= t < serving.config.vocab_size for t in prompt):
            raise APIError(400, "prompt holds token ids outside the vocabulary", "prompt")
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(texts) != 1:
            raise APIError(400, "give one prompt (a string or a list of token ids)", "prompt")
        size = int(request.headers.get("content-length") or 0)
        prompt = await serving.tokenizing.encode(size, texts[0], "prompt", client_of(request.scope))
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    return prompt


async def completion_text(run: Run, stop: str | list[str] | None, echo: str) -> AsyncIterator[str]:
    """The completion's text as it comes (after `echo`), cut at a stop string (which ends the generation)."""
    decoder, stops = TextDecoder(), StopStrings(stop)
    if echo:
        yield echo
    async with contextlib.aclosing(run.tokens()) as tokens:
        async for tok in tokens:
            text = stops.push(decoder.push(tok))
            if text:
                yield text
            if stops.hit:
                break
    tail = stops.push(decoder.flush()) + stops.flush()
    if tail:
        yield tail
    if stops.hit:
        run.finish_reason = "stop"


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    serving.check_request(req)
    serving.check_capacity()
    prompt = await prompt_tokens(serving, request, req)
    params = req.to_sampling_params(serving.budget(prompt, req.max_tokens, "max_tokens", "prompt"),
                                    [ENDOFTEXT, *STOP_TOKEN_IDS])
    run = Run(serving.engine, prompt, params, None, serving.options.request_timeout_s,
              serving.cache_scope(request, prompt, req.cache_salt))
    request.state.run = run  # for the access log
    cid, now = "cmpl-" + uuid.uuid4().hex, int(time.time())
    echo = harmony_encoding().decode(prompt) if req.echo else ""
    pieces = completion_text(run, req.stop, echo)

    def body(choices: list[CompletionChoice], usage: bool = False) -> Completion:
        return Completion(id=cid, created=now, model=req.model, choices=choices, usage=Usage.of(
            len(prompt), run.completion_tokens, cached_tokens=run.cached_tokens) if usage else None)

    if req.stream:
        async def stream() -> AsyncIterator[str]:
            async for comment in run.queued():
                yield comment
            async for text in pieces:
                yield data(body([CompletionChoice(text=text)]), exclude={"usage"})
            yield data(body([CompletionChoice(text="", finish_reason=run.finish_reason)]), exclude={"usage"})
            if req.include_usage:
                yield data(body([], usage=True))
            yield data("[DONE]")

        return sse(stream(), run, request)
    async with cancel_on_disconnect(run, request):
        text = "".join([t async for t in pieces])
    return body([CompletionChoice(text=text, finish_reason=run.finish_reason)], usage=True)
