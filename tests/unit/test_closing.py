"""Budget-aware decoding: closing JSON before max_tokens runs out, the minimum budget, and the
loop-control penalties, on the tiny random model (which loops and babbles freely)."""

import json

import jsonschema
import pytest

from serve_app.config import LimitsConfig
from serve_app.constraints import BackendDefaults, installed_backends, parse_constraint, plan_constraint
from serve_app.constraints.budget import least_chars
from serve_app.constraints.examples import regex_example
from serve_app.constraints.json_completion import JsonCloser
from serve_app.constraints.validation import ENFORCED_FORMATS
from serve_app.engine.row_closing import REMEMBERED_CHARS, ShortestEncoder
from serve_app.errors import InvalidRequestError
from serve_app.generation import GenerationRequest, SamplingParams

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2}, "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "email": {"type": "string", "format": "email"}}, "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "string", "minLength": 3}, "c": {"enum": ["xx", "yyy"]}}, "required": ["b", "c"]}},
        "required": ["a"], "additionalProperties": False},
    "array_min": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 2}}, "required": ["tags"]},
    "numbers": {"type": "array", "items": {"type": "number", "minimum": 5, "multipleOf": 0.5}},
    "refs": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"]}}, "$ref": "#/$defs/node"},
    "union": {"type": "object", "properties": {"pet": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
         "required": ["kind", "lives"]},
        {"type": "null"}]}, "when": {"type": "string", "format": "date"}}, "required": ["pet", "when"]},
    "invoice": {"type": "object", "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
                                                 "lines": {"type": "array", "items": {"type": "string"}}},
                "required": ["number", "lines"]},
    "free_text": {"type": "object", "properties": {"story": {"type": "string"}, "ok": {"type": "boolean"}},
                  "required": ["story", "ok"]},
    # A tool call over two tools (api/tools.py): the name chosen decides which arguments complete.
    "tagged": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "zz_long"}, "arguments": {
            "type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "b"}, "arguments": {
            "type": "object", "properties": {"yy": {"type": "integer"}, "z": {"enum": ["on", "off"]}},
            "required": ["yy", "z"], "additionalProperties": False}},
         "required": ["name", "arguments"], "additionalProperties": False}]},
    # minProperties met by additional properties only (an inventory map).
    "counted_map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                    "minProperties": 2, "maxProperties": 4},
    # Branches that declare the object's properties again as {} (what the grammar closes them with).
    "closed_branches": {"type": "object", "properties": {"at": {"type": "string", "format": "date"}},
                        "required": ["at"], "anyOf": [
                            {"properties": {"at": {}, "n": {"type": "integer"}}, "required": ["n"],
                             "additionalProperties": False}]},
}
INSTANCES = {
    "person": {"name": "Molina \\\"x\\\" é", "age": 42, "email": "a@b.co"},
    "nested": {"a": {"b": "hello", "c": "yyy"}},
    "array_min": {"tags": ["one", "two", "three"]},
    "numbers": [5.5, 100, 7e1],
    "refs": {"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]},
    "union": {"pet": {"kind": "cat", "lives": 9}, "when": "2024-02-03"},
    "free_text": {"story": "once upon a time", "ok": True},
    "invoice": {"number": "INV-2024", "lines": ["a", "b"]},
    "tagged": {"name": "zz_long", "arguments": {"x": "sunny"}},
    "counted_map": {"hero": 12, "sidekick": 345},
    "closed_branches": {"at": "2024-02-03", "n": 77},
}


def _encode(text):
    return list(text.encode())  # one "token" per byte: enough to test the closer alone


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_prefix_of_a_valid_instance_closes_into_a_valid_instance(name):
    schema = SCHEMAS[name]
    closer = JsonCloser(schema, _encode, ENFORCED_FORMATS)
    assert closer.min_text is not None
    jsonschema.validate(json.loads(closer.min_text), schema)
    text = json.dumps(INSTANCES[name], separators=(",", ":"), ensure_ascii=False)
    for cut in range(len(text) + 1):
        stack = closer.feed(closer.start, text[:cut])
        completion = closer.completion(stack)
        assert completion is not None, (name, text[:cut])
        jsonschema.validate(json.loads(text[:cut] + completion), schema)


def test_a_string_member_picks_the_branch_the_completion_follows():
    closer = JsonCloser(SCHEMAS["tagged"], _encode)
    assert closer.completion(closer.feed(closer.start, '{"name":"zz_long","arguments":{')) == '"x":""}}'
    assert closer.completion(closer.feed(closer.start, '{"name":"b","arguments":{')) == '"yy":0,"z":"on"}}'


def test_after_an_additional_property_the_completion_adds_no_declared_one():
    """Backends emit declared properties in order and none after an undeclared one (found on
    SmolLM2: the closer's `"ports":[]` was rejected by llguidance and the row ran to length)."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "ports": {"type": "array"}},
              "required": ["name"]}
    closer = JsonCloser(schema, _encode)
    for prefix, completion in [('{"name":"a","image":"x","', '":0}'), ('{"name":"a","image":"x",', '"":0}'),
                               ('{"name":"a",', '"":0}'), ('{"name":"a","":1,"', '0":0}')]:
        assert closer.completion(closer.feed(closer.start, prefix)) == completion, prefix
        jsonschema.validate(json.loads(prefix + completion), schema)


def test_the_distance_is_the_token_count_of_the_shortest_completion():
    closer = JsonCloser(SCHEMAS["nested"], _encode)
    assert closer.min_text == '{"a":{"b":"000","c":"xx"}}'  # ties broken by text
    assert closer.min_tokens == len(closer.min_text)
    assert closer.completion(closer.feed(closer.start, '{"a":{"b":"hel')) == '","c":"xx"}}'


def test_the_shortest_spelling_is_remembered_for_short_texts_and_handed_out_as_a_copy(tiny_engine):
    encoder = ShortestEncoder(tiny_engine.compiler.tokenizer, tiny_engine.compiler.vocab_size)
    text = '", "age": 0}'
    first = encoder(text)
    first.append(-1)  # the caller's list, not the remembered one
    assert encoder(text) == encoder._shortest(text) == first[:-1]
    assert encoder._spelled.cache_info().hits == 1
    long = "y" * (REMEMBERED_CHARS + 1)
    assert encoder(long) == encoder._shortest(long)
    assert encoder._spelled.cache_info().currsize == 1  # too long to keep


def test_patterns_get_a_shortest_example_and_a_completion_that_follows_their_layout():
    closer = JsonCloser({"type": "object", "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]{4}$"}},
                         "required": ["number"]}, _encode)
    assert closer.min_text == '{"number":"INV-0000"}'
    assert closer.completion(closer.feed(closer.start, '{"number":"INV-12')) == '00"}'
    assert regex_example(r"^\d{5}(-\d{4})?$") == "00000"
    assert regex_example(r"^(https?)://[^ ]+$") == "http://a"


def test_a_pattern_it_cannot_satisfy_leaves_no_completion_rather_than_a_wrong_one():
    closer = JsonCloser({"type": "string", "pattern": "^(?!x)[0-9]{3}-x$", "minLength": 9}, _encode)
    assert closer.min_text is None
    assert closer.min_tokens is None


def _request(schema, seed, max_tokens, close=True, temperature=1.0, **sampling):
    return GenerationRequest(prompt="Answer in JSON.", constraint=parse_constraint({"type": "json_schema",
                                                                                   "schema": schema}),
                             sampling=SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                                     close_json=close, **sampling))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_with_closing_every_response_validates_and_fits_max_tokens(tiny_engine, name):
    schema = SCHEMAS[name]
    budget = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": schema})).min_tokens + 12
    results = tiny_engine.generate([_request(schema, seed, budget) for seed in range(4)])
    for result in results:
        assert result.finish_reason == "stop", result.text
        assert result.valid is True, result.text
        assert result.usage.completion_tokens <= budget
        jsonschema.validate(json.loads(result.text), schema)
    assert any(r.closed_early for r in results)  # the tiny model never finishes these by itself


def test_without_closing_the_ones_that_run_out_report_length_and_are_not_valid(tiny_engine):
    results = tiny_engine.generate([_request(SCHEMAS["free_text"], seed, 24, close=False) for seed in range(4)])
    cut = [r for r in results if r.finish_reason == "length"]
    assert cut, [r.text for r in results]
    for result in cut:
        assert result.valid is False and not result.closed_early
        assert result.usage.completion_tokens == 24


def test_a_budget_below_the_schemas_minimum_is_a_400_that_says_how_many_tokens_it_needs(tiny_engine):
    needed = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": SCHEMAS["nested"]})).min_tokens
    with pytest.raises(InvalidRequestError, match=f"takes {needed} tokens") as caught:
        tiny_engine.generate([_request(SCHEMAS["nested"], 0, needed - 1)])
    assert caught.value.param == "max_tokens" and caught.value.status_code == 400
    [ok] = tiny_engine.generate([_request(SCHEMAS["nested"], 0, needed)])
    assert ok.valid is True and ok.usage.completion_tokens <= needed


# Schemas with a shortest instance written out (checked by jsonschema), beside the closer's.
SHORTEST = [({"const": 1.0}, "1"), ({"enum": [1000000, 20]}, "1e6"),
            ({"type": "object", "minProperties": 3}, '{"":0,"a":0,"b":0}'),
            ({"type": "array", "prefixItems": [{"const": "abc"}], "items": {"type": "boolean"}, "minItems": 3},
             '["abc",true,true]'),
            ({"type": "array", "contains": {"const": 7}, "minContains": 2}, "[7,7]"),
            ({"allOf": [{"type": "string", "minLength": 4}, {"type": "string", "maxLength": 9}]}, '"abcd"')]
SHORTEST += [(schema, JsonCloser(schema, _encode, ENFORCED_FORMATS).min_text) for schema in SCHEMAS.values()]


@pytest.mark.parametrize(("schema", "text"), SHORTEST)
def test_the_counted_lower_bound_never_exceeds_a_real_shortest_output(schema, text):
    plan = plan_constraint(parse_constraint({"type": "json_schema", "schema": schema}), LimitsConfig(),
                           BackendDefaults(), installed_backends())
    jsonschema.validate(json.loads(text), schema)
    assert 1 <= least_chars(plan) <= len(text)


@pytest.mark.parametrize("schema", [{"const": "x" * 200_000}, {"type": "string", "minLength": 100_000},
                                    {"type": "array", "minItems": 100_000, "items": {"enum": ["ab", "cd"]}}])
def test_a_budget_that_cannot_fit_a_huge_minimum_is_refused_before_any_compile(tiny_engine, schema):
    compiled_before = len(tiny_engine.cache)
    with pytest.raises(InvalidRequestError, match="takes at least [0-9]+ tokens") as caught:
        tiny_engine.generate([_request(schema, 0, 64)])
    assert caught.value.code == "max_tokens_too_small" and len(tiny_engine.cache) == compiled_before


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 3.0}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 2.0}, {"no_repeat_ngram_size": 2}])
def test_penalties_change_outputs_and_never_break_the_constraint(tiny_engine, penalty):
    schema = SCHEMAS["free_text"]
    base = [r.text for r in tiny_engine.generate([_request(schema, s, 60, temperature=0.0) for s in range(2)])]
    results = tiny_engine.generate([_request(schema, s, 60, temperature=0.0, **penalty) for s in range(2)])
    assert [r.text for r in results] != base
    for result in results:
        assert result.valid is True and result.finish_reason == "stop", result.text


def test_no_repeat_ngram_size_removes_repeated_pairs_from_free_text(tiny_engine):
    from serve_app.generation import GenerationRequest as Req

    def pairs(ids):
        return [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]

    [loose] = tiny_engine.generate([Req(prompt="a", sampling=SamplingParams(max_new_tokens=60, temperature=0))])
    [tight] = tiny_engine.generate([Req(prompt="a", sampling=SamplingParams(max_new_tokens=60, temperature=0,
                                                                            no_repeat_ngram_size=2))])
    assert len(set(pairs(loose.token_ids))) < len(pairs(loose.token_ids))  # greedy tiny model loops
    assert len(set(pairs(tight.token_ids))) == len(pairs(tight.token_ids))


@pytest.mark.parametrize("backend", installed_backends())
def test_closing_works_with_every_installed_backend(tiny_engine, backend):
    """The distance is computed from the schema; each backend's matcher validates the forced
    tokens (xgrammar's grammar wants ", " and ": ", so its closer writes those)."""
    schema = SCHEMAS["free_text"]
    constraint = parse_constraint({"type": "json_schema", "schema": schema, "backend": backend})
    results = tiny_engine.generate([GenerationRequest(prompt="x", constraint=constraint, sampling=SamplingParams(
        max_new_tokens=20, seed=seed, temperature=1)) for seed in range(3)])
    for result in results:
        assert result.backend == backend
        assert result.finish_reason == "stop" and result.valid is True, result.text
        assert result.usage.completion_tokens <= 20
    assert sum(r.closed_early for r in results) >= 2  # the random model's strings run long: closing ends them


def test_a_backtracking_pattern_cannot_stall_closing_or_the_output_check():
    """``^(a|aa)+$`` takes exponential time in a backtracking engine on "aaaa...b"; the closer
    runs patterns at every step, so each check is time-limited and undecided means not valid."""
    import time

    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a|aa)+$"}}, "required": ["s"]}
    closer = JsonCloser(schema, _encode)
    started = time.perf_counter()
    stack = closer.feed(closer.start, '{"s":"' + "a" * 40 + "b")
    assert closer.completion(stack) is None  # nothing after the "b" can match
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    assert constraint.is_satisfied_by('{"s":"' + "a" * 40 + 'b"}') is False
    assert constraint.is_satisfied_by('{"s":"aaa"}') is True
    assert time.perf_counter() - started < 5


def test_answers_hold_only_declared_properties_unless_the_request_allows_others(tiny_engine):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}}}
    declared = [_request(schema, seed, 48, temperature=1.5) for seed in range(6)]
    for result in tiny_engine.generate(declared):
        assert result.valid is True and set(json.loads(result.text)) <= {"name", "age"}, result.text
        assert any("declared properties only" in r for r in result.rewrites)
    allowed = [r.model_copy(update={"constraint": r.constraint.model_copy(update={"undeclared_properties": True})})
               for r in declared]
    texts = [result.text for result in tiny_engine.generate(allowed)]
    assert any(set(json.loads(t)) - {"name", "age"} for t in texts if t.endswith("}"))  # the random model wanders


def test_a_fraction_ending_in_zero_closes_with_a_last_nonzero_digit():
    """llguidance writes bounded numbers' fractions without trailing zeros: it refuses "}" after "0.30"."""
    closer = JsonCloser({"type": "object", "properties": {"r": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                         "required": ["r"], "additionalProperties": False}, _encode, ENFORCED_FORMATS)
    assert closer.completion(closer.feed(closer.start, '{"r":0.30')) == "1}"
    assert closer.completion(closer.feed(closer.start, '{"r":0.35')) == "}"
    assert closer.completion(closer.feed(closer.start, '{"r":1.0')) == "}"  # 1.01 would pass the maximum


def test_a_character_spelled_in_bytes_at_the_budgets_edge_is_finished_and_then_closed(tiny_engine):
    """A character begun with room to finish it is finished (it once gave up there: the output ran
    to `length`); one begun without that room is not: the output closes before it."""
    from serve_app.engine.row_closing import MAX_CONTINUATION_BYTES, UNKNOWN_SLACK, RowCloser

    story = parse_constraint({"type": "json_schema", "schema": {
        "type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}})
    closer = tiny_engine.enforce(story).closer
    accept = lambda tokens: True  # noqa: E731 - the matcher's answer here: any completion
    row = RowCloser(closer)
    assert row.choose(1, '{"story":"a', 100, accept) == 1
    edge = row.last_known + UNKNOWN_SLACK + 1  # the last remaining count the old slack allowed
    for step, text in enumerate(['{"story":"a\ufffd', '{"story":"a\ufffd', '{"story":"a\ufffd']):
        assert row.choose(1, text, edge - step, accept) == 1 and not row.gave_up
    assert row.choose(1, '{"story":"a€', edge - 3, accept) == 1 and row.plan == '"}'
    late = RowCloser(closer)
    late.choose(1, '{"story":"a', 100, accept)
    forced = late.choose(1, '{"story":"a\ufffd', late.last_known + MAX_CONTINUATION_BYTES, accept)
    assert late.closed_early and not late.gave_up and forced != 1


FORMAT_INSTANCES = {
    "date": ["2024-02-29"], "time": ["08:30:06Z", "08:30:06.25+02:00", "23:59:59-05:30"],
    "date-time": ["2024-02-29T08:30:06Z", "2024-02-29T08:30:06.5-05:30"],
    "duration": ["P1Y2M3DT4H5M6S", "PT36H", "P3W"], "email": ["ab.c@ex-ample.com"],
    "hostname": ["a-b.example.com", "xn--bcher-kva.example"], "ipv4": ["192.168.10.1"],
    "ipv6": ["2001:db8::8a2e:370:7334", "fe80::1"], "uri": ["https://ex.com/a/b?q=1#f", "urn:isbn:0451450523"],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000"],
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_INSTANCES))
def test_every_prefix_of_a_formatted_string_closes_alone_and_under_max_properties(fmt):
    """Every format the grammar enforces (llguidance's set), each written several ways: a value cut
    anywhere (inside an offset, a fraction, between address groups, before a duration's unit) has
    a completion, also inside an object at its maxProperties."""
    from serve_app.constraints.keywords import SUPPORTED_FORMATS

    assert set(FORMAT_INSTANCES) == SUPPORTED_FORMATS["llguidance"]
    cases = [({"type": "string", "format": fmt}, value) for value in FORMAT_INSTANCES[fmt]]
    cases += [({"type": "object", "maxProperties": 2, "additionalProperties": {"type": "string", "format": fmt}},
               {"k": value, "m": value}) for value in FORMAT_INSTANCES[fmt]]
    for schema, instance in cases:
        closer = JsonCloser(schema, _encode, ENFORCED_FORMATS)
        check = jsonschema.Draft202012Validator(schema, format_checker=ENFORCED_FORMATS)  # the output check's formats
        text = json.dumps(instance, separators=(",", ":"))
        assert check.is_valid(instance)
        for cut in range(len(text) + 1):
            completion = closer.completion(closer.feed(closer.start, text[:cut]))
            assert completion is not None, (text[:cut], schema)
            assert check.is_valid(json.loads(text[:cut] + completion)), (text[:cut], completion)
