"""No 5xx on any input, a router that never stalls: one test per way a request used to get a 500
or hold the event loop, then a property-based run over the whole class of hostile shapes."""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.hostile import hostile_requests
from tests.integration.conftest import API_KEY

USER = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def raw_post(client: httpx.Client, path: str, text: str, timeout: float = 30) -> httpx.Response:
    """POST JSON text as is (escapes such as \\ud800 and literals such as NaN included)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"}, timeout=timeout)


def assert_4xx(response: httpx.Response, status: int = 400, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def deep_text(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# -- 500s, one by one ----------------------------------------------------------------------------


@pytest.mark.parametrize("route,body", [
    ("/v1/generate", {"model": "tiny-small", "prompt": "x", "max_tokens": 4, "stop": [""]}),
    ("/v1/completions", {"model": "tiny-small", "prompt": "x", "max_tokens": 4, "stop": ""}),
    ("/v1/chat/completions", {"model": "tiny-small", "messages": USER, "max_tokens": 4, "stop": ["a", ""]}),
])
def test_an_empty_stop_string_is_a_400_naming_stop(client, route, body):
    error = assert_4xx(client.post(route, json=body), 400, "stop sequences must not be empty")
    assert error["param"].startswith("stop")


def test_a_seed_at_the_top_of_the_range_with_several_choices_answers_every_choice(client):
    body = {"model": "tiny-small", "prompt": "x", "max_tokens": 4, "n": 3, "seed": 2**63 - 1, "temperature": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]


@pytest.mark.parametrize("route,text,where", [
    ("/v1/completions", '{"model": "tiny-small", "prompt": "a\\ud800b", "max_tokens": 4}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny-small", "max_tokens": 4, '
                             '"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
    ("/v1/generate", '{"model": "tiny-small", "prompt": "x", "\\ud83d": 1}', "body"),
    ("/v1/generate", '{"model": "tiny-small", "prompt": "x", "constraint": {"type": "choice", '
                     '"choices": ["\\ud800"]}}', "constraint.choices.0"),
])
def test_a_lone_surrogate_anywhere_is_a_400_in_the_error_shape(client, route, text, where):
    error = assert_4xx(raw_post(client, route, text), 400, "lone UTF-16 surrogate")
    assert error["param"] == where


@pytest.mark.parametrize("name,body,fragment", [
    ("schema nested 300 deep", {"constraint": {"type": "json_schema", "schema": nested_schema(300)}},
     "max_json_depth"),
    ("pattern of 1500 nested groups", {"constraint": {"type": "json_schema", "schema": {
        "type": "string", "pattern": "(" * 1500 + "a" + ")" * 1500}}}, "max_group_depth"),
    ("regex of 1500 nested groups", {"constraint": {"type": "regex", "pattern": "(" * 1500 + "a" + ")" * 1500}},
     "max_group_depth"),
    ("key pattern of 1500 nested groups", {"constraint": {"type": "json_schema", "schema": {
        "type": "object", "patternProperties": {"(" * 1500 + "a" + ")" * 1500: {}}}}}, "max_group_depth"),
    ("grammar nested 1500 deep", {"constraint": {"type": "grammar", "grammar": "start: " + "(" * 1500 + '"a"'
                                                 + ")" * 1500}}, "max_group_depth"),
])
def test_input_nested_past_the_limits_is_a_400_naming_the_limit(client, name, body, fragment):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, **body}
    assert_4xx(client.post("/v1/generate", json=body), 400, fragment)


def test_guided_json_as_a_deeply_nested_string_is_a_400(client):
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, "guided_json": deep_text(5000)}
    error = assert_4xx(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "guided_json" and error["code"] in ("max_json_depth", "invalid_value")


def test_a_body_nested_past_the_recursion_limit_is_a_400(client):
    text = '{"model": "tiny", "prompt": "x", "stop": ' + deep_text(100_000, '"a"') + "}"
    assert_4xx(raw_post(client, "/v1/generate", text), 400)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_in_a_schema_is_a_400(client, literal):
    text = ('{"model": "tiny", "prompt": "x", "max_tokens": 4, "constraint": {"type": "json_schema", '
            '"schema": {"type": "number", "maximum": ' + literal + "}}}")
    assert_4xx(raw_post(client, "/v1/generate", text), 400)


def test_a_ref_under_a_nested_id_resolves_against_that_resource(client):
    # "#/$defs/t" under "$id": "sub.json" means http://example.com/sub.json's own $defs: it has none.
    schema = {"$id": "http://example.com/root.json", "$defs": {"t": {"type": "string"}}, "type": "object",
              "properties": {"a": {"$id": "sub.json", "$ref": "#/$defs/t"}}, "required": ["a"]}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 16, "constraint": {"type": "json_schema", "schema": schema}}
    assert_4xx(client.post("/v1/generate", json=body), 400, "unresolvable $ref '#/$defs/t' at #/properties/a",
               "http://example.com/sub.json")
    schema["properties"]["a"]["$defs"] = {"t": {"enum": ["x"]}}  # now it does: the answer follows it
    answer = client.post("/v1/generate", json=body).json()
    assert (answer["text"], answer["valid"]) == ('{"a":"x"}', True), answer


@pytest.mark.parametrize("imported", ["nosuchmod.X", "os.path", ".relative.X", "/etc/passwd"])
def test_a_grammar_may_import_only_lark_common_and_learns_nothing_about_files(client, imported):
    grammar = f'start: X\n%import {imported}\n'
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "constraint": {"type": "grammar", "grammar": grammar}}
    error = assert_4xx(client.post("/v1/generate", json=body), 400, "is not allowed")
    assert "No such file" not in error["message"] and "Errno" not in error["message"]


def test_a_grammar_importing_lark_common_works(client):
    grammar = 'start: NUMBER\n%import common.NUMBER\n'
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "temperature": 0,
            "constraint": {"type": "grammar", "grammar": grammar}}
    assert client.post("/v1/generate", json=body).status_code == 200


def test_a_long_choice_list_is_refused_by_its_size_before_any_work(client):
    choices = [f"{i:03d}" + "x" * 800 for i in range(250)]  # 200 KB: under the body limit
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "constraint": {"type": "choice", "choices": choices}}
    started = time.perf_counter()
    assert_4xx(client.post("/v1/generate", json=body), 400, "max_choice_bytes")
    assert time.perf_counter() - started < 10


# -- the router never stalls ---------------------------------------------------------------------


class HealthProbe:
    """Polls /healthz from its own thread while a test runs; keeps every latency."""

    def __init__(self, base: str) -> None:
        self.base, self.latencies, self._stop = base, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_an_oversized_grammar_is_refused_by_size_at_once_while_healthz_stays_fast(serve_cluster, client):
    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(20_000))  # ~200 KB, under the body limit
    body = {"model": "guarded", "prompt": "x", "constraint": {"type": "grammar", "grammar": grammar}}
    with HealthProbe(serve_cluster) as probe:
        started = time.perf_counter()
        for _ in range(5):
            assert_4xx(client.post("/v1/generate", json=body), 400, "max_grammar_bytes")
        elapsed = time.perf_counter() - started
    print(f"5 oversized grammars refused in {elapsed:.2f} s; /healthz max {max(probe.latencies) * 1000:.0f} ms "
          f"over {len(probe.latencies)} probes")
    assert elapsed < 10
    assert len(probe.latencies) >= 1


def _send_chunked(base: str, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int, str]:
    """Stream a chunked body of up to `total` bytes; stop as soon as the server answers. Returns
    (bytes sent, the response's first bytes)."""
    parts = urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setblocking(False)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
    pending, sent, answer, deadline = head, 0, b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 1.0)
            if readable:
                answer = sock.recv(65536)
                break
            if writable:
                if not pending:
                    pending = piece
                written = sock.send(pending)
                sent += written
                pending = pending[written:]
    except (BrokenPipeError, ConnectionResetError):
        answer = answer or b"(connection closed by the server)"
    finally:
        sock.close()
    return sent, answer.decode(errors="replace")


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams_in(serve_cluster):
    sent, answer = _send_chunked(serve_cluster, "/v1/generate", total=32 * 1024 * 1024)
    print(f"chunked upload: {sent / 2**20:.1f} MiB sent before the answer {answer.splitlines()[0]!r}")
    assert " 413 " in answer.splitlines()[0], answer[:300]
    assert sent < 16 * 1024 * 1024  # the limit is 256 KiB; the rest is socket buffers


def test_request_metrics_are_labelled_by_route_template_not_by_path(serve_cluster, client):
    with httpx.Client(base_url=serve_cluster, timeout=30) as anonymous:
        for i in range(20):
            anonymous.post(f"/v1/nope-{i}", json={})  # 401: no key
            client.get(f"/v1/random/{i}/path")  # 404
    text = client.get("/metrics").text
    routes = {line.split('route="', 1)[1].split('"', 1)[0]
              for line in text.splitlines() if line.startswith("serve_app_requests_total{")}
    assert not any("nope" in r or "random" in r for r in routes), routes
    assert "unknown" in routes
    # The guard's 401s count too (counting wraps it), under the unknown route.
    unauthorized = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("serve_app_requests_total{") and 'code="401"' in line
                    and 'route="unknown"' in line]
    assert unauthorized and unauthorized[0] >= 20, unauthorized
    assert routes <= {"unknown", "/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/responses",
                      "/v1/models", "/v1/models/{model_id}", "/v1/replicas", "/healthz", "/health", "/readyz",
                      "/metrics"}, routes


def test_a_non_ascii_bearer_token_is_a_401_not_a_500(serve_cluster):
    with httpx.Client(base_url=serve_cluster, timeout=30) as http:
        response = http.post("/v1/generate", json={"model": "tiny", "prompt": "x"},
                             headers={"authorization": "Bearer ключ-€".encode()})
    assert_4xx(response, 401)


def test_a_seed_sampled_request_repeats_exactly(client):
    body = {"model": "tiny-small", "prompt": "x", "max_tokens": 8, "temperature": 1, "seed": 7}
    first, second = (client.post("/v1/generate", json=body).json()["text"] for _ in range(2))
    assert first == second


# -- the whole class: property-based, against the running app -------------------------------------

HOSTILE_EXAMPLES = 300
HOSTILE_LOG: list[tuple[int, float]] = []


def check_answer(response: httpx.Response, elapsed: float) -> None:
    """2xx, or a 4xx in the documented error shape; never a 5xx, not even inside a stream."""
    assert response.status_code < 500, response.text[:500]
    assert elapsed < 2.0, f"answered in {elapsed:.2f} s"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == ERROR_KEYS, response.text[:500]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert "internal_error" not in response.text, response.text[:500]


@settings(max_examples=HOSTILE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(request=hostile_requests())
def _hostile(client: httpx.Client, request: tuple[str, bytes]) -> None:
    route, body = request
    started = time.perf_counter()
    response = client.post(route, content=body, headers={"content-type": "application/json"}, timeout=30)
    elapsed = time.perf_counter() - started
    HOSTILE_LOG.append((response.status_code, elapsed))
    check_answer(response, elapsed)


def test_hostile_requests_of_every_shape_get_a_4xx_or_a_2xx_fast_and_healthz_stays_fast(serve_cluster, client):
    with HealthProbe(serve_cluster) as probe:
        _hostile(client)  # derandomized: the same requests on every CI run (bench/hostile.py varies them)
    codes = [code for code, _ in HOSTILE_LOG]
    slowest = max(elapsed for _, elapsed in HOSTILE_LOG)
    probes = sorted(probe.latencies)
    p95 = probes[int(0.95 * (len(probes) - 1))]
    print(f"hostile: {len(codes)} requests, codes {sorted(set(codes))}, 2xx {sum(c < 300 for c in codes)}, "
          f"slowest answer {slowest:.2f} s; /healthz p50 {probes[len(probes) // 2] * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms, max {probes[-1] * 1000:.1f} ms over {len(probes)} probes")
    assert len(codes) >= HOSTILE_EXAMPLES // 2
    # The router answers at once while it checks hostile input: 95% of probes within 100 ms. The
    # slowest probe is held to a second, not 100 ms: with a second suite on the same 2 cores (as
    # CI's own check runs it) the scheduler alone delays single probes to ~200 ms; the stall this
    # guards against held /healthz for 30 s.
    assert p95 < 0.1, f"/healthz p95 {p95 * 1000:.0f} ms"
    assert probes[-1] < 1.0, f"/healthz took {probes[-1] * 1000:.0f} ms"


def test_serve_replaces_a_replica_whose_decode_loop_is_stuck(serve_cluster):
    """health.stuck_after_s: a replica whose decode loop has work but makes no step fails its
    health check, and Serve starts a new one in its place."""
    from ray import serve

    from serve_app.app import deployment_options
    from serve_app.config import ModelConfig
    from serve_app.replica import ModelReplica

    class FreezableReplica(ModelReplica):
        def freeze(self) -> str:
            """Every forward pass from now on blocks (as a hung kernel or driver would)."""
            import threading

            gate = threading.Event()
            self.engine.loop.fault_injector = lambda batch_size: gate.wait(3600)
            return self.replica_id

    model = ModelConfig(name="stuck", source="builtin:tiny-random-llama", placement={"num_cpus": 0.25},
                        health={"stuck_after_s": 2}, sampling={"temperature": 0})
    options = {**deployment_options(model), "health_check_period_s": 1, "health_check_timeout_s": 10,
               "graceful_shutdown_timeout_s": 2}
    app = serve.deployment(FreezableReplica).options(**options).bind(model.model_dump(mode="json", by_alias=True))
    handle = serve.run(app, name="stuck", route_prefix=None)
    try:
        frozen = handle.freeze.remote().result(timeout_s=120)
        handle.generate.remote([{"prompt": "x", "sampling": {"max_new_tokens": 4}}])  # never finishes there
        deadline = time.monotonic() + 240
        replaced = None
        while time.monotonic() < deadline:
            try:
                status = handle.status.remote().result(timeout_s=120)
            except Exception:  # noqa: BLE001 - a call that reached the replica as Serve stopped it
                continue
            if status.replica_id != frozen:
                replaced = status
                break
            time.sleep(0.5)
        assert replaced is not None, "the stuck replica was not replaced"
        answer = handle.generate.remote([{"prompt": "x", "sampling": {"max_new_tokens": 4}}]).result(timeout_s=120)
        assert answer[0]["finish_reason"] == "length"  # the new replica serves
    finally:
        serve.delete("stuck")


def test_replica_lifecycle_lines_are_in_serves_replica_logs_as_json(serve_cluster, client):
    """server.logging: JSON; our INFO lines (loaded, warm-up, ready) are in Serve's own replica
    log files, each a JSON object carrying the replica's id."""
    import glob
    import json
    import os

    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()  # this session's logs
    files = glob.glob(os.path.join(logs, "serve", "replica_main_model-tiny_*.log"))
    assert files, os.listdir(os.path.join(logs, "serve"))
    lines = [json.loads(line) for path in files for line in Path(path).read_text().splitlines() if line.startswith("{")]
    loaded = [line for line in lines if line["message"].startswith("loaded tiny")]
    ready = [line for line in lines if " of tiny ready in " in line["message"]]
    assert loaded and ready, [line["message"] for line in lines][:20]
    assert all(line["replica"] and line["deployment"] == "main_model-tiny" for line in loaded + ready)


def test_ray_metrics_count_every_request_once_whatever_router_served_it(serve_cluster):
    """Two routers: the series replicas and routers emit through Ray's metrics add up to the
    requests sent, and the Grafana dashboard's Ray-side names are the exported ones."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from serve_app.app import build_app

    config = {"server": {"router_replicas": 2}, "models": [
        {"name": "metered", "source": "builtin:tiny-random-llama", "placement": {"num_cpus": 0.25},
         "sampling": {"temperature": 0}}]}
    serve.run(build_app(config), name="metered", route_prefix="/metered")
    try:
        routers = serve.status().applications["metered"].deployments["router"].replica_states
        assert sum(routers.values()) == 2
        body = {"model": "metered", "prompt": "count me", "max_tokens": 4}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{serve_cluster}/metered/v1/completions", json=body,
                                                       timeout=120).status_code, range(12)))
        assert codes == [200] * 12
        port = ray._private.worker._global_node.metrics_export_port

        def totals() -> dict[str, float]:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            out: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("ray_serve_app_") and sample.labels.get("model") == "metered":
                        out[sample.name] = out.get(sample.name, 0.0) + sample.value
            return out

        wanted = {"ray_serve_app_request_finished_total": 12, "ray_serve_app_e2e_request_latency_seconds_count": 12,
                  "ray_serve_app_generation_tokens_total": 48, "ray_serve_app_queue_time_seconds_count": 12}
        deadline, seen = time.monotonic() + 180, {}
        while time.monotonic() < deadline:  # Ray exports every few seconds
            seen = totals()
            if all(seen.get(name, 0) >= value for name, value in wanted.items()):
                break
            time.sleep(1)
        assert seen["ray_serve_app_request_finished_total"] == 12, seen
        assert seen["ray_serve_app_e2e_request_latency_seconds_count"] == 12, seen
        assert seen["ray_serve_app_generation_tokens_total"] == 48, seen
        assert seen["ray_serve_app_prompt_tokens_total"] >= 12 and seen["ray_serve_app_queue_time_seconds_count"] == 12
        dashboard = json.loads((Path(__file__).resolve().parents[2] / "cluster" / "grafana_dashboard.json").read_text())
        queried = {name for panel in dashboard["panels"] for target in panel["targets"]
                   for name in re.findall(r"\bray_serve_app_[a-z0-9_]+", target["expr"])}
        assert queried <= set(seen), sorted(queried - set(seen))
    finally:
        serve.delete("metered")


# -- the replica registry --------------------------------------------------------------------------


def test_a_registry_call_cancelled_before_it_was_sent_leaves_later_calls_answering(serve_cluster):
    """A /readyz whose client goes away cancels its registry call; if that call was still waiting
    to be sent, an actor that keeps its callers' order waited for it and every later /readyz hung
    (seen: `make serve` never became ready). Here the wait is an argument not yet computed."""
    import ray

    from serve_app.registry import get_registry

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            import asyncio
            self.opened = asyncio.Event()

        async def wait(self) -> dict:
            await self.opened.wait()
            return {"app": "registry-test"}

        async def open(self) -> None:
            self.opened.set()

    registry, gate = get_registry(), Gate.remote()
    ray.get(registry.live.remote("registry-test"))
    cancelled = registry.report.remote("never-sent", gate.wait.remote())
    ray.cancel(cancelled)
    try:
        for _ in range(3):  # unordered: milliseconds; ordered, each waited for the cancelled call
            assert ray.get(registry.live.remote("registry-test"), timeout=20) == []
    finally:
        ray.get(gate.open.remote())


def test_a_heartbeat_that_overtakes_its_replicas_removal_does_not_bring_it_back(serve_cluster):
    import ray

    from serve_app.registry import get_registry

    registry = get_registry()
    ray.get(registry.remove.remote("gone-replica"))
    ray.get(registry.report.remote("gone-replica", {"app": "registry-test"}))
    ray.get(registry.report.remote("other-replica", {"app": "registry-test"}))
    live = ray.get(registry.live.remote("registry-test"))
    assert [entry.get("app") for entry in live] == ["registry-test"]
    ray.get(registry.remove.remote("other-replica"))
    assert ray.get(registry.live.remote("registry-test")) == []
