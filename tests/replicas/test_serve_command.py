"""`ossie serve MODEL --replicas 1` as a user runs it: it starts a Ray cluster of its own, answers on its port, and
on SIGTERM lets a stream in flight finish before it exits with 0."""

import threading
import time

import httpx

from tests.helpers.server import GOOD, Server, client, user
from tests.replicas.conftest import _ray
from tests.replicas.test_replicas import completion_tokens, finished


def test_serve_with_replicas_drains_on_sigterm(tiny_repo):
    _ray()
    s = Server(tiny_repo, "--replicas", "1", "--threads", "1", "--shutdown-timeout", "60")
    try:
        assert client(s).chat.completions.create(**GOOD).choices[0].finish_reason == "length"
        out: list[str] = []

        def stream():
            with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=120, json={
                    "model": "tiny", "stream": True, "stream_options": {"include_usage": True},
                    "messages": user("a long one"), "max_tokens": 600, "min_tokens": 600}) as r:
                out.extend(line for line in r.iter_lines() if line.startswith("data:"))

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        deadline = time.time() + 60
        while s.health()["running"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        s.proc.terminate()
        t.join(timeout=120)
        assert finished(out) == "length" and completion_tokens(out) == 600
        assert s.proc.wait(timeout=90) == 0
    finally:
        log = s.stop()
    assert "ready in" in log and "through 1 replicas" in log and "stopping: the replicas' requests" in log, log
