"""/metrics as the routers and dashboards read it: Prometheus' exposition written by prometheus_client (parsed here
by its own parser), the gauges routers score replicas on, and the latency histograms fed by each request's end;
and the engine's side of it, the RequestMetrics its observers get."""

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import ossie
from ossie.engine import Cancelled, Engine, EngineStats, ModelRunner, RequestMetrics, Token
from ossie.server import create_app
from ossie.server.metrics import EngineCollector, ServerMetrics
from tests.helpers import greedy, run_engine
from tests.helpers.server import MODEL, Server, metrics, user

GAUGES = {"ossie_requests_waiting", "ossie_requests_running", "ossie_kv_cache_usage_perc",
          "ossie_prefix_cache_hit_rate", "ossie_kv_cache_running_bytes", "ossie_kv_cache_prefix_bytes",
          "ossie_kv_cache_prefix_blocks", "ossie_kv_cache_budget_bytes"}
COUNTERS = {"ossie_requests_finished", "ossie_requests_cancelled", "ossie_requests_failed", "ossie_requests_preempted",
            "ossie_engine_steps",
            "ossie_prompt_tokens", "ossie_prompt_tokens_cached", "ossie_generation_tokens",
            "ossie_spec_decode_num_draft_tokens", "ossie_spec_decode_num_accepted_tokens"}
HISTOGRAMS = {"ossie_time_to_first_token_seconds", "ossie_request_time_per_output_token_seconds",
              "ossie_e2e_request_latency_seconds", "ossie_request_queue_time_seconds", "ossie_request_prompt_tokens",
              "ossie_request_generation_tokens"}


class FakeEngine:
    def __init__(self, **stats):
        self.stats, self.observers = EngineStats(**stats), []

    def snapshot(self) -> EngineStats:
        return self.stats


def families(m: ServerMetrics) -> dict:
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_every_family_has_its_type():
    found = families(ServerMetrics(FakeEngine()))
    assert {n for n, f in found.items() if f.type == "gauge"} == GAUGES
    assert {n for n, f in found.items() if f.type == "counter"} == COUNTERS
    assert {n for n, f in found.items() if f.type == "histogram"} == HISTOGRAMS


@pytest.mark.parametrize(("running", "budget", "usage"), [(0, 100, 0.0), (25, 100, 0.25), (250, 100, 1.0),
                                                          (25, 0, 0.0)])
def test_kv_usage_is_the_running_caches_share_of_the_budget(running, budget, usage):
    """0-1 as vLLM's kv_cache_usage_perc: cached prefixes do not count (they give way), a lone request over the
    budget reads as full, no budget as empty."""
    engine = FakeEngine(kv_running_bytes=running, kv_budget_bytes=budget, kv_cached_bytes=1000)
    (family,) = [f for f in EngineCollector(engine).collect() if f.name == "ossie_kv_cache_usage_perc"]
    assert family.samples[0].value == usage


def test_the_gauges_are_the_engines_at_each_scrape():
    engine = FakeEngine(waiting=3, running=2, prompt_tokens=200, cached_prompt_tokens=50, finished=7)
    m = ServerMetrics(engine)
    values = {s.name: s.value for f in families(m).values() for s in f.samples}
    assert (values["ossie_requests_waiting"], values["ossie_requests_running"]) == (3, 2)
    assert values["ossie_prefix_cache_hit_rate"] == 0.25 and values["ossie_requests_finished_total"] == 7
    engine.stats.waiting = 0
    assert {s.name: s.value for s in families(m)["ossie_requests_waiting"].samples}["ossie_requests_waiting"] == 0


def test_histograms_take_each_request_as_it_ends():
    engine = FakeEngine()
    m = ServerMetrics(engine)
    (observe,) = engine.observers
    observe(RequestMetrics(queued_s=0.5, first_token_s=1.0, e2e_s=3.0, prompt_tokens=100, cached_tokens=64,
                           generated_tokens=5, outcome="stop"))
    observe(RequestMetrics(queued_s=2.0, first_token_s=None, e2e_s=2.0, prompt_tokens=10, cached_tokens=0,
                           generated_tokens=0, outcome="cancelled"))  # left before its first token
    samples = {s.name: s.value for f in families(m).values() for s in f.samples if "le" not in s.labels}
    e2e, ttft = "ossie_e2e_request_latency_seconds", "ossie_time_to_first_token_seconds"
    assert (samples[e2e + "_count"], samples[e2e + "_sum"]) == (2, 5)
    assert (samples[ttft + "_count"], samples[ttft + "_sum"]) == (1, 1)
    assert samples["ossie_request_time_per_output_token_seconds_sum"] == 0.5  # (3 - 1) s over the 4 tokens after
    assert samples["ossie_request_queue_time_seconds_sum"] == 2.5
    assert samples["ossie_request_prompt_tokens_sum"] == 110 and samples["ossie_request_generation_tokens_sum"] == 5


def wait_until(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    assert condition()


def test_the_engine_tells_its_observers_how_each_request_went(tiny_llm):
    engine = Engine(ModelRunner(tiny_llm.model), max_running=1).start()
    seen: list[RequestMetrics] = []
    engine.observers += [lambda m: 1 / 0, seen.append]  # a failing observer does not stop the others, nor the engine
    try:
        prompt = [200, 201, 202, 203]
        run_engine(engine, [prompt, prompt], greedy(6))
        wait_until(lambda: len(seen) == 2)  # observers are told just after the request's own last event
        assert [(m.outcome, m.generated_tokens, m.prompt_tokens) for m in seen] == [("length", 6, 4)] * 2
        first, second = seen
        assert 0 < first.first_token_s < first.e2e_s and first.queued_s < first.first_token_s
        assert second.queued_s >= first.e2e_s * 0.5  # one slot: the second waited for the first
        started, gone = threading.Event(), threading.Event()

        def events(e):
            (started if isinstance(e, Token) else gone if isinstance(e, Cancelled) else threading.Event()).set()

        handle = engine.submit(prompt, greedy(10_000), None, events)
        assert started.wait(30)
        handle.cancel()
        assert gone.wait(10)
        wait_until(lambda: len(seen) == 3)
        assert seen[2].outcome == "cancelled" and seen[2].generated_tokens > 0
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_repo):
    s = Server(tiny_repo, "--max-running", "1")
    yield s
    s.stop()


def test_metrics_through_the_server(server):
    before = metrics(server.url)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": user("count the stars"), "max_tokens": 7, "temperature": 0})
    usage = r.json()["usage"]
    after = metrics(server.url)

    def grew(name):
        return after[name] - before[name]

    assert grew("ossie_time_to_first_token_seconds_count") == 1
    assert grew("ossie_e2e_request_latency_seconds_count") == 1
    assert grew("ossie_request_generation_tokens_sum") == usage["completion_tokens"]
    assert grew("ossie_request_prompt_tokens_sum") == usage["prompt_tokens"]
    assert grew("ossie_generation_tokens_total") == usage["completion_tokens"]
    assert grew("ossie_engine_steps_total") >= usage["completion_tokens"]  # one token a step without guesses
    assert after["ossie_requests_running"] == 0 and after["ossie_kv_cache_usage_perc"] == 0
    assert after["ossie_kv_cache_budget_bytes"] > 0
    ttft = "ossie_time_to_first_token_seconds"
    assert after[ttft + '_bucket{le="+Inf"}'] == after[ttft + "_count"]


def test_the_gauges_while_a_request_runs(server):
    stop = threading.Event()

    def long_stream():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "stream": True, "messages": user("a long one"), "max_tokens": 2000,
                "min_tokens": 2000}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    t = threading.Thread(target=long_stream, daemon=True)
    t.start()
    try:
        deadline, m = time.time() + 30, {}
        while time.time() < deadline:
            m = metrics(server.url)
            if m["ossie_requests_running"] == 1 and m["ossie_kv_cache_usage_perc"] > 0:
                break
            time.sleep(0.05)
        assert m["ossie_requests_running"] == 1 and 0 < m["ossie_kv_cache_usage_perc"] <= 1, m
        assert m["ossie_kv_cache_running_bytes"] > 0
    finally:
        stop.set()
        t.join(30)


def test_a_second_app_on_one_engine_does_not_count_twice(tiny_repo):
    """Each server has its own registry; a server that stops takes its observer with it."""
    llm = ossie.LLM(tiny_repo, dtype="float32", progress=False)
    with TestClient(create_app(llm)) as c1:
        assert len(llm.engine.observers) == 1
        assert c1.get("/metrics").status_code == 200
    assert llm.engine.observers == []
    with TestClient(create_app(llm)):
        assert len(llm.engine.observers) == 1
