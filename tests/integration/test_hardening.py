"""Hostile and unusual input: API keys, body limits, a table of bad inputs, fuzzing, compile
safety, and a replica killed under load. Every answer is a 4xx in the error shape or a 200."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import API_KEY, wait_ready

USER = [{"role": "user", "content": "hi"}]


def nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def ref_bomb(levels, fanout=10):
    """Each definition references the next `fanout` times: fanout**levels subschemas inlined."""
    defs = {f"d{i}": {"type": "array", "prefixItems": [{"$ref": f"#/$defs/d{i + 1}"}] * fanout}
            for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def test_requests_without_a_valid_api_key_get_401_and_probes_stay_open(serve_cluster):
    with httpx.Client(base_url=serve_cluster, timeout=30) as anonymous:
        for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": f"Basic {API_KEY}"}):
            response = anonymous.post("/v1/generate", json={"model": "tiny", "prompt": "x"}, headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and "wrong-key" not in response.text
        models = anonymous.get("/v1/models")
        assert models.status_code == 401 and models.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/metrics").status_code == 200


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/chat/completions", "/v1/completions"])
def test_a_body_not_declared_json_gets_415_and_is_not_served(client, route):
    """What a web page can send cross-origin without a CORS preflight: text/plain, a form, no type."""
    asked = b'"messages": [{"role": "user", "content": "x"}]' if "chat" in route else b'"prompt": "x"'
    body = b'{"model": "tiny", ' + asked + b', "max_tokens": 2}'
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(route, content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"] and error["param"] == "content-type"
    accepted = client.post(route, content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert accepted.status_code == 200, accepted.text


PERSON = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string", "minLength": 3}}, "required": ["name"]}}}


@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 1, "response_format": PERSON},
     "max_completion_tokens"),  # refused by the replica (the schema's minimum budget)
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 100_000}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "a " * 6000, "max_tokens": 2}, "prompt"),  # max_prompt_tokens
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5,
                                                                       "maxLength": 4}}}},
     "response_format.json_schema"),
    ("/v1/generate", {"prompt": "x", "max_tokens": 1, "constraint": {"type": "choice", "choices": ["abcdef"]}},
     "max_tokens"),
])
def test_every_400_names_the_field_as_the_request_sent_it(client, route, body, param):
    response = client.post(route, json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


def test_an_oversized_body_gets_413(client):
    response = client.post("/v1/generate", json={"model": "tiny", "prompt": "x" * 300_000})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


HARDENING_MATRIX = [
    ("seed too large", {"model": "tiny", "prompt": "x", "seed": 10**30}, 400, "seed"),
    ("seed wrong type", {"model": "tiny", "prompt": "x", "seed": "lucky"}, 400, "seed"),
    ("top_p zero", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("temperature negative", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("temperature huge", {"model": "tiny", "prompt": "x", "temperature": 1e308}, 400, "temperature"),
    ("max_tokens huge", {"model": "tiny", "prompt": "x", "max_tokens": 10**20}, 400, "max_tokens"),
    ("max_tokens float", {"model": "tiny", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("stop not strings", {"model": "tiny", "prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("too many stops", {"model": "tiny", "prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("prompt not a string", {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt"),
    ("model null", {"model": None, "prompt": "x"}, 400, "model"),
    ("constraint type unknown", {"model": "tiny", "prompt": "x", "constraint": {"type": "xml"}}, 400, "constraint"),
    ("choice empty", {"model": "tiny", "prompt": "x", "constraint": {"type": "choice", "choices": []}}, 400,
     "at least 1"),
    ("choice not strings", {"model": "tiny", "prompt": "x", "constraint": {"type": "choice", "choices": [1]}}, 400,
     "choices"),
    ("regex lookahead", {"model": "tiny", "prompt": "x", "constraint": {"type": "regex", "pattern": "(?=x)x"}}, 400,
     "lookaround"),
    ("regex unicode garbage", {"model": "tiny", "prompt": "x",
                               "constraint": {"type": "regex", "pattern": "[\U0001F600-"}}, 400, "invalid regex"),
    ("grammar over the size limit", {"model": "guarded", "prompt": "x", "constraint": {
        "type": "grammar", "grammar": "start: " + " | ".join(f'"w{i}"' for i in range(1200))}}, 400,
     "max_grammar_bytes"),
    ("schema nested too deep", {"model": "tiny", "prompt": "x",
                                "constraint": {"type": "json_schema", "schema": nested(40)}}, 400, "max_schema_depth"),
    ("$ref bomb", {"model": "tiny", "prompt": "x", "constraint": {"type": "json_schema", "schema": ref_bomb(8)}},
     400, "max_ref_expansion"),
    ("unresolvable $ref", {"model": "tiny", "prompt": "x", "constraint": {
        "type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}}, 400, "unresolvable $ref"),
    ("remote $ref", {"model": "tiny", "prompt": "x", "constraint": {
        "type": "json_schema", "schema": {"$ref": "https://example.com/schema.json"}}}, 400, "local $ref"),
    ("schema not an object", {"model": "tiny", "prompt": "x", "constraint": {"type": "json_schema", "schema": []}},
     400, "schema"),
    # (An unknown format such as "credit-card" is an annotation, as JSON Schema says: accepted.)
    ("keyword the named backend lacks", {"model": "tiny", "prompt": "x", "constraint": {
        "type": "json_schema", "backend": "outlines_core", "schema": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}}}, 400,
     "'minimum' at #/properties/a"),
    # (A backend that is not installed is a 400 too: tests/unit; here every backend may be, with the vllm extra.)
    ("backend that cannot compile the kind", {"model": "tiny", "prompt": "x", "constraint": {
        "type": "grammar", "grammar": 'start: "a"', "backend": "outlines_core"}}, 400,
     "Lark grammars compile with llguidance only, not outlines_core"),
    ("empty body", None, 400, "body"),
]


@pytest.mark.parametrize(("body", "status", "message"), [c[1:] for c in HARDENING_MATRIX],
                         ids=[c[0] for c in HARDENING_MATRIX])
def test_hardening_matrix(client, body, status, message):
    response = client.post("/v1/generate", json=body) if body is not None else client.post(
        "/v1/generate", content=b"", headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error


def test_an_empty_prompt_is_a_400(client):
    response = client.post("/v1/completions", json={"model": "tiny-small", "prompt": "", "max_tokens": 4})
    assert response.status_code == 400
    assert "prompt is empty" in response.json()["error"]["message"]


def test_deeply_nested_json_body_is_a_400_not_a_crash(client):
    body = b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


SCALARS = (st.none() | st.booleans() | st.integers(-(10**20), 10**20)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
          "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "constraint", "zzz"]
FUZZ_COUNT = {"n": 0, "codes": []}


# derandomize: the same 600 requests on every CI run, so main never fails by chance; vary the
# seed locally (pytest --hypothesis-seed=N) to explore further.
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/generate"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6),
       valid_model=st.booleans())
def _fuzz(client, route, body, valid_model):
    if valid_model:  # a valid request with at most one field replaced by junk
        base = {"messages": USER} if route == "/v1/chat/completions" else {"prompt": "hi"}
        body = {**base, "model": "tiny-small", "max_tokens": 4, **dict(list(body.items())[:1])}
    response = client.post(route, json=body, timeout=60)
    FUZZ_COUNT["n"] += 1
    FUZZ_COUNT["codes"].append(response.status_code)
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzzing_the_api_never_gets_a_5xx(client):
    _fuzz(client)  # 600 examples, bounded by hypothesis' max_examples
    codes = FUZZ_COUNT["codes"]
    print(f"fuzz: {len(codes)} requests, codes {sorted(set(codes))}, "
          f"200: {codes.count(200)}, 4xx: {sum(400 <= c < 500 for c in codes)}, 5xx: {sum(c >= 500 for c in codes)}")
    assert len(codes) >= 500


def _normal_latencies(client, count):
    body = {"model": "guarded", "prompt": "x", "max_tokens": 8,
            "constraint": {"type": "choice", "choices": ["yes", "no"], "backend": "llguidance"}}
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        assert client.post("/v1/generate", json=body).status_code == 200
        latencies.append(time.perf_counter() - started)
    return latencies


def test_hostile_constraints_are_rejected_within_the_timeout_while_normal_requests_complete(client):
    baseline = _normal_latencies(client, 8)
    redos = {"model": "guarded", "prompt": "x",
             "constraint": {"type": "regex", "pattern": "(a|b)*a(a|b){24}", "backend": "outlines_core"}}
    bomb = {"model": "guarded", "prompt": "x", "constraint": {"type": "json_schema", "schema": ref_bomb(8)}}
    with ThreadPoolExecutor(max_workers=3) as pool:
        started = time.perf_counter()
        hostile = [pool.submit(client.post, "/v1/generate", json=body) for body in (redos, bomb, redos)]
        under_attack = _normal_latencies(client, 8)
        answers = [f.result() for f in hostile]
        elapsed = time.perf_counter() - started
    assert [a.status_code for a in answers] == [400, 400, 400], [a.text for a in answers]
    assert "compile_timeout_s" in answers[0].json()["error"]["message"]
    assert "max_ref_expansion" in answers[1].json()["error"]["message"]
    assert elapsed < 30
    ratio = statistics.median(under_attack) / statistics.median(baseline)
    print(f"normal request p50 {statistics.median(baseline) * 1000:.0f} ms alone, "
          f"{statistics.median(under_attack) * 1000:.0f} ms while hostile ones are rejected (ratio {ratio:.2f})")


def _tiny_replica_actor_names():
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "main#model-tiny#" in a["name"]]


def test_a_replica_killed_under_load_leaves_no_request_hanging_and_comes_back(serve_cluster, client):
    import ray

    names = _tiny_replica_actor_names()
    assert len(names) == 2
    codes, stop = [], threading.Event()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 64, "constraint": {"type": "regex", "pattern": "[a-z]{200}"}}

    def load():
        for _ in range(40):  # bounded in count; each request bounded by the client timeout
            if stop.is_set():
                return
            try:
                response = client.post("/v1/generate", json=body, timeout=60)
                codes.append(response.status_code)
                if response.status_code == 503:
                    assert int(response.headers["Retry-After"]) >= 1
            except httpx.TimeoutException:
                codes.append("hung")

    def answered(count: int) -> None:  # waits on the load itself, not on the clock
        deadline = time.monotonic() + 120
        while len(codes) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    answered(4)  # under load
    killed = names[0].rsplit("#", 1)[1]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    answered(len(codes) + 12)  # the load went on past the kill
    stop.set()
    for thread in threads:
        thread.join()
    print(f"replica kill: {len(codes)} requests, codes {sorted(set(map(str, codes)))}")
    assert "hung" not in codes
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= len(codes) - 4  # at most the in-flight ones may fail, with a 503
    # Serve brings a new replica (a new id) up, and the killed one's last heartbeat expires.
    deadline, live = time.monotonic() + 180, []
    while time.monotonic() < deadline:
        live = [r["replica_id"] for r in client.get("/v1/replicas").json()["replicas"] if r["model"] == "tiny"]
        if len(live) == 2 and killed not in live:
            break
        time.sleep(2)
    assert len(live) == 2 and killed not in live, live
    wait_ready(f"{serve_cluster}/readyz")
