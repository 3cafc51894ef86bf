"""/metrics: the engine's gauges, counters and per-request latency histograms in Prometheus' exposition format,
written by prometheus_client, in a registry of the server's own (two servers in one process do not mix).

The gauges that routers score replicas on are the ones vLLM exposes, under ossie's prefix: requests waiting and
running, KV cache utilisation (0-1: what the running requests' caches hold of --kv-cache-gb; cached prefixes are
not counted, they are given up when room is needed) and the prefix cache's hit rate. README "Metrics" maps them to
the names llm-d's endpoint picker and vLLM's dashboards read. Everything here is an aggregate over all principals,
as /health's counters are, and like them needs the key where keys are required.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine import EngineClient, RequestMetrics

# buckets as vLLM's (seconds, tokens), so that dashboards made for it read ossie's the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 131072)


class EngineCollector:
    """The engine's snapshot as metric families, read at each scrape (prometheus_client's custom collector)."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.snapshot()
        gauges = {
            "ossie_requests_waiting": ("requests waiting for a slot (or for KV memory)", s.waiting),
            "ossie_requests_running": ("requests generating (or reading their prompt)", s.running),
            "ossie_kv_cache_usage_perc": ("share of the KV budget the running requests' caches hold (0-1)",
                                          min(1.0, s.kv_running_bytes / s.kv_budget_bytes) if s.kv_budget_bytes
                                          else 0.0),
            "ossie_prefix_cache_hit_rate": ("share of all prompt tokens served from the prefix cache",
                                            s.cached_prompt_tokens / s.prompt_tokens if s.prompt_tokens else 0.0),
            "ossie_kv_cache_running_bytes": ("bytes of KV cache the running requests hold", s.kv_running_bytes),
            "ossie_kv_cache_prefix_bytes": ("bytes of KV cache kept for prefixes", s.kv_cached_bytes),
            "ossie_kv_cache_prefix_blocks": ("blocks of KV cache kept for prefixes", s.kv_cached_blocks),
            "ossie_kv_cache_budget_bytes": ("the KV budget (--kv-cache-gb; 0: none)", s.kv_budget_bytes),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "ossie_requests_finished": ("requests that ended with their answer (stop or length)", s.finished),
            "ossie_requests_cancelled": ("requests cancelled (a client gone, a stop)", s.cancelled),
            "ossie_requests_failed": ("requests that failed", s.failed),
            "ossie_requests_preempted": ("times a running request gave its KV memory back", s.preempted),
            "ossie_engine_steps": ("forward passes the engine ran", s.steps),
            "ossie_prompt_tokens": ("prompt tokens submitted", s.prompt_tokens),
            "ossie_prompt_tokens_cached": ("prompt tokens served from the prefix cache", s.cached_prompt_tokens),
            "ossie_generation_tokens": ("tokens generated", s.generated_tokens),
            "ossie_spec_decode_num_draft_tokens": ("tokens guessed by speculative decoding", s.drafted_tokens),
            "ossie_spec_decode_num_accepted_tokens": ("guessed tokens kept", s.accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry /metrics writes out: the engine's collector, and histograms fed by each request's end."""

    def __init__(self, engine: EngineClient):
        disable_created_metrics()  # no *_created series beside each histogram (vLLM's choice too): noise to a router
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine))

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.ttft = histogram("ossie_time_to_first_token_seconds", "from submission to the first token", TTFT_BUCKETS)
        self.tpot = histogram("ossie_request_time_per_output_token_seconds",
                              "a request's mean time between its tokens after the first", TPOT_BUCKETS)
        self.e2e = histogram("ossie_e2e_request_latency_seconds", "from submission to the end", E2E_BUCKETS)
        self.queued = histogram("ossie_request_queue_time_seconds", "from submission to running", E2E_BUCKETS)
        self.prompt = histogram("ossie_request_prompt_tokens", "prompt tokens of a request", TOKEN_BUCKETS)
        self.generated = histogram("ossie_request_generation_tokens", "tokens a request generated", TOKEN_BUCKETS)
        engine.observers.append(self.observe)

    def observe(self, m: RequestMetrics) -> None:  # the engine thread, as each request ends
        self.e2e.observe(m.e2e_s)
        self.queued.observe(m.queued_s)
        self.prompt.observe(m.prompt_tokens)
        self.generated.observe(m.generated_tokens)
        if m.first_token_s is not None:
            self.ttft.observe(m.first_token_s)
            if m.generated_tokens > 1:
                self.tpot.observe((m.e2e_s - m.first_token_s) / (m.generated_tokens - 1))

    def exposition(self) -> tuple[bytes, str]:
        """The text /metrics answers, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
