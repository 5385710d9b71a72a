"""`engine: vllm` as a user runs it: `make serve CONFIG=configs/vllm_cpu.yaml` (SmolLM2 through
vLLM's CPU build, in the replica's process), and the same HTTP API and constraint layer on top:
constrained rows steered inside vLLM's sampler by our row policies (closing, checks while
generating). vLLM runs only in that server's processes, never in the test process (it binds
threads and memory to cores)."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import lark
import pytest

from tests.e2e.test_commands import ROOT, START_TIMEOUT_S, free_port, stop_serving

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
GRAMMAR = 'start: NUM "+" NUM\nNUM: /[0-9]{1,3}/'
STORY = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
UNIQUE = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 3, "maxItems": 3,
          "uniqueItems": True}
USER = [{"role": "user", "content": "Invent a person."}]
REPEAT = [{"role": "user", "content": 'Repeat exactly: ["red","red","red"]'}]


@pytest.fixture(scope="module")
def vllm_server():
    port = free_port()
    server = subprocess.Popen(["make", "serve", "CONFIG=configs/vllm_cpu.yaml", f"PORT={port}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        with httpx.Client(base_url=base, timeout=300) as client:
            yield client
    finally:
        stop_serving(server)


def native(client: httpx.Client, constraint: dict, max_tokens: int = 64, **extra) -> dict:
    body = {"model": MODEL, "messages": USER, "max_tokens": max_tokens, "temperature": 0, "constraint": constraint}
    response = client.post("/v1/generate", json={**body, **extra})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_the_four_constraint_kinds_mixed_in_one_batch_are_enforced_and_validated(vllm_server):
    kinds = [{"type": "json_schema", "schema": PERSON}, {"type": "regex", "pattern": "[ab]{3}c"},
             {"type": "choice", "choices": ["yes", "no"]}, {"type": "grammar", "grammar": GRAMMAR}] * 2
    with ThreadPoolExecutor(len(kinds)) as pool:  # concurrent: vLLM batches them together
        answers = list(pool.map(lambda c: native(vllm_server, c), kinds))
    for constraint, answer in zip(kinds, answers, strict=True):
        assert answer["finish_reason"] == "stop" and answer["valid"] is True, (constraint, answer)
        assert answer["backend"] in ("llguidance", "outlines_core", "xgrammar") and answer["approximated"] == []
    jsonschema.validate(json.loads(answers[0]["text"]), PERSON)
    assert answers[2]["text"] in ("yes", "no")
    lark.Lark(GRAMMAR).parse(answers[3]["text"])
    deadline = time.monotonic() + 60  # replicas report every 2 s: wait for a report that counts these rows
    while True:
        [replica] = vllm_server.get("/v1/replicas").json()["replicas"]
        if replica["finished"].get("stop", 0) >= len(kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert replica["engine"] == "vllm" and replica["finished"]["stop"] >= len(kinds), replica
    assert replica["vllm"]["prefix_cache_queries"] >= len(kinds) and "kv_cache_usage_perc" in replica["vllm"]


@pytest.mark.slow
def test_streaming_chat_concatenates_to_the_answer_and_the_openai_shape_holds(vllm_server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 64, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    whole = vllm_server.post("/v1/chat/completions", json=body).json()
    parts = []
    with vllm_server.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    assert "".join(parts) == whole["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads("".join(parts)), PERSON)


@pytest.mark.slow
def test_a_keyword_nothing_enforces_is_a_400_before_vllm_and_a_cut_answer_is_never_valid(vllm_server):
    refused = vllm_server.post("/v1/generate", json={"model": MODEL, "prompt": "x", "constraint": {
        "type": "json_schema", "backend": "outlines_core", "schema": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}}})
    assert refused.status_code == 400 and "'minimum' at #/properties/a" in refused.json()["error"]["message"]
    cut = native(vllm_server, {"type": "json_schema", "schema": STORY}, max_tokens=8, close_json=False)
    assert cut["finish_reason"] == "length" and cut["valid"] is False and cut["truncated"] is True
    assert cut["parsed"] is None


@pytest.mark.slow
def test_a_budget_too_small_for_the_models_answer_closes_the_json_validly(vllm_server):
    answer = native(vllm_server, {"type": "json_schema", "schema": STORY}, max_tokens=12)
    assert answer["finish_reason"] == "stop" and answer["valid"] is True and answer["closed_early"] is True, answer
    assert answer["usage"]["completion_tokens"] <= 12
    jsonschema.validate(json.loads(answer["text"]), STORY)


@pytest.mark.slow
def test_a_duplicate_the_model_is_pushed_to_write_is_refused_while_generating(vllm_server):
    answer = native(vllm_server, {"type": "json_schema", "schema": UNIQUE}, max_tokens=40, messages=REPEAT)
    assert answer["finish_reason"] == "stop" and answer["valid"] is True, answer
    assert answer["approximated"] == [] and answer["checks"]["keywords"] == ["uniqueItems at #/"]
    assert answer["checks"]["violations"] >= 1, answer["checks"]  # greedy SmolLM2 repeats "red"
    items = json.loads(answer["text"])
    assert len(set(items)) == len(items) == 3
    # Streamed, the text held back until the checks settle concatenates to the same answer.
    body = {"model": MODEL, "messages": REPEAT, "max_tokens": 40, "temperature": 0, "stream": True,
            "constraint": {"type": "json_schema", "schema": UNIQUE}}
    parts = []
    with vllm_server.stream("POST", "/v1/generate", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:]).get("delta") or "")
    assert "".join(parts) == answer["text"]


@pytest.mark.slow
def test_a_row_no_output_can_satisfy_ends_honestly_and_the_replica_counts_its_checks(vllm_server):
    # Past what normalisation proves (an `enum` of two would be a 400 before any work): refused while generating.
    impossible = {"type": "array", "items": {"anyOf": [{"const": "a"}, {"const": "b"}]}, "minItems": 3,
                  "uniqueItems": True}
    answer = native(vllm_server, {"type": "json_schema", "schema": impossible}, max_tokens=40)
    assert answer["finish_reason"] == "length" and answer["valid"] is False and answer["checks"]["exhausted"], answer
    deadline = time.monotonic() + 60  # replicas report every 2 s
    while True:
        [replica] = vllm_server.get("/v1/replicas").json()["replicas"]
        if replica["checks"]["exhausted"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert replica["checks"]["exhausted"] >= 1 and replica["checks"]["rollbacks"] >= 1, replica["checks"]
    assert replica["vllm"]["resubmits"] >= 1, replica["vllm"]


@pytest.mark.slow
def test_a_seeded_sampled_row_reproduces(vllm_server):
    body = {"type": "json_schema", "schema": PERSON}
    first, second = (native(vllm_server, body, temperature=1.0, seed=11) for _ in range(2))
    assert first["text"] == second["text"] and first["valid"] is True, (first, second)


@pytest.mark.slow
def test_a_client_that_goes_away_mid_stream_aborts_its_vllm_request(vllm_server):
    # A regex no answer can finish quickly (no early EOS): only an abort ends it before max_tokens.
    body = {"model": MODEL, "prompt": "Write.", "max_tokens": 500, "temperature": 0, "stream": True,
            "constraint": {"type": "regex", "pattern": "[ab]{499}"}}
    with vllm_server.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and "delta" in line:
                break  # the first token arrived: closing the response drops the connection
    deadline = time.monotonic() + 120  # the replica reports every 2 s
    while time.monotonic() < deadline:
        [replica] = vllm_server.get("/v1/replicas").json()["replicas"]
        if replica["finished"].get("cancelled", 0) >= 1 and replica["queue"]["running"] == 0:
            break
        time.sleep(0.5)
    assert replica["finished"].get("cancelled", 0) >= 1 and replica["queue"]["running"] == 0, \
        (replica["finished"], replica["queue"], replica["vllm"])
