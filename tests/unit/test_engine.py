"""The engine on the tiny random Llama: it loops and babbles freely, which makes it a good
adversary for constraints."""

import json
import time

import pytest

from serve_app.cache import BoundedCache
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.engine.transformers_engine import TransformersEngine
from serve_app.errors import ConstraintError, InvalidRequestError, LimitExceededError
from serve_app.generation import GenerationRequest, SamplingParams

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
CONSTRAINTS = {
    "json_schema": {"type": "json_schema", "schema": PERSON},
    "regex": {"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2,4}"},
    "choice": {"type": "choice", "choices": ["red", "green", "blue"]},
    "grammar": {"type": "grammar", "grammar": 'start: NUM OP NUM\nOP: "+" | "-"\nNUM: /[0-9]{1,3}/'},
}


def request(constraint=None, seed=0, temperature=1.0, max_new_tokens=96, **kw):
    return GenerationRequest(
        messages=[{"role": "user", "content": "Answer in the required format."}],
        constraint=parse_constraint(constraint) if constraint else None,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed), **kw)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_every_stop_output_satisfies_its_constraint(tiny_engine, kind):
    results = tiny_engine.generate([request(CONSTRAINTS[kind], seed=s) for s in range(6)])
    stops = [r for r in results if r.finish_reason == "stop"]
    assert stops, "the tiny model should finish at least some of these"
    for result in stops:
        assert result.valid is True, result.text
        assert parse_constraint(CONSTRAINTS[kind]).is_satisfied_by(result.text)
    for result in results:
        assert result.backend == "llguidance"


def test_a_batch_mixing_all_four_kinds_satisfies_each_rows_own_constraint(tiny_engine):
    requests = [request(CONSTRAINTS[k], temperature=0) for k in CONSTRAINTS] + [request(None, temperature=0)]
    results = tiny_engine.generate(requests)
    for kind, result in zip(CONSTRAINTS, results, strict=False):
        assert result.finish_reason == "stop", (kind, result.text)
        assert result.valid is True, (kind, result.text)
    assert results[-1].valid is None
    json.loads(results[0].text)


def test_too_small_a_budget_gives_length_never_a_silently_invalid_stop(tiny_engine):
    req = request(CONSTRAINTS["json_schema"], max_new_tokens=12)
    req.sampling.close_json = False
    [result] = tiny_engine.generate([req])
    assert result.finish_reason == "length"
    assert result.valid is False
    assert result.usage.completion_tokens == 12


def test_usage_counts_prompt_and_completion_tokens(tiny_engine):
    [result] = tiny_engine.generate([request(CONSTRAINTS["choice"], temperature=0)])
    assert result.usage.prompt_tokens > 5
    assert result.usage.completion_tokens == len(result.token_ids) >= 1
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_same_seed_same_output_different_seed_usually_differs(tiny_engine):
    texts = [tiny_engine.generate([request(None, seed=s, max_new_tokens=20)])[0].text for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1


def test_stop_sequences_cut_the_output(tiny_engine):
    base = tiny_engine.generate([request(None, seed=5, max_new_tokens=30)])[0].text
    assert len(base) > 4
    stop = base[2:4]
    req = request(None, seed=5, max_new_tokens=30)
    req.sampling.stop.append(stop)
    [cut] = tiny_engine.generate([req])
    assert cut.finish_reason == "stop"
    assert cut.text == base[:base.find(stop)]


def test_plain_prompt_works_without_chat_template(tiny_engine):
    [result] = tiny_engine.generate([GenerationRequest(
        prompt="The answer is", constraint=parse_constraint(CONSTRAINTS["choice"]),
        sampling=SamplingParams(temperature=0))])
    assert result.text in {"red", "green", "blue"}


def test_compile_cache_counts_hits_and_misses(tiny_engine):
    schema = {"type": "object", "properties": {"unique_field_for_cache_test": {"type": "boolean"}}}
    before = tiny_engine.cache.stats.as_dict()
    first = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": schema}))
    second = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": dict(schema)}))
    after = tiny_engine.cache.stats.as_dict()
    assert first is second
    assert after["misses"] == before["misses"] + 1
    assert after["hits"] == before["hits"] + 1
    assert after["build_seconds"] > before["build_seconds"]


def test_precompile_fills_the_cache(tiny_engine):
    constraints = [parse_constraint({"type": "regex", "pattern": f"pre{i}[0-9]"}) for i in range(3)]
    tiny_engine.precompile(constraints)
    hits = tiny_engine.cache.stats.hits
    tiny_engine.generate([GenerationRequest(prompt="x", constraint=constraints[0],
                                            sampling=SamplingParams(max_new_tokens=5))])
    assert tiny_engine.cache.stats.hits == hits + 1


def test_unsupported_keyword_is_rejected_not_dropped(tiny_engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}
    with pytest.raises(ConstraintError, match="'minimum' at #/properties/a"):
        tiny_engine.generate([request({"type": "json_schema", "schema": schema, "backend": "outlines_core"})])


def test_selecting_outlines_core_per_request_works_and_rejects_what_it_would_ignore(tiny_engine):
    regex = {"type": "regex", "pattern": "[ab]{2}c", "backend": "outlines_core"}
    [result] = tiny_engine.generate([request(regex, temperature=0)])
    assert result.backend == "outlines_core"
    assert result.finish_reason == "stop" and result.valid
    bounded = {"type": "json_schema", "schema": PERSON, "backend": "outlines_core"}
    with pytest.raises(ConstraintError, match="'minimum'.*outlines_core"):
        tiny_engine.generate([request(bounded)])


def test_grammar_on_a_backend_without_lark_is_rejected(tiny_engine):
    with pytest.raises(ConstraintError, match="llguidance only"):
        tiny_engine.generate([request({**CONSTRAINTS["grammar"], "backend": "outlines_core"})])


def test_token_limits_are_enforced(tiny_engine):
    with pytest.raises(LimitExceededError, match="exceeds the limit of 128 for model tiny"):
        tiny_engine.generate([request(None, max_new_tokens=500)])
    long_prompt = GenerationRequest(prompt="word " * 5000)
    with pytest.raises(LimitExceededError, match="max_prompt_tokens|the limit is"):
        tiny_engine.generate([long_prompt])


def test_context_length_is_enforced(tiny_config):
    config = tiny_config.model_copy(update={"limits": tiny_config.limits.model_copy(
        update={"max_prompt_tokens": 4000, "max_new_tokens": 4000})})
    engine = TransformersEngine(config, create_engine(tiny_config).loaded)
    with pytest.raises(InvalidRequestError, match="context length of 2048"):
        engine.generate([GenerationRequest(prompt="word " * 1000, sampling=SamplingParams(max_new_tokens=1500))])


def test_status_reports_plan_and_cache(tiny_engine):
    status = tiny_engine.status().model_dump()
    assert status["plan"]["device"] == "cpu"
    from serve_app.engine.placement import choose_dtype

    assert status["dtype"] == choose_dtype("auto", [])  # bfloat16 where this CPU computes it natively
    assert status["torch_threads"] >= 1 and status["max_batch_size"] == status["plan"]["max_batch_size"]
    assert status["fell_back_to_cpu"] is False
    assert status["compile_cache"]["entries"] >= 1


class _Item:
    def __init__(self, size):
        self.size_bytes = size
        self.compile_seconds = 0.01


def test_cache_is_bounded_in_entries_and_bytes():
    cache = BoundedCache(max_entries=3, max_bytes=1000, size_of=lambda item: item.size_bytes)
    for i in range(5):
        cache.get_or_build(f"k{i}", lambda: _Item(100))
    assert len(cache) == 3 and "k0" not in cache and "k4" in cache
    cache.get("k2")  # recently used survives
    cache.get_or_build("big", lambda: _Item(850))
    assert cache.stats.bytes <= 1000
    assert "big" in cache and "k2" not in cache or cache.stats.bytes <= 1000
    assert cache.stats.evictions >= 3


def _solo(engine, req):
    return engine.generate([req])[0]


def test_rows_joining_a_running_batch_get_the_same_greedy_output_as_alone(tiny_engine):
    long_req = GenerationRequest(prompt="The story begins", sampling=SamplingParams(max_new_tokens=60, temperature=0))
    late_req = request(CONSTRAINTS["json_schema"], temperature=0)
    other_req = request(CONSTRAINTS["regex"], temperature=0)
    alone = [_solo(tiny_engine, r) for r in (long_req, late_req, other_req)]
    first = tiny_engine.submit(long_req)
    while len(first.stream.output.token_ids) < 5:
        time.sleep(0.001)
    joined = [tiny_engine.submit(late_req), tiny_engine.submit(other_req)]
    results = [tiny_engine.result(s, s.stream.result(timeout=60)) for s in (first, *joined)]
    assert [r.text for r in results] == [r.text for r in alone]
    assert [r.finish_reason for r in results] == [r.finish_reason for r in alone]


def test_streamed_deltas_concatenate_to_the_final_text(tiny_engine):
    submission = tiny_engine.submit(request(CONSTRAINTS["json_schema"], temperature=0))
    deltas = []
    while True:
        kind, value = submission.stream.events.get(timeout=60)
        if kind == "delta":
            deltas.append(value)
        else:
            break
    assert kind == "done"
    assert len(deltas) > 3
    assert "".join(deltas) == value.text
    json.loads(value.text)


def test_a_row_submitted_without_deltas_emits_its_text_once_at_the_end(tiny_engine):
    """What a non-streaming request uses: no event per token for the caller to wake up for."""
    seen = []
    req = request(CONSTRAINTS["json_schema"], temperature=0)
    submission = tiny_engine.submit_prepared(tiny_engine.prepare(req), seen.append, deltas=False)
    out = submission.stream.result(timeout=120)
    assert [kind for kind, _ in seen] == ["delta", "done"]
    assert seen[0][1] == out.text and len(out.token_ids) > 3


def test_cancelling_a_row_stops_its_generation_and_the_loop_goes_on(tiny_engine):
    long_req = GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=128, temperature=0.8, seed=3))
    submission = tiny_engine.submit(long_req)
    while len(submission.stream.output.token_ids) < 3:
        time.sleep(0.001)
    submission.stream.cancel()
    out = submission.stream.result(timeout=30)
    assert out.finish_reason == "cancelled"
    assert len(out.token_ids) < 128
    assert tiny_engine.queue_depth() == (0, 0)
    assert _solo(tiny_engine, request(CONSTRAINTS["choice"], temperature=0)).valid


def test_an_empty_prompt_is_rejected_not_crashed(tiny_engine):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        tiny_engine.generate([GenerationRequest(prompt="")])


@pytest.mark.parametrize("temperature", [7.572532733603657e-285, 1e-30, 1e-5])
def test_vanishing_temperatures_sample_greedily_instead_of_crashing(tiny_engine, temperature):
    [greedy] = tiny_engine.generate([request(CONSTRAINTS["regex"], temperature=0)])
    [tiny] = tiny_engine.generate([request(CONSTRAINTS["regex"], temperature=temperature)])
    assert tiny.text == greedy.text and tiny.valid
