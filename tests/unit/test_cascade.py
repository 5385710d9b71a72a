"""The JSON Schema cascade: normalise, then the first backend that enforces the schema exactly;
fall through on errors, approximations and timeouts; reject by keyword and pointer; cache
failures; approximate only when a request says strict: false."""

import json
from pathlib import Path

import jsonschema
import pytest

from serve_app.constraints import BackendDefaults, LimitsConfig, installed_backends, parse_constraint, plan_constraint
from serve_app.constraints.keywords import unsupported_keywords
from serve_app.constraints.plan import plan_schema
from serve_app.errors import ConstraintError, LimitExceededError
from serve_app.generation import GenerationRequest, SamplingParams

ORDER = ("llguidance", "outlines_core")

# Shapes that real API, config, Kubernetes and event schemas have, each of which at least one
# backend cannot take as written (public domain, written for these tests).
REAL_WORLD_SHAPES = {
    "openapi_discriminated_oneOf": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "card"}, "last4": {"type": "string", "maxLength": 4}},
         "required": ["kind", "last4"]},
        {"type": "object", "properties": {"kind": {"const": "iban"}, "iban": {"type": "string", "maxLength": 34}},
         "required": ["kind", "iban"]}]},
    "openapi_int64_and_nullable": {"type": "object", "properties": {
        "id": {"type": "integer", "format": "int64"}, "note": {"type": ["string", "null"], "maxLength": 20},
        "price": {"type": "number", "format": "double", "minimum": 0}}, "required": ["id"]},
    "k8s_int_or_string": {"type": "object", "description": "ServicePort", "properties": {
        "port": {"type": "integer", "format": "int32", "description": "the port"},
        "targetPort": {"oneOf": [{"type": "string", "maxLength": 15}, {"type": "integer"}],
                       "x-kubernetes-int-or-string": True}}, "required": ["port"]},
    "descriptions_everywhere": {"type": "object", "properties": {
        "metadata": {"description": "anything goes"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 10}, "maxProperties": 2}},
        "required": ["metadata"]},
    "draft04_exclusive_bounds": {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
                                 "properties": {"ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                                          "maximum": 1}}, "required": ["ratio"]},
    "dependencies_array": {"type": "object", "properties": {"card": {"type": "string", "maxLength": 8},
                                                            "cvv": {"type": "string", "maxLength": 4}},
                           "dependentRequired": {"card": ["cvv"]}},
    "refs_with_definitions": {"definitions": {"addr": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}, "type": "object",
        "properties": {"home": {"$ref": "#/definitions/addr"}, "work": {"$ref": "#/definitions/addr"}},
        "required": ["home"]},
    "unique_items_of_one": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 1, "uniqueItems": True},
    "event_with_date_time": {"type": "object", "properties": {"type": {"const": "order.paid"},
                                                              "at": {"type": "string", "format": "date-time"}},
                             "required": ["type", "at"]},
    # if/then/else and not, rewritten into what backends enforce (normalize.py: conditional, negation)
    "payment_if_then_else": {"type": "object", "required": ["method"], "properties": {
        "method": {"enum": ["card", "bank"]}, "last4": {"type": "string", "maxLength": 4},
        "iban": {"type": "string", "maxLength": 12}}, "additionalProperties": False,
        "if": {"properties": {"method": {"const": "card"}}, "required": ["method"]},
        "then": {"required": ["last4"]}, "else": {"required": ["iban"]}},
    "contact_exactly_one_of": {"type": "object", "additionalProperties": False, "properties": {
        "email": {"type": "string", "maxLength": 10}, "phone": {"type": "string", "maxLength": 10}},
        "oneOf": [{"required": ["email"]}, {"required": ["phone"]}]},
    "not_required_and_not_enum": {"type": "object", "properties": {
        "status": {"enum": ["open", "closed", "deleted"], "not": {"const": "deleted"}},
        "legacy_id": {"type": "integer"}}, "required": ["status"], "not": {"required": ["legacy_id"]}},
}
CORPUS = Path(__file__).resolve().parents[2] / "bench" / "data" / "schema_corpus.json"


def test_a_schema_every_backend_takes_is_planned_for_all_in_order():
    plan = plan_schema({"type": "object", "properties": {"a": {"type": "string"}}}, ORDER)
    assert plan.exact == ORDER and not plan.missing


def test_normalisation_lets_backends_take_schemas_they_refuse_as_written():
    schema = REAL_WORLD_SHAPES["openapi_int64_and_nullable"]
    assert unsupported_keywords(schema, "llguidance") == [("format: int64", "/properties/id"),
                                                          ("format: double", "/properties/price")]
    assert plan_schema(schema, ORDER).exact == ("llguidance",)  # outlines_core ignores `minimum`
    assert any("int64" in rewrite for rewrite in plan_schema(schema, ORDER).rewrites)


def test_a_keyword_no_backend_enforces_is_a_400_naming_keyword_and_pointer():
    schema = {"type": "object", "properties": {"tags": {"type": "integer", "minimum": 2}}}
    plan = plan_schema(schema, ("outlines_core",))  # (outlines_core ignores numeric bounds)
    assert plan.exact == ()
    error = plan.rejection()
    assert error.status_code == 400
    assert "'minimum' at #/properties/tags" in error.message and "strict: false" in error.message


@pytest.mark.parametrize("name", list(REAL_WORLD_SHAPES))
def test_real_world_shapes_compile_exactly_and_generate_valid_output(tiny_engine, name):
    schema = REAL_WORLD_SHAPES[name]
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    compiled = tiny_engine.compile(constraint)
    assert compiled.approximated == ()
    sampled = [SamplingParams(max_new_tokens=48, seed=seed, temperature=1) for seed in range(3)]
    results = tiny_engine.generate([GenerationRequest(prompt="JSON please", constraint=constraint, sampling=s)
                                    for s in sampled])
    for result in results:
        assert result.finish_reason == "stop" and result.valid is True, result.text
        jsonschema.validate(json.loads(result.text), schema)


def test_an_explicit_error_falls_through_to_the_next_backend(tiny_engine, monkeypatch):
    def refuse(constraint, timeout_s):
        raise ConstraintError("llguidance would only approximate this json_schema: test", code="approximated")

    monkeypatch.setattr(tiny_engine.compiler.backend("llguidance"), "_compile", refuse)
    schema = {"type": "object", "properties": {"fallthrough": {"enum": ["x", "y"]}}, "required": ["fallthrough"]}
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    cascade = BackendDefaults(cascade=["llguidance", "outlines_core"])
    compiled = tiny_engine.compiler.compile(plan_constraint(constraint, LimitsConfig(), cascade, installed_backends()))
    assert compiled.backend == "outlines_core"
    assert compiled.attempts == ("llguidance: llguidance would only approximate this json_schema: test",)
    # Greedy and seeded: the same output on every run (a sampled one once ran to `length`).
    [result] = tiny_engine.generate([GenerationRequest(prompt="x", constraint=constraint, sampling=SamplingParams(
        max_new_tokens=32, temperature=0, seed=0))])
    assert result.valid is True and json.loads(result.text)["fallthrough"] in ("x", "y")


def test_failures_are_cached_so_a_repeated_bad_schema_costs_nothing(tiny_engine, monkeypatch):
    schema = {"type": "object", "properties": {"ids": {"type": "integer", "minimum": 2}}}
    constraint = parse_constraint({"type": "json_schema", "schema": schema, "backend": "outlines_core"})
    with pytest.raises(ConstraintError, match="'minimum' at #/properties/ids"):
        tiny_engine.compile(constraint)
    calls = []
    monkeypatch.setattr(tiny_engine.compiler, "compile", lambda c: calls.append(c))
    hits = tiny_engine.failed_hits
    with pytest.raises(ConstraintError, match="'minimum' at #/properties/ids"):
        tiny_engine.compile(constraint)
    assert calls == [] and tiny_engine.failed_hits == hits + 1


def test_strict_false_approximates_says_what_and_still_checks_the_output(tiny_engine):
    # Every keyword is enforced by some backend now; one named by the request may lack it.
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]}
    constraint = parse_constraint({"type": "json_schema", "schema": schema, "strict": False,
                                   "backend": "outlines_core"})
    compiled = tiny_engine.compile(constraint)
    assert compiled.approximated
    results = tiny_engine.generate([GenerationRequest(prompt="x", constraint=constraint,
                                                      sampling=SamplingParams(max_new_tokens=24, seed=s, temperature=1))
                                    for s in range(8)])
    for result in results:
        assert result.approximated == list(compiled.approximated)
        if result.finish_reason != "stop":
            assert result.valid is False
            continue
        assert result.valid is (json.loads(result.text)["n"] >= 5)  # (an output that fails would be reported)


@pytest.mark.skipif(not CORPUS.exists(), reason="the real-world corpus is built locally (bench/data/schema_corpus.md)")
def test_every_corpus_schema_the_cascade_accepts_compiles_and_the_rest_get_a_pointer(tiny_engine):
    entries = json.loads(CORPUS.read_text())
    accepted = 0
    for entry in entries:
        constraint = parse_constraint({"type": "json_schema", "schema": entry["schema"]})
        try:
            tiny_engine.compile(constraint)
            accepted += 1
        except (ConstraintError, LimitExceededError) as error:
            assert error.status_code == 400
            assert " at #" in error.message or "json_schema" in error.message, (entry["id"], error.message)
    assert accepted > len(entries) // 2


KEYWORD_SAMPLE = CORPUS.parent / "keyword_sample.json"


def test_every_schema_of_the_keyword_sample_compiles_exactly_with_checks_while_generating(tiny_engine):
    """The committed sample the engines are compared on (docs/benchmarks.md) stays what it says:
    every schema accepted exactly, most with keywords checked while generating."""
    entries = json.loads(KEYWORD_SAMPLE.read_text())
    assert len(entries) == 30
    checked = 0
    for entry in entries:
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        compiled = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": entry["schema"]}))
        assert not compiled.approximated, entry["id"]
        checked += bool(compiled.plan.checks)
    assert checked >= 20


FRONTIER_SAMPLE = CORPUS.parent / "frontier_sample.json"


def test_every_schema_of_the_frontier_sample_compiles_exactly(tiny_engine):
    """The committed sample of shapes served since the schema-frontier work (docs/benchmarks.md):
    unevaluated* beside branches, overlapping patternProperties, dynamic references, open maps."""
    entries = json.loads(FRONTIER_SAMPLE.read_text())
    assert len(entries) == 10
    for entry in entries:
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        compiled = tiny_engine.compile(parse_constraint({"type": "json_schema", "schema": entry["schema"]}))
        assert compiled.backend == "llguidance" and not compiled.approximated, entry["id"]


def test_a_backend_that_is_not_installed_is_a_400_naming_what_is():
    constraint = parse_constraint({"type": "regex", "pattern": "a", "backend": "xgrammar"})
    with pytest.raises(ConstraintError, match="backend 'xgrammar' is not installed here; installed: llguidance") as e:
        plan_constraint(constraint, LimitsConfig(), BackendDefaults(), ("llguidance",))
    assert e.value.status_code == 400
