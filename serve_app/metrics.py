"""Prometheus metrics, served by the router at GET /metrics (prefix ``serve_app_``).

Request-level series are recorded by the router as requests finish; replica-level series
(queues, compile cache, GPU memory, fallback) come from the replicas' heartbeats in the
registry, read at scrape time. No torch import here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serve_app.engine.types import GenerationResult

PREFIX = "serve_app"
TOKEN_RATE_WINDOW_S = 60.0
UNKNOWN_ROUTE = "unknown"  # the one route label of every path no route matched (401s before routing too)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class TokenRate:
    """Output tokens per second over the last `TOKEN_RATE_WINDOW_S`."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque(maxlen=10_000)

    def add(self, tokens: int) -> None:
        self._events.append((time.monotonic(), tokens))

    def per_second(self) -> float:
        now = time.monotonic()
        while self._events and now - self._events[0][0] > TOKEN_RATE_WINDOW_S:
            self._events.popleft()
        return sum(t for _, t in self._events) / TOKEN_RATE_WINDOW_S


class ReplicaCollector(Collector):
    """Series derived from the latest replica heartbeats (set `snapshot` before scraping)."""

    def __init__(self) -> None:
        self.snapshot: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        yield from _queue_families(self.snapshot)
        yield from _cache_families(self.snapshot)
        yield from _gpu_families(self.snapshot)


def _labels(replica: dict[str, Any]) -> list[str]:
    return [replica["model"], replica["replica_id"]]


def _queue_families(replicas: list[dict[str, Any]]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(f"{PREFIX}_replica_queue_depth", "Rows per replica and state (waiting, running)",
                              labels=["model", "replica", "state"])
    running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Rows being generated, per model", labels=["model"])
    count = GaugeMetricFamily(f"{PREFIX}_replicas", "Live (heartbeating) replicas per model", labels=["model"])
    per_model: dict[str, list[dict[str, Any]]] = {}
    for replica in replicas:
        per_model.setdefault(replica["model"], []).append(replica)
        for state in ("waiting", "running"):
            depth.add_metric([*_labels(replica), state], replica.get("queue", {}).get(state, 0))
    for model, group in per_model.items():
        running.add_metric([model], sum(r.get("queue", {}).get("running", 0) for r in group))
        count.add_metric([model], len(group))
    yield from (depth, running, count)


def _cache_families(replicas: list[dict[str, Any]]) -> Iterator[Metric]:
    hits = CounterMetricFamily(f"{PREFIX}_compile_cache_hits", "Compiled-constraint cache hits",
                               labels=["model", "replica"])
    misses = CounterMetricFamily(f"{PREFIX}_compile_cache_misses", "Compiled-constraint cache misses",
                                 labels=["model", "replica"])
    seconds = CounterMetricFamily(f"{PREFIX}_compile_seconds", "Seconds spent compiling constraints",
                                  labels=["model", "replica"])
    for replica in replicas:
        stats = replica.get("compile_cache", {})
        hits.add_metric(_labels(replica), stats.get("hits", 0))
        misses.add_metric(_labels(replica), stats.get("misses", 0))
        seconds.add_metric(_labels(replica), stats.get("compile_seconds", 0.0))
    yield from (hits, misses, seconds)


def _gpu_families(replicas: list[dict[str, Any]]) -> Iterator[Metric]:
    memory = GaugeMetricFamily(f"{PREFIX}_gpu_memory_bytes", "GPU memory per replica and device (torch.cuda)",
                               labels=["model", "replica", "device", "kind"])
    reported = GaugeMetricFamily(f"{PREFIX}_gpu_memory_reported",
                                 "1 when the replica reports GPU memory; 0 with the reason otherwise",
                                 labels=["model", "replica", "reason"])
    fallback = GaugeMetricFamily(f"{PREFIX}_replica_cpu_fallback", "1 when the replica fell back to CPU",
                                 labels=["model", "replica"])
    for replica in replicas:
        readings = replica.get("gpu_memory", {})
        reported.add_metric([*_labels(replica), readings.get("reason") or ""], 1 if readings.get("devices") else 0)
        fallback.add_metric(_labels(replica), 1 if replica.get("fell_back_to_cpu") else 0)
        for device in readings.get("devices", []):
            for kind in ("allocated", "reserved", "total"):
                memory.add_metric([*_labels(replica), str(device["device"]), kind], device[f"{kind}_bytes"])
    yield from (memory, reported, fallback)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by model, route and status code",
                                ["model", "route", "code"], registry=self.registry)
        self.pending = Gauge(f"{PREFIX}_pending_requests", "Requests accepted by the router and not finished",
                             ["model"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token (in the replica)",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=_TPOT_BUCKETS, registry=self.registry)
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "Generated tokens", ["model"], registry=self.registry)
        self.tokens_per_s = Gauge(f"{PREFIX}_output_tokens_per_second",
                                  f"Output tokens/s over the last {TOKEN_RATE_WINDOW_S:g} s", ["model"],
                                  registry=self.registry)
        self.outcomes = Counter(f"{PREFIX}_constrained_outputs",
                                "Constrained outputs by outcome: finished, closed_early (closed with the shortest "
                                "valid completion as max_tokens neared) or truncated (cut by max_tokens)",
                                ["model", "outcome"], registry=self.registry)
        self._rates: dict[str, TokenRate] = {}
        self.replicas = ReplicaCollector()
        self.registry.register(self.replicas)

    def observe_result(self, model: str, result: GenerationResult) -> None:
        tokens = result.usage.completion_tokens
        first = result.timings.get("first_token_s", 0.0)
        self.ttft.labels(model).observe(first)
        if tokens > 1:
            self.tpot.labels(model).observe((result.timings.get("total_s", 0.0) - first) / (tokens - 1))
        self.output_tokens.labels(model).inc(tokens)
        self._rates.setdefault(model, TokenRate()).add(tokens)
        if result.valid is not None:
            outcome = "closed_early" if result.closed_early else "truncated" if result.finish_reason == "length" \
                else "finished"
            self.outcomes.labels(model, outcome).inc()

    def render(self, replicas: list[dict[str, Any]]) -> bytes:
        self.replicas.snapshot = replicas
        for model, rate in self._rates.items():
            self.tokens_per_s.labels(model).set(rate.per_second())
        return bytes(generate_latest(self.registry))
