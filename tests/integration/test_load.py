"""Queue depth, autoscaling, backpressure, cancellation and metrics on a real local Ray."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration.conftest import fresh_replicas

LONG = {"type": "regex", "pattern": "[a-z]{1000}"}


def _replicas(client, prefix, model):
    return [r for r in client.get(f"{prefix}/v1/replicas").json()["replicas"] if r["model"] == model]


def test_a_full_queue_answers_429_with_retry_after(client):
    body = {"model": "tiny-small", "prompt": "x", "max_tokens": 32, "constraint": LONG}

    def send(_):
        return client.post("/v1/generate", json=body)

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(send, range(10)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    error = rejected.json()["error"]
    assert error["type"] == "queue_full" and "limit 2" in error["message"]


def _rows(client, after=None):
    """(cancelled, finished with stop or length, running) rows over the tiny replicas, as they
    reported after `after` (default: now)."""
    found = fresh_replicas(client, "tiny", after)
    finished = [r["finished"] for r in found]
    return (sum(f.get("cancelled", 0) for f in finished),
            sum(f.get("stop", 0) + f.get("length", 0) for f in finished),
            sum(r["queue"]["running"] for r in found))


def _pending(client, model):
    values = _metric(client.get("/metrics").text, "serve_app_pending_requests", model=model)
    return values[0] if values else 0.0


def _wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {what} after {timeout_s} s")


def test_a_client_that_disconnects_cancels_its_non_streaming_request(serve_cluster, client):
    """Waits on events (the router has admitted the request; the replicas report after the
    disconnect), never on a short client timeout racing the generation."""
    from urllib.parse import urlsplit

    body = {"model": "tiny", "prompt": "x", "max_tokens": 128, "constraint": LONG}
    done = client.post("/v1/generate", json=body).json()  # the same request, run to its end
    assert done["finish_reason"] == "length"
    cancelled_before, finished_before, _ = _rows(client)
    payload = json.dumps(body).encode()
    parts = urlsplit(serve_cluster)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
                     f"Authorization: {client.headers['authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode() + payload)
        _wait_for(lambda: _pending(client, "tiny") >= 1, 60, "admitted")
    disconnected = time.time()
    _wait_for(lambda: _pending(client, "tiny") == 0, 60, "released by the router")
    # Reports made well after the disconnect: a row that kept running would have finished its
    # 128 tokens by then (3 x the time the same request took to run to its end).
    cancelled, finished, running = _rows(client, after=disconnected + 3 * done["timings"]["total_s"] + 1)
    assert running == 0
    assert finished == finished_before  # it never ran to its end
    assert cancelled - cancelled_before <= 1  # cancelled mid-generation, or never started


def _metric(text, name, **labels):
    values = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def test_metrics_endpoint_exposes_every_family_with_sane_values(client):
    for i in range(3):
        client.post("/v1/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 8,
                                          "constraint": {"type": "regex", "pattern": f"m{i}[0-9]{{4}}"}})
    story = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    closed = client.post("/v1/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 12, "temperature": 0,
                                               "constraint": {"type": "json_schema", "schema": story}}).json()
    assert closed["closed_early"] is True, closed
    client.post("/v1/generate", json={"model": "nope", "prompt": "x"})
    deadline = time.monotonic() + 60  # both tiny replicas heartbeating (one may have been restarted)
    while time.monotonic() < deadline and len(_replicas(client, "", "tiny")) != 2:
        time.sleep(1)
    fresh_replicas(client, "tiny")  # reports made after the traffic above
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _metric(text, "serve_app_requests_total", model="tiny", route="/v1/generate", code="200")[0] >= 3
    assert _metric(text, "serve_app_requests_total", model="unknown", code="404")[0] >= 1
    assert _metric(text, "serve_app_pending_requests", model="tiny") == [0.0]
    assert len(_metric(text, "serve_app_replica_queue_depth", model="tiny")) == 4  # 2 replicas x 2 states
    assert _metric(text, "serve_app_running_requests", model="tiny") == [0.0]
    assert _metric(text, "serve_app_time_to_first_token_seconds_count", model="tiny")[0] >= 3
    assert _metric(text, "serve_app_time_per_output_token_seconds_count", model="tiny")[0] >= 3
    assert _metric(text, "serve_app_output_tokens_total", model="tiny")[0] >= 15
    assert _metric(text, "serve_app_output_tokens_per_second", model="tiny")[0] > 0
    assert _metric(text, "serve_app_constrained_outputs_total", model="tiny", outcome="closed_early")[0] >= 1
    assert sum(_metric(text, "serve_app_constrained_outputs_total", model="tiny")) >= 4
    assert sum(_metric(text, "serve_app_compile_cache_misses_total", model="tiny")) >= 3
    assert sum(_metric(text, "serve_app_compile_cache_hits_total", model="tiny")) >= 0
    assert sum(_metric(text, "serve_app_compile_seconds_total", model="tiny")) > 0
    assert _metric(text, "serve_app_replicas", model="tiny") == [2.0]
    # No CUDA here: GPU memory is absent, with the reason stated, and not faked as zero.
    assert _metric(text, "serve_app_gpu_memory_reported", model="tiny", reason="no CUDA device in this process") \
        == [0.0, 0.0]
    assert _metric(text, "serve_app_gpu_memory_bytes") == []
    assert _metric(text, "serve_app_replica_cpu_fallback", model="tiny") == [0.0, 0.0]
    assert re.search(r"^# TYPE serve_app_time_to_first_token_seconds histogram$", text, re.M)


SCALE_APP = {"models": [{
    "name": "elastic", "source": "builtin:tiny-random-llama",
    "placement": {"num_cpus": 0.25},
    "limits": {"max_new_tokens": 128, "max_batch_size": 2},
    "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_queue_depth": 2, "upscale_delay_s": 1,
                    "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 0.5},
}]}


def test_replicas_scale_up_on_queue_depth_and_back_down_after(serve_cluster, client):
    from ray import serve

    from serve_app.app import build_app
    from tests.integration.conftest import wait_ready

    serve.run(build_app(SCALE_APP), name="scale", route_prefix="/scale")
    wait_ready(f"{serve_cluster}/scale/readyz")
    stop, codes = threading.Event(), []
    body = {"model": "elastic", "prompt": "x", "max_tokens": 96, "constraint": LONG}

    def load():
        deadline = time.monotonic() + 150  # bounded in time and count
        for _ in range(200):
            if stop.is_set() or time.monotonic() > deadline:
                return
            codes.append(client.post("/scale/v1/generate", json=body).status_code)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    peak, deadline = 1, time.monotonic() + 150
    try:
        while time.monotonic() < deadline and peak < 2:
            time.sleep(2)
            peak = max(peak, len(_replicas(client, "/scale", "elastic")))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"peak replicas under load: {peak}; requests: {len(codes)}")
    assert peak >= 2
    assert set(codes) == {200}
    deadline, count = time.monotonic() + 120, peak
    while time.monotonic() < deadline and count > 1:
        time.sleep(2)
        count = len(_replicas(client, "/scale", "elastic"))
    assert count == 1
    serve.delete("scale")
