"""What a hostile or careless neighbour did to `ossie serve`, each pinned: bodies sent without a JSON content type,
Ollama's error shape on its paths, the queue's 429 and its Retry-After, Ollama's default output limit, a Responses
stream cut by shutdown, the KV gauge after cancellations."""

import copy
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from ossie.engine import EngineStats
from ossie.server import ServerOptions, create_app
from ossie.server.protocol import APIError
from ossie.server.serving import Serving
from ossie.server.streaming import ServerShuttingDown
from tests.helpers import use_runner

MODEL = "tiny"
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 2},
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                  "options": {"num_predict": 2}},
    "/api/generate": {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/api/show": {"model": MODEL},
}


@pytest.fixture(scope="module")
def http(tiny_llm):
    with TestClient(create_app(tiny_llm, [MODEL]), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None,
                                          "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("path", list(BODIES))
def test_a_json_body_is_read_whatever_its_content_type(http, path, content_type):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded (Ollama's docs write every example that way): a 500
    with two tracebacks before. Ollama reads the body as JSON whatever the header says; so does ossie."""
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=json.dumps(BODIES[path]).encode(), headers=headers)
    assert r.status_code == 200, r.text
    bad = http.post(path, content=b"model=tiny&prompt=hi", headers=headers)
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert isinstance(error, str if path.startswith("/api/") else dict)


def ollama_error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body  # the ollama client shows it as is
    return body["error"]


def test_errors_on_ollamas_paths_have_ollamas_shape(tiny_llm):
    app = create_app(tiny_llm, [MODEL], ServerOptions(api_keys={"sekret": "default"}, max_body_bytes=1000))
    key = {"authorization": "Bearer sekret"}
    with TestClient(app, raise_server_exceptions=False) as http:
        assert "API key" in ollama_error(http.post("/api/chat", json=BODIES["/api/chat"]), 401)
        assert "/v1" not in ollama_error(http.get("/api/nothing", headers=key), 404)
        assert "exceeds" in ollama_error(http.post("/api/generate", headers=key, content=b"x" * 2000), 413)
        ollama_error(http.get("/api/chat", headers=key), 405)

        def broken(*args, **kwargs):
            raise RuntimeError("secret internals")

        app.state.serving.check_capacity = broken
        assert "secret" not in ollama_error(http.post("/api/chat", headers=key, json=BODIES["/api/chat"]), 500)
        # the OpenAI paths keep OpenAI's shape
        r = http.post("/v1/chat/completions", json=BODIES["/v1/chat/completions"])
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---- the queue: 429 only when the queue beyond the slots is full -------------------------------------------------


class Snapshots:
    def __init__(self, max_running: int = 16, **stats):
        self.max_running, self.stats = max_running, EngineStats(**stats)

    def snapshot(self) -> EngineStats:
        return self.stats


def serving(max_running: int = 16, max_queued: int = 8, **stats) -> Serving:
    return Serving(Snapshots(max_running, **stats), None, [MODEL], ServerOptions(max_queued=max_queued))


@pytest.mark.parametrize("waiting,running,refused", [
    (23, 0, False),  # a burst the engine has not picked up yet: 16 of them take the free slots, 7 queue
    (24, 0, True),  # 16 slots and 8 queued: full
    (7, 16, False), (8, 16, True), (0, 0, False), (9, 15, True), (8, 15, False),
])
def test_the_queue_counts_what_waits_beyond_the_slots(waiting, running, refused):
    """With --max-queued 8 and 16 slots a burst of 200 got 191 refusals while 9-13 slots ran: requests the engine
    had not picked up counted as queued although slots were free."""
    s = serving(waiting=waiting, running=running, mean_request_s=3.0)
    if not refused:
        s.check_capacity()
        return
    with pytest.raises(APIError) as e:
        s.check_capacity()
    assert e.value.status == 429 and e.value.type == "rate_limit_error"


@pytest.mark.parametrize("waiting,mean,retry", [
    (8, 43.0, 43),  # one turnover of the slots: one request's time
    (8 + 16, 43.0, 86),  # a full wave of 16 ahead beyond the queue: two turnovers
    (8, 0.2, 1),  # never below a second
    (8, 0.0, 1),  # nothing finished yet: a second
    (8 + 16 * 100, 43.0, 600),  # bounded
])
def test_retry_after_follows_the_queue(waiting, mean, retry):
    """Retry-After was always 1 s while requests took ~43 s."""
    with pytest.raises(APIError) as e:
        serving(waiting=waiting, running=16, mean_request_s=mean).check_capacity()
    assert e.value.headers["Retry-After"] == str(retry)


# ---- Ollama's default output limit -----------------------------------------------------------------------------


@pytest.mark.parametrize("options,limit", [
    (None, 4096), ({}, 4096), ({"num_predict": -1}, 4096), ({"num_predict": 0}, 4096), ({"num_predict": -2}, 4096),
    ({"num_predict": 7}, 7), ({"num_ctx": 1000}, None), ({"num_ctx": 100000, "num_predict": -1}, None),
])
def test_ollama_requests_without_a_limit_stop_at_its_default_context(tiny_llm, options, limit):
    """The Ollama clients send no num_predict by default: generating to gpt-oss's 131k context then took hours."""
    app = create_app(use_runner(copy.copy(tiny_llm), tiny_llm.runner), [MODEL])  # an engine of its own to wrap
    engine = app.state.serving.engine
    submitted = []
    submit = engine.submit

    def record(prompt, params, *args, **kwargs):  # what the engine was asked for; the request ends at once
        submitted.append((len(prompt), params.max_tokens))
        handle = submit(prompt, params, *args, **kwargs)
        handle.cancel()
        return handle

    engine.submit = record
    body = {"model": MODEL, "prompt": "hi", "stream": False, **({"options": options} if options is not None else {})}
    with TestClient(app) as http:
        http.post("/api/generate", json=body)
    (prompt, max_tokens), = submitted
    assert max_tokens == (limit if limit is not None else options["num_ctx"] - prompt)


# ---- a Responses stream cut by shutdown ------------------------------------------------------------------------


def test_a_responses_stream_cut_by_shutdown_ends_as_the_responses_api_does(tiny_llm):
    app = create_app(tiny_llm, [MODEL])
    engine = app.state.serving.engine
    events = []

    def shut_down_once_under_way():
        # by the engine's counters, not by the stream's events: the random model's sampled tokens may give no text
        # (no delta event) for a long while, and the test waited for a third event for as long (once in CI)
        deadline = time.time() + 60
        while time.time() < deadline:
            s = engine.snapshot()
            if s.running == 1 and s.generated_tokens > generated:
                break
            time.sleep(0.01)
        engine.abort_all(ServerShuttingDown("the server is shutting down"))

    generated = engine.snapshot().generated_tokens
    with TestClient(app) as http, http.stream("POST", "/v1/responses", json={
            "model": MODEL, "input": "talk", "max_output_tokens": 100000, "stream": True}) as r:
        threading.Thread(target=shut_down_once_under_way, daemon=True).start()
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            elif line.startswith("data: ") and events[-1] in ("error", "response.failed"):
                events.append(json.loads(line.removeprefix("data: ")))
    assert "response.created" in events
    error, failed = events[-4:-2], events[-2:]
    assert error[0] == "error" and error[1]["code"] == "server_shutting_down"
    assert failed[0] == "response.failed" and failed[1]["response"]["status"] == "failed"
    assert failed[1]["response"]["error"]["code"] == "server_shutting_down"
    assert not any(isinstance(e, dict) and "error" in e and "type" not in e for e in events)  # no chat-style error


# ---- the KV gauge ----------------------------------------------------------------------------------------------


def test_kv_gauge_is_zero_when_idle_after_cancellations(tiny_llm):
    """ossie_kv_cache_running_bytes stayed non-zero on an idle server after cancelled requests: the gauge was
    measured only after steps that ran a batch."""
    from ossie.engine import Engine, SamplingParams

    engine = Engine(tiny_llm.runner, max_running=4).start()
    try:
        started = threading.Event()
        handles = [engine.submit(list(range(1, 100)), SamplingParams(max_tokens=10**5, stop_token_ids=[]), None,
                                 lambda e: started.set()) for _ in range(3)]
        assert started.wait(30)
        assert engine.snapshot().kv_running_bytes > 0
        for h in handles:
            h.cancel()
        deadline = time.time() + 30
        while engine.snapshot().running and time.time() < deadline:
            time.sleep(0.01)
        s = engine.snapshot()
        assert (s.running, s.cancelled, s.kv_running_bytes) == (0, 3, 0), s
    finally:
        engine.shutdown()
