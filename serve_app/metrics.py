"""Metrics, two ways (no torch import here):

- `RouterMetrics`: Prometheus text at the router's GET /metrics (prefix ``serve_app_``).
  Request-level series are recorded by the router that served the request; replica-level
  series (queues, compile cache, GPU memory, fallback) come from the replicas' heartbeats in the
  registry, read at scrape time.
- `ClusterMetrics`: the same facts and a few more, emitted with Ray Serve's metrics API from
  every replica and every router, so Ray's metrics export (each node's metrics port, Ray's
  Prometheus and Grafana) sums them right with any number of routers. Ray prefixes them
  ``ray_`` and adds the application, deployment and replica tags (CLUSTER_METRICS lists them;
  cluster/grafana_dashboard.json charts them).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serve_app.generation import GenerationResult
from serve_app.status import ReplicaStatus

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
        self.snapshot: list[ReplicaStatus] = []

    def collect(self) -> Iterator[Metric]:
        yield from _queue_families(self.snapshot)
        yield from _cache_families(self.snapshot)
        yield from _gpu_families(self.snapshot)


def _labels(replica: ReplicaStatus) -> list[str]:
    return [replica.model, replica.replica_id]


def _queue_families(replicas: list[ReplicaStatus]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(f"{PREFIX}_replica_queue_depth", "Rows per replica and state (waiting, running)",
                              labels=["model", "replica", "state"])
    running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Rows being generated, per model", labels=["model"])
    count = GaugeMetricFamily(f"{PREFIX}_replicas", "Live (heartbeating) replicas per model", labels=["model"])
    per_model: dict[str, list[ReplicaStatus]] = {}
    for replica in replicas:
        per_model.setdefault(replica.model, []).append(replica)
        depth.add_metric([*_labels(replica), "waiting"], replica.queue.waiting)
        depth.add_metric([*_labels(replica), "running"], replica.queue.running)
    for model, group in per_model.items():
        running.add_metric([model], sum(r.queue.running for r in group))
        count.add_metric([model], len(group))
    yield from (depth, running, count)


def _cache_families(replicas: list[ReplicaStatus]) -> Iterator[Metric]:
    hits = CounterMetricFamily(f"{PREFIX}_compile_cache_hits", "Compiled-constraint cache hits",
                               labels=["model", "replica"])
    misses = CounterMetricFamily(f"{PREFIX}_compile_cache_misses", "Compiled-constraint cache misses",
                                 labels=["model", "replica"])
    seconds = CounterMetricFamily(f"{PREFIX}_compile_seconds", "Seconds spent compiling constraints",
                                  labels=["model", "replica"])
    for replica in replicas:
        hits.add_metric(_labels(replica), replica.compile_cache.hits)
        misses.add_metric(_labels(replica), replica.compile_cache.misses)
        seconds.add_metric(_labels(replica), replica.compile_cache.compile_seconds)
    yield from (hits, misses, seconds)


def _gpu_families(replicas: list[ReplicaStatus]) -> Iterator[Metric]:
    memory = GaugeMetricFamily(f"{PREFIX}_gpu_memory_bytes", "GPU memory per replica and device (torch.cuda)",
                               labels=["model", "replica", "device", "kind"])
    reported = GaugeMetricFamily(f"{PREFIX}_gpu_memory_reported",
                                 "1 when the replica reports GPU memory; 0 with the reason otherwise",
                                 labels=["model", "replica", "reason"])
    fallback = GaugeMetricFamily(f"{PREFIX}_replica_cpu_fallback", "1 when the replica fell back to CPU",
                                 labels=["model", "replica"])
    for replica in replicas:
        readings = replica.gpu_memory
        reported.add_metric([*_labels(replica), readings.reason or ""], 1 if readings.devices else 0)
        fallback.add_metric(_labels(replica), 1 if replica.fell_back_to_cpu else 0)
        for device in readings.devices:
            for kind, value in (("allocated", device.allocated_bytes), ("reserved", device.reserved_bytes),
                                ("total", device.total_bytes)):
                memory.add_metric([*_labels(replica), str(device.device), kind], value)
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

    def render(self, replicas: list[ReplicaStatus]) -> bytes:
        self.replicas.snapshot = replicas
        for model, rate in self._rates.items():
            self.tokens_per_s.labels(model).set(rate.per_second())
        return bytes(generate_latest(self.registry))


# Emitted through Ray (exported as ray_<name>): name -> (kind, tags, description).
CLUSTER_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    f"{PREFIX}_request_finished_total": ("counter", ("model", "finish_reason"),
                                         "Rows finished by a replica, by finish_reason (stop, length, cancelled)"),
    f"{PREFIX}_prompt_tokens_total": ("counter", ("model",), "Prompt tokens of finished rows"),
    f"{PREFIX}_generation_tokens_total": ("counter", ("model",), "Generated tokens of finished rows"),
    f"{PREFIX}_queue_time_seconds": ("histogram", ("model",), "From a row's submission to its prefill"),
    f"{PREFIX}_replica_time_to_first_token_seconds": ("histogram", ("model",), "From submission to first token"),
    f"{PREFIX}_replica_queue_rows": ("gauge", ("model", "state"), "Rows per replica: waiting or running"),
    f"{PREFIX}_e2e_request_latency_seconds": ("histogram", ("model", "route"),
                                              "At the router: from a request's admission to its last byte"),
}


class ClusterMetrics:
    """Ray Serve metrics of one replica or router (create inside the Serve actor)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._metrics: dict[str, Any] = {}
        for name, (kind, keys, description) in CLUSTER_METRICS.items():
            tags: Any = keys  # Ray's stubs say tuple[str]; any tuple of names works
            if kind == "counter":
                self._metrics[name] = metrics.Counter(name, description=description, tag_keys=tags)
            elif kind == "gauge":
                self._metrics[name] = metrics.Gauge(name, description=description, tag_keys=tags)
            else:
                self._metrics[name] = metrics.Histogram(name, description=description, tag_keys=tags,
                                                        boundaries=list(_LATENCY_BUCKETS))

    def row_finished(self, model: str, result: GenerationResult) -> None:
        with _never_raising("row_finished"):
            self._row_finished(model, result)

    def _row_finished(self, model: str, result: GenerationResult) -> None:
        tags = {"model": model}
        self._metrics[f"{PREFIX}_request_finished_total"].inc(tags={**tags, "finish_reason": result.finish_reason})
        self._metrics[f"{PREFIX}_prompt_tokens_total"].inc(result.usage.prompt_tokens, tags=tags)
        if result.usage.completion_tokens:
            self._metrics[f"{PREFIX}_generation_tokens_total"].inc(result.usage.completion_tokens, tags=tags)
        if "queue_s" in result.timings:
            self._metrics[f"{PREFIX}_queue_time_seconds"].observe(result.timings["queue_s"], tags=tags)
        if result.timings.get("first_token_s"):
            self._metrics[f"{PREFIX}_replica_time_to_first_token_seconds"].observe(
                result.timings["first_token_s"], tags=tags)

    def queue(self, model: str, waiting: int, running: int) -> None:
        with _never_raising("queue"):
            gauge = self._metrics[f"{PREFIX}_replica_queue_rows"]
            gauge.set(waiting, tags={"model": model, "state": "waiting"})
            gauge.set(running, tags={"model": model, "state": "running"})

    def request_done(self, model: str, route: str, seconds: float) -> None:
        with _never_raising("request_done"):
            self._metrics[f"{PREFIX}_e2e_request_latency_seconds"].observe(
                seconds, tags={"model": model, "route": route})


@contextmanager
def _never_raising(what: str) -> Iterator[None]:
    """A metric that cannot be recorded is logged, never a failed request."""
    try:
        yield
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not record the %s metrics", what, exc_info=True)
