"""`ossie serve` under load, faults and hostile input: clients that leave, prompts that are costly to tokenize,
a full queue, time limits, shutdown with requests in flight, strict request validation, authentication."""

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.helpers.server import GOOD, MODEL, WEATHER, Server, client, user

# min_tokens: the random model's sampled text never ends by itself before the limit a test is about (it did, once)
LONG = {"model": MODEL, "messages": user("Talk for a long time"), "max_tokens": 5000, "min_tokens": 5000,
        "temperature": 1.0}


def wait_for(s: Server, condition, timeout=30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = s.health()
        if condition(h):
            return h
        time.sleep(0.05)
    return s.health()


@pytest.fixture(scope="module")
def guarded(tiny_repo):
    """A server with a key, a prompt limit, a small body limit and CORS for one origin."""
    s = Server(tiny_repo, "--api-key", "sekret", "--max-prompt-tokens", "300", "--max-body-mb", "1",
               "--allowed-origins", "http://app.example")
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def busy(tiny_repo):
    """A server with one slot, a queue of one, a default max_tokens and a request time limit."""
    s = Server(tiny_repo, "--max-running", "1", "--max-queued", "1", "--default-max-tokens", "5",
               "--request-timeout", "4")
    yield s
    s.stop()


KEY = {"authorization": "Bearer sekret"}


def raw_request(url: str, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a request on a plain socket (which the test then closes: a client that leaves)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    sock = socket.create_connection((host, int(port)))
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


@pytest.mark.parametrize("keyed", [False, True])
def test_non_streaming_client_that_leaves_is_cancelled(server, guarded, keyed):
    """A non-streaming request whose client disconnects stops within a step or two, with and without an API key
    (the key check once hid disconnects from the endpoint)."""
    s = guarded if keyed else server
    before = s.health()
    sock = raw_request(s.url, "/v1/chat/completions", {**LONG, "messages": user("short")}, KEY if keyed else None)
    h = wait_for(s, lambda h: h["running"] == 1)
    assert h["running"] == 1
    sock.close()
    h = wait_for(s, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0, timeout=10)
    assert h["cancelled"] == before["cancelled"] + 1 and h["running"] == 0, h
    assert h["generated_tokens"] - before["generated_tokens"] < 5000


def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    """A 100,000-character prompt without spaces takes openai-harmony seconds to tokenize (and holds the GIL): it
    is tokenized in a worker process, so /health keeps answering at once. (400,000 took the whole 20 s limit.)"""
    result = {}

    def post():
        body = {**GOOD, "messages": user("x" * 100_000), "max_tokens": 1}
        result["r"] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

    t = threading.Thread(target=post)
    t.start()
    slowest = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.05)
    t.join()
    assert result["r"].status_code in (200, 400), result["r"].text
    assert slowest < 1.0, slowest


def test_tokenizer_panic_is_a_400(guarded):
    """From about a million characters without spaces openai-harmony's encoder panics: a 400, not a 500."""
    r = httpx.post(guarded.url + "/v1/completions", headers=KEY, timeout=60,
                   json={"model": MODEL, "prompt": "y" * 1_000_000, "max_tokens": 1})
    assert r.status_code in (400, 413), r.text  # the 1 MiB body limit may answer first
    r = httpx.post(guarded.url + "/v1/completions", headers=KEY, timeout=60,
                   json={"model": MODEL, "prompt": "a b " + "y" * 1_040_000, "max_tokens": 1})
    assert r.status_code in (400, 413) and "error" in r.json()


def test_prompt_and_body_limits(guarded):
    r = httpx.post(guarded.url + "/v1/chat/completions", headers=KEY, json={**GOOD, "messages": user("word " * 400)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "300" in r.json()["error"]["message"]
    r = httpx.post(guarded.url + "/v1/chat/completions", headers=KEY,
                   json={**GOOD, "messages": user("z" * (2 << 20))})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(guarded.url + "/v1/chat/completions", headers=KEY, json=GOOD).status_code == 200


def test_auth_covers_everything_but_health(guarded):
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
        r = httpx.get(guarded.url + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(guarded.url + path, headers={"authorization": "bearer sekret"}).status_code == 200, path
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.get(guarded.url + "/v1/models", headers={"authorization": "Bearer sekret2"}).status_code == 401


def test_cors_for_allowed_origins(guarded):
    preflight = httpx.options(guarded.url + "/v1/chat/completions", headers={
        "origin": "http://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(guarded.url + "/v1/models", headers={**KEY, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_full_queue_is_a_429_with_retry_after(busy):
    """One running, one waiting: the third request is refused at once, and the waiting stream shows nothing but
    keep-alive comments until it runs."""
    first = threading.Thread(target=lambda: httpx.post(busy.url + "/v1/chat/completions", json=LONG, timeout=60))
    first.start()
    assert wait_for(busy, lambda h: h["running"] == 1)["running"] == 1
    lines, started = [], threading.Event()

    def second():
        with httpx.stream("POST", busy.url + "/v1/chat/completions", json={**LONG, "stream": True},
                          timeout=60) as r:
            started.set()
            for line in r.iter_lines():
                lines.append((time.time(), line))

    t = threading.Thread(target=second)
    t.start()
    assert wait_for(busy, lambda h: h["waiting"] == 1)["waiting"] == 1
    r = httpx.post(busy.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    first.join(timeout=60)
    first_done = time.time()
    t.join(timeout=60)
    data = [(at, line) for at, line in lines if line.startswith("data:")]
    assert data and data[0][0] >= first_done - 0.5  # no chunk while it waited
    assert data[-1][1] == "data: [DONE]"


def test_time_limit_and_default_max_tokens(busy):
    wait_for(busy, lambda h: h["running"] == 0 and h["waiting"] == 0, timeout=60)
    r = httpx.post(busy.url + "/v1/chat/completions", json={**GOOD, "max_tokens": None}, timeout=30).json()
    assert r["usage"]["completion_tokens"] == 5  # --default-max-tokens
    t0 = time.time()
    r = httpx.post(busy.url + "/v1/chat/completions", json=LONG, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "length"  # --request-timeout 4 ends it as max_tokens would
    assert r["usage"]["completion_tokens"] < 5000 and time.time() - t0 < 30


def test_shutdown_drains_then_ends_what_is_left(tiny_repo):
    """SIGTERM: requests in flight get --shutdown-timeout to finish; then a stream ends with an error event and a
    non-streaming request gets a 503, and the server exits."""
    s = Server(tiny_repo, "--shutdown-timeout", "1")
    results = {}

    def stream():
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
            results["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

    def plain():
        results["plain"] = httpx.post(s.url + "/v1/chat/completions", json=LONG, timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    wait_for(s, lambda h: h["running"] == 2)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert s.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    last = json.loads(results["stream"][-1].removeprefix("data: "))
    assert last["error"]["code"] == "server_shutting_down"
    assert results["plain"].status_code == 503
    assert results["plain"].json()["error"]["code"] == "server_shutting_down"
    log = s.log()
    assert "requests in flight have 1 s to finish" in log and "Traceback" not in log


def test_access_log_and_served_name(tiny_repo):
    s = Server(tiny_repo)  # --served-model-name tiny, given by the helper
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json=GOOD, timeout=30)
        rid = r.headers["x-request-id"]
    finally:
        log = s.stop()
    lines = [line for line in log.splitlines() if rid in line]
    access = [line for line in lines if "POST /v1/chat/completions 200" in line]
    assert len(access) == 1 and "tokens" in access[0]
    assert "hi" not in access[0]  # never the prompt
    # what was logged while the request was served names it (here: the random model's output had no header)
    assert any(line.startswith(f"{rid}: model output") for line in lines)
    assert log.index("serving the OpenAI API") > log.index("memory:")


# a parameters schema nested 900 levels, as JSON text (json.dumps would exceed Python's recursion limit)
DEEP = '{"type": "object", "properties": {"a": ' * 900 + '{"type": "object"}' + "}}" * 900

BAD_CHAT = [
    ("seed too large", {**GOOD, "seed": 2**64}),
    ("seed too small", {**GOOD, "seed": -(2**63) - 1}),
    ("tool_calls not a list", {**GOOD, "messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}),
    ("lone surrogate", {**GOOD, "messages": user("\ud800")}),
    ("function not an object", {**GOOD, "tools": [{"type": "function", "function": "x"}]}),
    ("tool null", {**GOOD, "tools": [None]}),
    ("schema nested 900 levels", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "deep", "parameters": "DEEP"}}]}),
    ("named tool_choice without an object", {**GOOD, "tools": [WEATHER],
                                             "tool_choice": {"type": "function", "function": "x"}}),
    ("json_schema not an object", {**GOOD, "response_format": {"type": "json_schema", "json_schema": "x"}}),
    ("max_tokens as a string", {**GOOD, "max_tokens": "16"}),
    ("stream as a string", {**GOOD, "stream": "yes"}),
    ("true as a number", {**GOOD, "max_tokens": True}),
    ("schema type not a string", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}]}),
    ("tool name with spaces", {**GOOD, "tools": [{"type": "function", "function": {"name": "get weather"}}]}),
    ("tool name with a special token", {**GOOD, "tools": [{"type": "function", "function": {"name": "f<|call|>"}}]}),
    ("tool name of 100,000 characters", {**GOOD, "tools": [{"type": "function", "function": {"name": "n" * 100_000}}]}),
    ("too many stop strings", {**GOOD, "stop": [str(i) for i in range(17)]}),
    ("a stop string too long", {**GOOD, "stop": "s" * 60_000}),
    ("min_tokens over max_tokens", {**GOOD, "min_tokens": 3}),
    ("min_tokens negative", {**GOOD, "min_tokens": -1}),
    ("min_tokens with a demanded call", {**GOOD, "min_tokens": 1, "tools": [WEATHER], "tool_choice": "required"}),
]


@pytest.mark.parametrize("name,body", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_input_is_a_400(server, name, body, stream):
    content = json.dumps({**body, "stream": body.get("stream", stream)}).replace('"DEEP"', DEEP)
    r = httpx.post(server.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] and "Traceback" not in r.text


BAD_RESPONSES = [
    ("reasoning content not a list", {"input": [{"type": "reasoning", "content": 5},
                                                {"role": "user", "content": "hi"}]}),
    ("lone surrogate in input", {"input": "\ud800"}),
    ("lone surrogate in instructions", {"input": "hi", "instructions": "\udfff"}),
    ("text.format xml", {"input": "hi", "text": {"format": {"type": "xml"}}}),
    ("empty input", {"input": []}),
    ("tool name with spaces", {"input": "hi", "tools": [{"type": "function", "name": "a b"}]}),
]


@pytest.mark.parametrize("name,body", BAD_RESPONSES, ids=[b[0] for b in BAD_RESPONSES])
def test_bad_responses_input_is_a_400(server, name, body):
    r = httpx.post(server.url + "/v1/responses", content=json.dumps({"model": MODEL, **body}),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_seed_decides_sampled_tokens(server):
    """temperature 1 with a seed: the same seed gives the same answer, another seed another (ignoring the seed
    would pass every other test)."""
    c = client(server)
    ask = dict(model=MODEL, messages=user("Pick words"), max_tokens=12, temperature=1.0)
    a, b, other = (c.chat.completions.create(**ask, seed=s).choices[0].message for s in (7, 7, 8))
    assert (a.content, a.reasoning_content) == (b.content, b.reasoning_content)
    assert (a.content, a.reasoning_content) != (other.content, other.reasoning_content)


def test_short_requests_flow_while_a_long_prompt_is_read(server):
    """A prompt of ~6,000 tokens is read 512 tokens a step; a short request sent meanwhile is read beside it and
    finishes before the long one's first token (it once waited for the whole long prompt)."""
    done = {}

    def long():
        httpx.post(server.url + "/v1/completions", timeout=300,
                   json={"model": MODEL, "prompt": "word " * 6_000, "max_tokens": 1})
        done["long"] = time.perf_counter()

    t = threading.Thread(target=long)
    t.start()
    assert wait_for(server, lambda h: h["running"] == 1)["running"] == 1
    r = httpx.post(server.url + "/v1/chat/completions", json={**GOOD, "max_tokens": 4}, timeout=300)
    done["short"] = time.perf_counter()
    t.join(timeout=300)
    assert r.status_code == 200 and done["short"] < done["long"]
