"""Keywords no grammar expresses, checked while generating (serve_app/constraints/checks.py): the
split of a schema into grammar and checks, the scan that finds the value a token closes, and the
tiny model forced into duplicates, double oneOf matches and `not` violations, recovering by
banning tokens and rolling back, or ending honestly."""

from __future__ import annotations

import json

import jsonschema
import pytest

from serve_app.constraints import parse_constraint
from serve_app.constraints.checks import ValueChecks, split_checks
from serve_app.constraints.keywords import iter_subschemas
from serve_app.constraints.plan import plan_schema
from serve_app.constraints.row_checks import CHECK_BUDGET, RowChecker
from serve_app.generation import GenerationRequest, SamplingParams

ORDER = ("llguidance", "xgrammar", "outlines_core")

TAGS = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "n": {"type": "integer", "not": {"const": 3}},
    "o": {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                    {"type": "object", "properties": {"b": {"type": "string"}}}]}}}


def test_the_grammar_loses_the_checked_keywords_and_oneof_becomes_anyof():
    split = split_checks(TAGS)
    assert split.sites == ("uniqueItems at #/properties/tags", "not at #/properties/n", "oneOf at #/properties/o")
    keys = {k for _, sub in iter_subschemas(split.grammar) for k in sub}
    assert not keys & {"uniqueItems", "not", "oneOf"}
    assert split.grammar["properties"]["o"]["anyOf"] == TAGS["properties"]["o"]["oneOf"]
    # Looser, never stricter: whatever the schema accepts, the grammar accepts.
    for instance in ({"tags": ["a", "b"]}, {"n": 4}, {"o": {"a": "x"}}, {"o": {"b": "y", "c": 1}}, {}):
        if jsonschema.Draft202012Validator(TAGS).is_valid(instance):
            assert jsonschema.Draft202012Validator(split.grammar).is_valid(instance)


def test_oneof_beside_anyof_keeps_both_and_if_takes_then_and_else_with_it():
    schema = {"anyOf": [{"type": "object"}, {"type": "array"}], "oneOf": [{"required": ["a"]}, {"minProperties": 1}],
              "if": {"required": ["x"]}, "then": {"required": ["y"]}, "else": {"maxProperties": 3}}
    split = split_checks(schema)
    # Whatever `if` says, "if and then" or "not-if and else" holds: the grammar keeps that much.
    assert split.grammar == {"anyOf": [{"type": "object"}, {"type": "array"}],
                             "allOf": [{"anyOf": [{"required": ["a"]}, {"minProperties": 1}]},
                                       {"anyOf": [{"allOf": [{"required": ["x"]}, {"required": ["y"]}]},
                                                  {"allOf": [{"type": "object", "properties": {"x": False}},
                                                             {"maxProperties": 3}]}]}]}
    assert split.sites == ("oneOf at #/", "if at #/")


def test_a_schema_no_backend_enforced_is_now_planned_with_checks():
    plan = plan_schema(TAGS, ORDER)
    assert plan.exact and plan.checks == split_checks(TAGS).sites and plan.checked is not None


def scan(schema, text, chunk=1, final=False):
    """Feed `text` in chunks as tokens; (violation, checker) at the first refused chunk."""
    checker = RowChecker(ValueChecks(schema, ()))
    for start in range(0, len(text), chunk):
        candidate = text[:start + chunk]
        violation = checker.trial(candidate, final=final and start + chunk >= len(text))
        if violation is not None:
            return violation, checker
        checker.commit(candidate)
    return None, checker


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_the_scan_finds_the_value_a_token_closes(chunk):
    ok, checker = scan(TAGS, '{"tags":["a","b\\"c"],"n":31,"o":{"a":"x","b":1}}', chunk)
    assert ok is None and checker.stats.evaluated == 4
    duplicate, _ = scan(TAGS, '{"tags":["a","b","a"]}', chunk)
    assert duplicate is not None and "duplicate item at /tags/2" in duplicate.what
    three, _ = scan(TAGS, '{"n":3,"tags":[]}', chunk)  # a number closes at the character after it
    assert three is not None and "/n" in three.what
    both, _ = scan(TAGS, '{"o":{"a":"x","b":"y"}}', chunk)  # matches both oneOf branches
    assert both is not None and "/o" in both.what


def test_duplicates_follow_json_schema_equality():
    unique = {"type": "array", "uniqueItems": True}
    assert scan(unique, '[{"a":1,"b":2},{"b":2,"a":1}]')[0] is not None  # key order does not count
    assert scan(unique, "[1,1.0]")[0] is not None  # nor the spelling of a number
    assert scan(unique, "[1,true,0,false,null]")[0] is None  # true is not 1
    assert scan(unique, '["a\\u0062","ab"]')[0] is not None  # escapes decode first


def test_a_root_scalar_is_checked_at_eos_and_rollbacks_stop_at_the_failing_values_parent():
    violation, _ = scan({"type": "integer", "not": {"const": 12}}, "12", final=True)
    assert violation is not None and violation.start_token == 0
    # Chunks: '{"' 'ta' 'gs' '":' '["' 'ab' '",' '"a' 'b"' -- the duplicate's first character is in chunk 7.
    violation, checker = scan(TAGS, '{"tags":["ab","ab"]}', chunk=2)
    assert violation is not None and violation.duplicate
    assert violation.start_token == 4 and violation.value_token == 7 and violation.children == (5, 7)
    checker.violation = violation  # (what the Checks policy records)
    assert checker.escalation(position=9) == 7  # a duplicate is written again at once, from its first token
    assert checker.rewrite_bans(7, list(range(100, 109))) == [107, 105]  # and cannot start as the first did
    # Rollbacks may reach the array's start: held back from streams from there.
    assert checker.floor() == 4 and checker.settled_chars() == 8


def generate(engine, schema, seeds=(None,), max_new_tokens=64, prompt="JSON:"):
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0) if s is None else
              SamplingParams(max_new_tokens=max_new_tokens, seed=s, temperature=1.0) for s in seeds]
    return engine.generate([GenerationRequest(prompt=prompt, constraint=constraint, sampling=p) for p in params])


def assert_valid(result, schema):
    assert result.finish_reason == "stop" and result.valid is True, (result.text, result.checks)
    jsonschema.validate(json.loads(result.text), schema)


def test_the_model_forced_into_duplicates_recovers(tiny_engine):
    schema = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "maxItems": 3, "uniqueItems": True}
    results = generate(tiny_engine, schema, seeds=(None, 0, 1, 2, 3))
    for result in results:
        assert_valid(result, schema)
        assert result.checks["keywords"] == ["uniqueItems at #/"] and not result.checks["exhausted"]
    # Greedy, the tiny model repeats an item: the check refused it and rolled the row back.
    assert results[0].checks["violations"] > 0 and results[0].checks["rollbacks"] > 0
    integers = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                "maximum": 9}, "minItems": 4, "maxItems": 4, "uniqueItems": True}}, "required": ["ids"],
                "additionalProperties": False}
    for result in generate(tiny_engine, integers, seeds=(None, 0, 1)):
        assert_valid(result, integers)


def test_a_double_oneof_match_is_refused_and_another_value_chosen(tiny_engine):
    schema = {"type": "object", "properties": {"v": {"oneOf": [{"enum": [1, 2, 3]}, {"enum": [3, 4, 5]}]},
                                               "w": {"oneOf": [{"type": "integer", "maximum": 5},
                                                               {"type": "integer", "minimum": 3}]}},
              "required": ["v", "w"], "additionalProperties": False}
    results = generate(tiny_engine, schema, seeds=(None, 0, 1, 2, 3, 4, 5, 6))
    for result in results:
        assert_valid(result, schema)
        assert result.checks["evaluated"] >= 1
    assert sum(r.checks["violations"] for r in results) > 0  # 3, or 3..5, came up and was refused


def test_not_is_checked_when_its_value_closes(tiny_engine):
    # The tiny model starts its strings with ':' (greedy and most seeds): refused, it writes another.
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6,
                                                        "not": {"pattern": "^:"}}},
              "required": ["name"], "additionalProperties": False}
    results = generate(tiny_engine, schema, seeds=(None, 0, 1, 2))
    for result in results:
        assert_valid(result, schema)
    assert sum(r.checks["violations"] for r in results) > 0


def test_what_no_output_can_pass_ends_honestly_within_the_budget(tiny_engine):
    # Past what normalisation proves (the items' values behind an anyOf, the same values listed twice
    # in another order): refused while generating, not with a 400.
    impossible = {"type": "array", "items": {"anyOf": [{"const": "a"}, {"const": "b"}]}, "minItems": 3,
                  "maxItems": 3, "uniqueItems": True}
    both = {"type": "object", "properties": {"v": {"oneOf": [{"enum": [1, 2]}, {"enum": [2, 1]}]}}, "required": ["v"]}
    for schema in (impossible, both):
        [result] = generate(tiny_engine, schema)
        assert result.finish_reason == "length" and result.valid is False
        assert result.checks["exhausted"] is True and result.checks["violations"] <= CHECK_BUDGET
    status = tiny_engine.status().model_dump()["checks"]
    assert status["exhausted"] >= 2 and status["violations"] > 0 and status["rollbacks"] > 0


def test_a_stream_never_sends_what_a_rollback_takes_back(tiny_engine):
    schema = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "maxItems": 3, "uniqueItems": True}
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    submission = tiny_engine.submit(GenerationRequest(prompt="JSON:", constraint=constraint,
                                                      sampling=SamplingParams(max_new_tokens=64, temperature=0)))
    deltas = []
    while True:
        kind, value = submission.stream.events.get(timeout=60)
        if kind == "delta":
            deltas.append(value)
        elif kind != "logprobs":
            break
    assert kind == "done" and "".join(deltas) == value.text
    assert len(set(json.loads(value.text))) == 3


def test_closing_offers_only_a_completion_that_passes_the_checks(tiny_engine):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"},
                                                       "uniqueItems": True}},
              "required": ["ids"], "additionalProperties": False}
    results = generate(tiny_engine, schema, seeds=(None, 0, 1, 2), max_new_tokens=16)
    for result in results:
        assert_valid(result, schema)
    assert any(r.closed_early for r in results)


def test_property_names_and_counts_are_checked_per_key():
    names = {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "maxProperties": 2,
             "properties": {"a": {}, "b": {}, "c": {}}}
    split = split_checks(names)
    assert split.sites == ("propertyNames at #/", "maxProperties at #/") and "maxProperties" not in split.grammar
    bad_key, checker = scan(names, '{"a":1,"B":2}')
    assert bad_key is not None and "(propertyNames, unevaluatedProperties): 'B'" in bad_key.what
    assert bad_key.children == (2, len('{"a":1,"'))  # where each name's first character is
    checker.violation = bad_key
    for refusal in range(1, 5):  # refused again and again: then the name is written again
        assert checker.escalation(position=11) == (8 if refusal == 4 else None)
    third, _ = scan(names, '{"a":1,"b":2,"c":3}')
    assert third is not None and "maxProperties" in third.what and third.start_token == 0
    assert scan(names, '{"a":1,"b":2}')[0] is None
    # Every declared property required: llguidance enforces the counts itself, the grammar keeps them.
    closed = {"type": "object", "properties": {"a": {}}, "required": ["a"], "maxProperties": 1}
    assert plan_schema(closed, ORDER).checks == ()


def test_min_properties_the_grammar_lacks_are_reached_by_refusing_the_close(tiny_engine):
    schema = {"type": "object", "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in "abc"},
              "additionalProperties": False, "minProperties": 2}
    results = generate(tiny_engine, schema, seeds=(None, 2, 3))
    for result in results:
        assert_valid(result, schema)
    assert results[0].checks["violations"] > 0  # greedy, the tiny model closes after one property


def test_a_check_whose_regex_cannot_finish_refuses_instead_of_stalling_the_loop():
    # `not` of a backtracking pattern: deciding it takes ~2**40 steps; undecided within the time limit, the
    # value is refused (a row would then write another one, or end honestly), never accepted unproven.
    schema = {"type": "object", "properties": {"s": {"type": "string", "not": {"pattern": "^(a|a)*$"}}}}
    violation, _ = scan(schema, '{"s":"' + "a" * 40 + '!"}', chunk=100)
    assert violation is not None
    assert scan(schema, '{"s":"b"}', chunk=100)[0] is None


@pytest.mark.parametrize(("schema", "may"), [
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}, False),
    ({"type": "array", "items": {"type": "string"}}, False),
    ({"type": "object", "properties": {"a": {"enum": [{"k": 1}]}}, "additionalProperties": False}, False),
    ({"anyOf": [{"type": "string"}, {"$ref": "#/$defs/n"}], "$defs": {"n": {"type": "integer"}}}, False),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False}, True),  # any JSON under a
    ({"type": "object", "additionalProperties": {"type": "integer"}}, True),
    ({"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False}, True),
    ({"type": "array", "prefixItems": [{"type": "integer"}]}, True),  # items after it: any JSON
])
def test_rows_are_scanned_for_repeated_names_where_the_grammar_may_write_any(schema, may):
    from serve_app.constraints.checks import may_repeat_keys

    assert may_repeat_keys(schema) is may
    plan = plan_schema(schema, ORDER)
    assert (plan.checked is not None) is may and plan.checks == ()


def test_an_open_key_is_held_back_from_a_stream_until_it_closes():
    checker = RowChecker(ValueChecks({"type": "object", "additionalProperties": {"type": "integer"}}, ()))
    for token in ('{"x"', ':1', ',"x'):
        assert checker.trial(checker.text + token) is None
        checker.commit(checker.text + token)
    assert checker.settled_chars() == len('{"x":1')  # the repeated name's quote may be written again
    violation = checker.trial(checker.text + '":')
    assert violation is not None and "a key the object already has: 'x'" in violation.what
    assert violation.start_token == 2


@pytest.mark.parametrize(("patterns", "overlap"), [
    ({"^a": {}, "^ab": {}}, True),
    ({"^a": {}, "b$": {}}, True),
    ({"x": {}, "^y": {}}, True),  # (search semantics: "yx" matches both)
    ({"^x-": {}, "^y-": {}}, False),
    ({"^[a-z]+$": {}, "^[0-9]+$": {}}, False),
    ({"^[^/]+$": {}, "/": {}}, False),
    ({"^a": {}}, False),
    ({"(?=a)": {}, "^a": {}}, True),  # ("a" matches both; llguidance then refuses the lookaround)
    ({"^a$": {}, "^b$": {}, "^c+$": {}}, False),
])
def test_overlapping_pattern_properties_are_found(patterns, overlap):
    from serve_app.constraints.checks import overlapping_patterns

    assert overlapping_patterns(patterns) is overlap


def test_finding_overlaps_builds_no_automaton_so_a_hostile_regex_costs_nothing():
    """A DFA for `.*a[ab]{n}` has 2**n states (the first version built them: minutes at n = 12)."""
    import time

    from serve_app.constraints.checks import overlapping_patterns

    started = time.monotonic()
    hostile = {f".*a{'[ab]' * 40}": {}, f".*b{'[ab]' * 40}x": {}, "^(a+)+$": {}, "(x|x)*y": {}}
    assert overlapping_patterns(hostile) is True
    assert time.monotonic() - started < 5  # (milliseconds here; the bound is MAX_COMPARE_S)


def test_overlapping_pattern_properties_leave_one_regex_in_the_grammar_and_a_check():
    schema = {"type": "object", "patternProperties": {"^a": {"type": "integer"}, "b$": {"minimum": 5}},
              "additionalProperties": False}
    plan = plan_schema(schema, ORDER)
    assert plan.exact[0] == "llguidance" and plan.checks == ("patternProperties at #/",)
    assert plan.schema["patternProperties"] == {"(?:^a)|(?:b$)": {"anyOf": [{"type": "integer"}, {"minimum": 5}]}}
    assert scan(schema, '{"ab":3}', final=True)[0] is not None
    assert scan(schema, '{"ab":7}', final=True)[0] is None
