"""ossie on Ray Serve, as a user runs it: two engine replicas of the tiny checkpoint behind one address, on a local
Ray cluster bound to 127.0.0.1 (conftest.py). The same API as one `ossie serve`; each conversation stays on the
replica that holds its prefix (its resumed turns' cached_tokens say so: a replica that never saw the
conversation holds at most the harmony header's block); no principal's prefix draws another's requests; a
replica killed mid-load loses no request that had not begun, and is replaced; a scale-down lets the running
requests finish; autoscaling follows the requests in flight."""

import json
import os
import signal
import threading
import time

import httpx

from tests.helpers.server import user
from tests.replicas.conftest import ALICE, BOB, PROBES, SLOTS

FILLER = " ".join(f"rule {i}: answer briefly." for i in range(40))  # about 4 blocks of 64 tokens


def chat(cluster, messages, headers=ALICE, **extra) -> dict:
    r = httpx.post(cluster.url + "/v1/chat/completions", headers=headers, timeout=120,
                   json={"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def cached(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def stream_lines(cluster, body: dict, headers=ALICE, out: list | None = None) -> list[str]:
    """The data lines of a streamed chat completion (appended to `out` as they come, when given)."""
    out = [] if out is None else out
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", headers=headers, timeout=300,
                      json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(line)
    return out


def test_the_api_through_the_ingress(cluster):
    """Chat completions (whole and streamed), completions, the Responses API with a previous_response_id (its
    store is the ingress's: found whichever replica the next turn reaches), Ollama's chat, the models, the chat
    page; the key is checked as one server checks it."""
    assert httpx.post(cluster.url + "/v1/chat/completions", json={"model": "tiny", "messages": user("hi")},
                      timeout=30).status_code == 401
    r = chat(cluster, user("hi"))
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6
    lines = stream_lines(cluster, {"messages": user("hi"), "max_tokens": 6})
    assert lines[-1] == "data: [DONE]" and finished(lines) == "length"
    r = httpx.post(cluster.url + "/v1/completions", headers=ALICE, timeout=60,
                   json={"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "min_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    first = httpx.post(cluster.url + "/v1/responses", headers=ALICE, timeout=60,
                       json={"model": "tiny", "input": "Name a colour. " + FILLER, "max_output_tokens": 5})
    assert first.status_code == 200, first.text
    for _ in range(3):  # whichever replica each turn reaches
        r = httpx.post(cluster.url + "/v1/responses", headers=ALICE, timeout=60, json={
            "model": "tiny", "input": "Another?", "previous_response_id": first.json()["id"], "max_output_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["input_tokens"] > first.json()["usage"]["input_tokens"]
    assert httpx.post(cluster.url + "/v1/responses", headers=BOB, timeout=60, json={
        "model": "tiny", "input": "x", "previous_response_id": first.json()["id"]}).status_code == 404  # alice's
    r = httpx.post(cluster.url + "/api/chat", headers=ALICE, timeout=60, json={
        "model": "tiny", "messages": user("hi"), "stream": False, "options": {"num_predict": 4}})
    assert r.status_code == 200 and r.json()["done"] is True
    assert [m["id"] for m in httpx.get(cluster.url + "/v1/models", headers=ALICE).json()["data"]] == ["tiny"]
    assert "<html" in httpx.get(cluster.url + "/").text.lower()


def test_each_conversation_stays_where_its_prefix_is_cached(cluster):
    """Eight conversations, three turns each, interleaved: every resumed turn finds all the whole blocks of the
    turn before in the cache, and the conversations are spread over both replicas. Routed at random between two
    replicas, each resumed turn would have one chance in two of a replica that never saw the conversation (each
    one's prompt differs from the second block on)."""
    import psutil

    conversations = [[{"role": "system", "content": f"Conversation {i}. {FILLER}"}] for i in range(8)]
    last = [0] * 8
    replicas = [psutil.Process(pid) for pid in cluster.replica_pids()]
    before = [sum(p.cpu_times()[:2]) for p in replicas]
    for turn in range(3):
        for i, messages in enumerate(conversations):
            messages.append({"role": "user", "content": f"Question {turn}?"})
            r = chat(cluster, messages)
            if turn:
                assert cached(r) >= last[i] // 64 * 64 > 64, (i, turn, cached(r), last[i])
            last[i] = r["usage"]["prompt_tokens"]
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"] or "ok"})
    # and the conversations were spread: each replica did a good part of the work (they share the harmony header's
    # first block, which alone must not draw them all to its holder)
    work = [sum(p.cpu_times()[:2]) - b for p, b in zip(replicas, before, strict=True)]
    assert min(work) > 0.2 * sum(work), work


def test_one_principals_prefix_draws_no_one_elses_requests(cluster):
    """The cross-principal probe through the ingress: four other principals send the prompt alice sent; nothing of
    it is cached for any of them (at most the harmony header's first block, which no one's text is in), wherever
    the router sends them, while alice's own repeat, and a prober's, are served from their own caches."""
    messages = [{"role": "system", "content": "Alice's secret plan: " + FILLER}, *user("Go on.")]
    chat(cluster, messages)
    assert cached(chat(cluster, messages)) > 128  # hers: cached
    for probe in PROBES:
        assert cached(chat(cluster, messages, headers=probe)) <= 64
    assert cached(chat(cluster, messages, headers=PROBES[0])) > 128  # a prober's second sending: its own cache


def test_a_cancelled_stream_is_cancelled_on_its_replica(cluster):
    """A client that leaves a stream while it generates (the random model's text may stay inside a header for long:
    the stream is left once the request runs, not after some lines): the ingress counts it cancelled, no token
    comes for it any more, and the replicas go idle (a replica still generating for no one keeps a core busy)."""
    before = httpx.get(cluster.url + "/health", headers=ALICE).json()
    for i in range(2 * SLOTS):
        with httpx.stream("POST", cluster.url + "/v1/chat/completions", headers=ALICE, timeout=60, json={
                "model": "tiny", "stream": True, "messages": user(f"long {i}"), "max_tokens": 4000,
                "min_tokens": 4000}):
            wait_running(cluster, 1)
    deadline = time.time() + 30
    while time.time() < deadline:
        h = httpx.get(cluster.url + "/health", headers=ALICE).json()
        if h["cancelled"] == before["cancelled"] + 2 * SLOTS and h["running"] == 0:
            break
        time.sleep(0.1)
    assert h["cancelled"] == before["cancelled"] + 2 * SLOTS and h["running"] == 0, (before, h)
    assert h["finished"] == before["finished"]
    import psutil

    busy = [psutil.Process(pid).cpu_percent(interval=1.0) for pid in cluster.replica_pids()]
    assert max(busy) < 30, busy
    assert httpx.get(cluster.url + "/health", headers=ALICE).json()["generated_tokens"] == h["generated_tokens"]


def run_streams(cluster, n: int, max_tokens: int) -> tuple[list[threading.Thread], list[list[str]]]:
    outs = [[] for _ in range(n)]
    body = {"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 1.0,
            "stream_options": {"include_usage": True}}
    threads = [threading.Thread(target=stream_lines, args=(cluster, {**body, "messages": user(f"story {i}")}),
                                kwargs={"out": outs[i]}, daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, outs


def wait_running(cluster, n: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if httpx.get(cluster.url + "/health", headers=ALICE).json()["running"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests never ran at once")


def finished(lines: list[str]) -> str | None:
    """How a stream ended: its finish_reason, or "error" for an error event."""
    for line in reversed(lines):
        event = {} if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
        if "error" in event:
            return "error"
        if event.get("choices"):
            return event["choices"][0]["finish_reason"]
    return None


def completion_tokens(lines: list[str]) -> int | None:
    usage = [json.loads(line.removeprefix("data: ")).get("usage") for line in lines if line != "data: [DONE]"]
    return next((u["completion_tokens"] for u in reversed(usage) if u), None)


def test_a_killed_replica_loses_no_request_that_had_not_begun(cluster):
    """Both replicas' slots taken by streams, two more requests waiting in the router's queue; one replica's
    process is killed: its streams end with an error event after the tokens they had, the other replica's finish,
    the waiting requests are answered (none had begun), and Ray starts a new replica in the dead one's place."""
    threads, outs = run_streams(cluster, 2 * SLOTS, 400)
    wait_running(cluster, 2 * SLOTS)
    waiting: list[dict] = []
    waiters = [threading.Thread(target=lambda i=i: waiting.append(chat(cluster, user(f"waiting {i}"))), daemon=True)
               for i in range(2)]
    for t in waiters:
        t.start()
    time.sleep(0.5)
    pids = cluster.replica_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    for t in threads + waiters:
        t.join(timeout=240)
    ends = [finished(o) for o in outs]
    assert ends.count("error") >= 1 and set(ends) <= {"error", "length"}, ends
    for out, end in zip(outs, ends, strict=True):
        if end == "length":
            assert completion_tokens(out) == 400
        else:  # it had begun (a chunk came before the error), and the error says what happened
            error = json.loads(out[-1].removeprefix("data: "))["error"]
            assert len(out) >= 2 and error["code"] == "engine_unavailable" and "replica" in error["message"], out
    assert len(waiting) == 2 and all(w["choices"][0]["finish_reason"] == "length" for w in waiting)
    deadline = time.time() + 120
    while time.time() < deadline and len(cluster.replica_pids()) < 2:
        time.sleep(1)
    assert len(cluster.replica_pids()) == 2 and pids[0] not in cluster.replica_pids()
    assert chat(cluster, user("after"))["choices"][0]["finish_reason"] == "length"


def test_a_scale_down_lets_the_running_requests_finish(cluster):
    """Two replicas with streams running on both, redeployed as one: every stream ends as it would have
    (finish_reason length, all its tokens), then the application serves from the one replica left."""
    threads, outs = run_streams(cluster, 2 * SLOTS, 300)
    wait_running(cluster, 2 * SLOTS)
    cluster.deploy(1)
    for t in threads:
        t.join(timeout=240)
    assert [finished(o) for o in outs] == ["length"] * (2 * SLOTS)
    assert [completion_tokens(o) for o in outs] == [300] * (2 * SLOTS)
    assert len(cluster.replica_pids()) == 1
    assert chat(cluster, user("after"))["choices"][0]["finish_reason"] == "length"
    cluster.deploy(2)


def replicas_become(cluster, n: int, timeout: float) -> float:
    """Seconds until `n` engine replicas run (an AssertionError past timeout)."""
    t0 = time.time()
    while len(cluster.replica_pids()) != n:
        assert time.time() - t0 < timeout, f"{len(cluster.replica_pids())} replicas, not {n}, after {timeout} s"
        time.sleep(0.2)
    return time.time() - t0


def test_autoscaling_follows_the_requests_in_flight(cluster):
    """--replicas auto (1 to 2, a target of 1 request in flight each): one replica while idle, a second once more
    requests are in flight, back to one when they are done; every stream finishes whole meanwhile."""
    from ray import serve

    serve.delete("ossie")
    try:
        cluster.deploy(None, min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
                       downscale_delay_s=2)
        replicas_become(cluster, 1, 60)
        threads, outs = run_streams(cluster, 2 * SLOTS, 600)
        replicas_become(cluster, 2, 60)
        for t in threads:
            t.join(timeout=240)
        assert [completion_tokens(o) for o in outs] == [600] * (2 * SLOTS)
        replicas_become(cluster, 1, 120)  # Ray averages the load over its look-back period (30 s) first
        assert chat(cluster, user("after"))["choices"][0]["finish_reason"] == "length"
    finally:
        serve.delete("ossie")
        cluster.deploy(2)
