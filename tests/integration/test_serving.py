"""The app on a real local Ray cluster over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import lark
import openai
import pytest

from serve_app.engine.placement import choose_dtype
from tests.integration.conftest import API_KEY, fresh_replicas

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}
GRAMMAR = 'start: NUM OP NUM\nOP: "+" | "-"\nNUM: /[0-9]{1,3}/'
USER = [{"role": "user", "content": "Answer in the required format."}]


def replicas(client, prefix=""):
    return client.get(f"{prefix}/v1/replicas").json()["replicas"]


def test_health_readiness_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "replicas": {"tiny": 2, "tiny-small": 1, "thinker": 1, "guarded": 1}}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-small", "thinker", "guarded"]


def test_openai_client_json_schema_returns_valid_json(serve_cluster):
    oa = openai.OpenAI(base_url=f"{serve_cluster}/v1", api_key=API_KEY)
    completion = oa.chat.completions.create(
        model="tiny", messages=USER, temperature=0, max_tokens=96,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert completion.usage.completion_tokens > 0
    assert completion.id.startswith("chatcmpl-") and completion.model == "tiny"


def test_openai_completions_with_vllm_guided_choice(serve_cluster):
    oa = openai.OpenAI(base_url=f"{serve_cluster}/v1", api_key=API_KEY)
    completion = oa.completions.create(model="tiny", prompt="Pick a colour:", max_tokens=8, temperature=0,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert completion.object == "text_completion"
    assert completion.choices[0].text in {"red", "green", "blue"}
    assert completion.choices[0].finish_reason == "stop"


def test_response_format_and_structured_outputs_on_completions_and_chat(serve_cluster):
    """vLLM accepts both on both routes; so do we."""
    oa = openai.OpenAI(base_url=f"{serve_cluster}/v1", api_key=API_KEY)
    person = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person}}}
    text = oa.completions.create(model="tiny", prompt="Age:", max_tokens=32, extra_body=fmt).choices[0].text
    assert set(json.loads(text)) == {"age"}
    digits = {"structured_outputs": {"regex": "[0-9]{3}"}}
    assert re.fullmatch("[0-9]{3}", oa.completions.create(model="tiny", prompt="N:", max_tokens=8,
                                                          extra_body=digits).choices[0].text)
    chat = oa.chat.completions.create(model="tiny", messages=USER, max_tokens=8, extra_body=digits)
    assert re.fullmatch("[0-9]{3}", chat.choices[0].message.content)


def test_n_choices_each_satisfy_the_constraint(client):
    body = {"model": "tiny", "messages": USER, "n": 3, "seed": 7, "max_tokens": 20,
            "guided_regex": "[a-c]{2}[0-9]"}
    choices = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice in choices:
        assert choice["finish_reason"] == "stop" and choice["valid"] is True


@pytest.mark.parametrize(("constraint", "check"), [
    ({"type": "regex", "pattern": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
    ({"type": "choice", "choices": ["alpha", "beta"]}, lambda t: t in {"alpha", "beta"}),
    ({"type": "grammar", "grammar": GRAMMAR}, lambda t: lark.Lark(GRAMMAR).parse(t) is not None),
    ({"type": "json_schema", "schema": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_native_generate_satisfies_each_constraint_kind(client, constraint, check):
    body = {"model": "tiny", "messages": USER, "constraint": constraint, "temperature": 0, "max_tokens": 96}
    result = client.post("/v1/generate", json=body).json()
    assert result["finish_reason"] == "stop", result
    assert result["valid"] is True
    assert check(result["text"])
    assert result["constraint_type"] == constraint["type"]
    assert result["timings"]["router_total_s"] >= result["timings"]["total_s"] > 0
    if constraint["type"] == "json_schema":
        assert result["parsed"] == json.loads(result["text"])


def test_native_generate_says_when_output_is_cut_off(client):
    body = {"model": "tiny", "prompt": "x", "constraint": {"type": "json_schema", "schema": PERSON},
            "max_tokens": 12, "close_json": False}
    result = client.post("/v1/generate", json=body).json()
    assert result["finish_reason"] == "length"
    assert result["valid"] is False and result["parsed"] is None
    assert result["truncated"] is True and result["closed_early"] is False


def test_closing_on_by_default_finishes_json_within_max_tokens_over_http(client):
    story = {"type": "object", "properties": {"story": {"type": "string"}, "n": {"type": "integer"}},
             "required": ["story", "n"]}
    body = {"model": "tiny", "prompt": "x", "constraint": {"type": "json_schema", "schema": story},
            "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
    result = client.post("/v1/generate", json=body).json()
    assert result["finish_reason"] == "stop" and result["valid"] is True, result
    assert result["closed_early"] is True and result["truncated"] is False
    assert result["usage"]["completion_tokens"] <= 16
    jsonschema.validate(result["parsed"], story)
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 16, "temperature": 0, "frequency_penalty": 0.5,
        "guided_json": story}).json()
    assert chat["choices"][0]["closed_early"] is True and chat["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(chat["choices"][0]["message"]["content"]), story)


def test_real_world_schema_shapes_are_normalised_and_enforced_over_http(client):
    payment = {"oneOf": [  # an OpenAPI discriminated union, with OpenAPI's int64/double formats
        {"type": "object", "properties": {"kind": {"const": "card"}, "id": {"type": "integer", "format": "int64"}},
         "required": ["kind", "id"]},
        {"type": "object", "properties": {"kind": {"const": "cash"}, "amount": {"type": "number", "format": "double"}},
         "required": ["kind", "amount"]}]}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 40, "constraint": {"type": "json_schema", "schema": payment}}
    result = client.post("/v1/generate", json=body).json()
    assert result["valid"] is True and result["approximated"] == [], result
    jsonschema.validate(json.loads(result["text"]), payment)  # `parsed` is null when a number overflows a float


def test_keywords_no_grammar_has_are_checked_while_generating_and_reported(client):
    tags = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "maxItems": 3, "uniqueItems": True}
    before = sum(r["checks"]["violations"] for r in fresh_replicas(client, "tiny"))
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 24, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": tags}}}).json()
    assert sorted(json.loads(chat["choices"][0]["message"]["content"])) == ["a", "b", "c"], chat
    native = client.post("/v1/generate", json={"model": "tiny", "prompt": "JSON:", "max_tokens": 24,
                                               "temperature": 0, "constraint": {"type": "json_schema",
                                                                                "schema": tags}}).json()
    assert native["valid"] is True and sorted(native["parsed"]) == ["a", "b", "c"], native
    assert native["checks"]["keywords"] == ["uniqueItems at #/"] and native["checks"]["violations"] > 0
    assert sum(r["checks"]["violations"] for r in fresh_replicas(client, "tiny")) > before


def test_strict_false_accepts_an_approximation_says_so_and_still_checks_the_output(client):
    # The cascade's llguidance has every keyword; a backend the request names may lack one.
    bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]}
    constraint = {"type": "json_schema", "schema": bounded, "backend": "outlines_core"}
    strict = client.post("/v1/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 24,
                                               "constraint": constraint})
    assert strict.status_code == 400
    assert "'minimum' at #/properties/n" in strict.json()["error"]["message"]
    loose = client.post("/v1/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 24, "constraint": {
        **constraint, "strict": False}}).json()
    assert loose["approximated"], loose
    if loose["finish_reason"] == "stop":
        assert loose["valid"] is (json.loads(loose["text"])["n"] >= 5)
    else:
        assert loose["valid"] is False


def _misses_by_replica(client, model):
    """Compile-cache misses per replica, as reported after everything done so far."""
    return {r["replica_id"]: r["compile_cache"]["misses"] for r in fresh_replicas(client, model)}


def test_two_models_are_routed_by_name(client):
    before = _misses_by_replica(client, "tiny-small")
    body = {"model": "tiny-small", "prompt": "x", "constraint": {"type": "regex", "pattern": "routed[0-9]"}}
    assert client.post("/v1/generate", json=body).json()["valid"] is True
    after = _misses_by_replica(client, "tiny-small")
    assert sum(after.values()) == sum(before.values()) + 1
    # Each model keeps its own limits: 100 tokens is fine for tiny, too many for tiny-small.
    for model, status in (("tiny", 200), ("tiny-small", 400)):
        body = {"model": model, "prompt": "x", "max_tokens": 100}
        assert client.post("/v1/generate", json=body).status_code == status


def test_both_replicas_of_a_model_receive_traffic(client):
    before = _misses_by_replica(client, "tiny")
    assert len(before) == 2

    def send(i):
        body = {"model": "tiny", "prompt": "x", "max_tokens": 4,
                "constraint": {"type": "regex", "pattern": f"spread{i}[0-9]"}}
        return client.post("/v1/generate", json=body).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(send, range(24))) == {200}
    after = _misses_by_replica(client, "tiny")
    assert sum(after.values()) - sum(before.values()) == 24
    assert all(after[r] > before[r] for r in before), (before, after)


def test_replicas_report_placement_and_cache(client):
    for replica in replicas(client):
        assert replica["plan"]["device"] == "cpu"
        assert replica["dtype"] == choose_dtype("auto", [])  # bfloat16 where the CPU computes it natively
        assert replica["torch_threads"] >= 1 and replica["mean_batch_size"] is not None
        assert {"hits", "misses", "compile_seconds"} <= set(replica["compile_cache"])


def test_fake_gpus_are_assigned_and_the_two_gpu_plan_spans_exactly_its_ids(client):
    found = replicas(client, "/gpus")
    half = [r for r in found if r["model"] == "half"]
    [double] = [r for r in found if r["model"] == "double"]
    assert len(half) == 2
    for replica in half:
        assert len(replica["assigned_gpu_ids"]) == 1
        assert replica["gpu_plan"]["memory_fraction"] == 0.5
        assert replica["gpu_plan"]["gpu_ids"] == replica["assigned_gpu_ids"]
    assert len(double["assigned_gpu_ids"]) == 2
    assert double["gpu_plan"]["gpu_ids"] == double["assigned_gpu_ids"]
    assert double["gpu_plan"]["device_map"] == "auto"
    assert sorted(int(k) for k in double["gpu_plan"]["max_memory"]) == [0, 1]
    for replica in found:  # no CUDA here: every replica fell back to CPU and says why
        assert replica["fell_back_to_cpu"] is True
        assert "CUDA is not available" in replica["fallback_reason"]
        assert replica["plan"]["device"] == "cpu"
    half_ids = {r["assigned_gpu_ids"][0] for r in half}
    assert not half_ids & set(double["assigned_gpu_ids"]) or len(half_ids) == 1


BIG_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
BAD_INPUTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "malformed JSON body"),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages: Field required"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("missing model", "/v1/chat/completions", {"messages": USER}, 400, "model: Field required"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": USER}, 404,
     "known models: tiny, tiny-small, thinker, guarded"),
    ("invalid JSON Schema", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}}, 400,
     "invalid JSON Schema at #/properties/a/type"),
    ("schema over the size limit", "/v1/chat/completions",
     {"model": "tiny-small", "messages": USER, "guided_json": BIG_SCHEMA}, 400, "max_schema_bytes"),
    ("unsupported keyword", "/v1/generate",
     {"model": "tiny", "prompt": "x", "constraint": {"type": "json_schema", "backend": "outlines_core", "schema": {
         "type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}}}, 400,
     "unsupported JSON Schema keyword 'minimum' at #/properties/a"),
    ("invalid regex", "/v1/chat/completions", {"model": "tiny", "messages": USER, "guided_regex": "(a"}, 400,
     "guided_regex: invalid regex"),
    ("invalid grammar", "/v1/generate",
     {"model": "tiny", "prompt": "x", "constraint": {"type": "grammar", "grammar": "start: nothing"}}, 400,
     "invalid Lark grammar"),
    ("max_tokens zero", "/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 0}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max_tokens negative", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400,
     "max_tokens"),
    ("max_tokens over the limit", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "max_tokens": 100000}, 400, "exceeds the limit of 128"),
    ("temperature wrong type", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("messages wrong type", "/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("unknown role", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("n zero", "/v1/chat/completions", {"model": "tiny", "messages": USER, "n": 0}, 400, "n:"),
    ("two constraints", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "guided_regex": "a", "guided_choice": ["a"]}, 400, "give one constraint"),
    ("unsupported parameter", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "echo": True}, 400, "echo: unsupported parameter"),
    ("logit_bias out of the vocabulary", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "logit_bias": {"99999": 5}}, 400, "not in the model's vocabulary"),
    ("logit_bias out of range", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "logit_bias": {"1": 500}}, 400, "logit_bias"),
    ("image part", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "part 0 is image_url"),
    ("tool_choice without tools", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "tool_choice": "required"}, 400, "tool_choice needs tools"),
    ("unknown tool", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "no tool named 'g'"),
    ("tool and schema", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required", "guided_regex": "a+"}, 400, "give one constraint"),
    ("top_logprobs over 20", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("streaming a too-long prompt", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "word " * 6000}], "stream": True}, 400,
     "the limit is 4096"),
    ("prompt and messages", "/v1/generate", {"model": "tiny", "prompt": "x", "messages": USER}, 400,
     "exactly one of prompt or messages"),
    ("prompt too long", "/v1/generate", {"model": "tiny", "prompt": "word " * 6000}, 400, "the limit is 4096"),
    ("unknown route", "/v1/nothing", {"model": "tiny"}, 404, "Not Found"),
    ("max_tokens below the schema's minimum", "/v1/generate",
     {"model": "tiny", "prompt": "x", "max_tokens": 2, "constraint": {"type": "json_schema", "schema": PERSON}},
     400, "shortest valid output takes"),
    ("repetition_penalty zero", "/v1/chat/completions",
     {"model": "tiny", "messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("no_repeat_ngram_size wrong type", "/v1/generate",
     {"model": "tiny", "prompt": "x", "no_repeat_ngram_size": "two"}, 400, "no_repeat_ngram_size"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx_in_the_error_shape(client, path, body, status, message):
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error


def test_the_service_still_answers_after_bad_input(client):
    body = {"model": "tiny", "prompt": "x", "constraint": {"type": "choice", "choices": ["ok"]}}
    assert client.post("/v1/generate", json=body).json()["text"] == "ok"


def test_streaming_chat_chunks_concatenate_to_the_non_streaming_text(serve_cluster):
    oa = openai.OpenAI(base_url=f"{serve_cluster}/v1", api_key=API_KEY)
    kwargs = {"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 96,
              "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    whole = oa.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    assert "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), PERSON)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_completions_and_native(serve_cluster, client):
    oa = openai.OpenAI(base_url=f"{serve_cluster}/v1", api_key=API_KEY)
    stream = oa.completions.create(model="tiny", prompt="Colour:", stream=True, temperature=0,
                                   extra_body={"guided_choice": ["crimson", "teal"]})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) in {"crimson", "teal"}
    body = {"model": "tiny", "prompt": "x", "stream": True, "temperature": 0,
            "constraint": {"type": "regex", "pattern": "[0-9]{6}"}}
    with client.stream("POST", "/v1/generate", json=body) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    deltas = "".join(e["delta"] for e in events if "delta" in e)
    done = events[-1]["done"]
    assert deltas == done["text"] and len(done["text"]) == 6 and done["valid"] is True


def _tiny_counters(client):
    found = [r for r in replicas(client) if r["model"] == "tiny"]
    return sum(r["finished"].get("cancelled", 0) for r in found), sum(r["queue"]["running"] for r in found)


def test_a_disconnect_mid_stream_stops_the_replicas_generation(client):
    cancelled_before, _ = _tiny_counters(client)
    body = {"model": "tiny", "prompt": "x", "stream": True, "max_tokens": 128,
            "constraint": {"type": "regex", "pattern": "[a-z]{1000}"}}
    with client.stream("POST", "/v1/generate", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and "delta" in line:
                break  # leave after the first token: closing the response drops the connection
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1)
        cancelled, running = _tiny_counters(client)
        if cancelled > cancelled_before and running == 0:
            break
    assert cancelled == cancelled_before + 1
    assert running == 0
