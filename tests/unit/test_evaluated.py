"""unevaluatedProperties / unevaluatedItems where what is evaluated depends on the branches
(evaluated.py): planned with checks, a grammar never tighter than the schema, and checks (each
key as it closes, each value at its close) whose verdict is jsonschema's on every instance."""

from __future__ import annotations

import itertools
import json
from typing import Any

import jsonschema
import pytest

from serve_app.constraints import parse_constraint
from serve_app.constraints.checks import ValueChecks
from serve_app.constraints.plan import plan_schema
from serve_app.constraints.row_checks import RowChecker
from serve_app.generation import GenerationRequest, SamplingParams

ORDER = ("llguidance", "outlines_core")
A, B = {"a": {"type": "integer"}}, {"b": {"type": "string"}}


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), **more}


NODE = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "maxItems": 1,
                                                                          "items": {"$ref": "#/$defs/node"}}},
        "anyOf": [{"required": ["v"]}, {"required": ["kids"]}], "unevaluatedProperties": False}
SCHEMAS = {
    "anyOf": {"type": "object", "anyOf": [obj(A), obj(B)], "unevaluatedProperties": False},
    "oneOf": {"type": "object", "oneOf": [obj(A), obj(B)], "unevaluatedProperties": False},
    "if": {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}}, "required": ["kind"],
           "if": {"properties": {"kind": {"const": "x"}}}, "then": {"properties": A},
           "else": {"properties": B}, "unevaluatedProperties": False},
    "dependentSchemas": {"type": "object", "properties": A, "dependentSchemas": {"a": {"properties": B}},
                         "unevaluatedProperties": {"type": "string"}},
    "nested": {"type": "object", "properties": {"x": {"anyOf": [obj(A), obj(B)], "unevaluatedProperties": False}}},
    "in a branch": {"type": "object", "anyOf": [obj(A, anyOf=[{"properties": {"c": {"type": "integer"}}}, {}],
                                                    unevaluatedProperties=False), obj(B)]},
    "patternProperties": {"type": "object", "anyOf": [{"patternProperties": {"^n_": {"type": "integer"}}}, obj(A)],
                          "unevaluatedProperties": False},
    "$ref": {"$defs": {"base": {"properties": A}}, "type": "object",
             "anyOf": [{"$ref": "#/$defs/base", "required": ["a"]}, obj(B)], "unevaluatedProperties": False},
    "recursive": {"$defs": {"node": NODE}, "$ref": "#/$defs/node"},
}
KEYS = {"a": (1, "s"), "b": ("s", 1), "c": (1, "s"), "kind": ("x", "y"), "n_1": (1, "s"), "v": (1,),
        "kids": ([], [{"v": 1}], [{"v": 1, "c": 2}])}


def instances(keys: list[str]) -> list[Any]:
    """Every object of up to three of `keys`, each with every value it may take here."""
    out: list[Any] = []
    for size in range(4):
        for chosen in itertools.combinations(keys, size):
            for values in itertools.product(*(KEYS[k] for k in chosen)):
                out.append(dict(zip(chosen, values, strict=True)))
    return out


def checked(checks: ValueChecks, text: str) -> bool:
    """Whether the checks let `text` be written (fed 3 characters a token) and end there."""
    checker = RowChecker(checks)
    for start in range(0, len(text), 3):
        final = start + 3 >= len(text)
        if checker.trial(text[:start + 3], final=final) is not None:
            return False
        checker.commit(text[:start + 3])
    return True


def needs_two_branches(schema: dict[str, Any], instance: Any) -> bool:
    """Whether two `anyOf` branches hold (the grammar closes each branch to what it evaluates)."""
    if "x" in schema.get("properties", {}):
        schema, instance = schema["properties"]["x"], instance.get("x")
    branches = schema.get("anyOf", [])
    validator = jsonschema.Draft202012Validator(schema)
    return sum(validator.evolve(schema=b).is_valid(instance) for b in branches) > 1


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_grammar_and_checks_together_give_jsonschemas_verdict(name: str) -> None:
    """The grammar (as a schema) and the checks (fed the text) accept exactly the valid instances,
    but for those whose keys only two `anyOf` branches together evaluate: the grammar leaves them out."""
    schema = SCHEMAS[name]
    plan = plan_schema(schema, ORDER)
    assert plan.exact[0] == "llguidance" and any(site.startswith("unevaluated") for site in plan.checks), plan.checks
    assert plan.checked is not None
    checks, grammar = ValueChecks(plan.checked, plan.checks), jsonschema.Draft202012Validator(plan.schema)
    keys = [k for k in KEYS if f'"{k}"' in json.dumps(schema)] + ["c"]
    cases = instances(list(dict.fromkeys(keys)))
    if name == "nested":
        cases = [{"x": case} for case in cases]
    verdicts = {True: 0, False: 0}
    for instance in cases:
        valid = jsonschema.Draft202012Validator(schema).is_valid(instance)
        accepted = grammar.is_valid(instance) and checked(checks, json.dumps(instance, separators=(",", ":")))
        assert accepted is valid or (valid and needs_two_branches(schema, instance)), (instance, valid)
        verdicts[valid] += 1
    assert verdicts[True] and verdicts[False], verdicts


def test_each_branch_is_closed_to_what_it_and_the_object_around_it_may_evaluate() -> None:
    plan = plan_schema({**SCHEMAS["anyOf"], "properties": {"c": {"type": "integer"}}}, ORDER)
    assert plan.checks == ("unevaluatedProperties at #/",)
    assert [(set(b["properties"]), b["additionalProperties"]) for b in plan.schema["anyOf"]] == [
        ({"a", "c"}, False), ({"b", "c"}, False)]
    # With two groups of branches, the object is closed to what any branch may evaluate.
    both = plan_schema({**SCHEMAS["anyOf"], "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, ORDER)
    assert set(both.schema["properties"]) == {"a", "b"} and both.schema["additionalProperties"] is False
    # A branch that evaluates everything stays open.
    open_branch = plan_schema({"type": "object", "anyOf": [obj(A), {"additionalProperties": True}],
                               "unevaluatedProperties": False}, ORDER)
    assert open_branch.schema["anyOf"][1] == {"additionalProperties": {}}


def test_a_key_nothing_may_evaluate_is_refused_as_it_closes_before_its_value() -> None:
    plan = plan_schema({**SCHEMAS["anyOf"], "properties": {"c": {"type": "integer"}}}, ORDER,
                       declared_only=True)
    assert plan.checked is not None
    checker = RowChecker(ValueChecks(plan.checked, plan.checks))
    for text in ('{"a":1', '{"a":1,"d"'):
        violation = checker.trial(text)
        if violation is not None:
            break
        checker.commit(text)
    assert text == '{"a":1,"d"' and violation is not None and "'d' at /" in violation.what


@pytest.mark.parametrize("name", ["anyOf", "if", "in a branch"])
def test_generated_answers_are_valid(tiny_engine: Any, name: str) -> None:
    constraint = parse_constraint({"type": "json_schema", "schema": SCHEMAS[name]})
    results = tiny_engine.generate([GenerationRequest(prompt="JSON:", constraint=constraint, sampling=SamplingParams(
        max_new_tokens=48, temperature=1, seed=seed)) for seed in range(4)])
    for result in results:
        assert result.finish_reason == "stop" and result.valid is True, result
        jsonschema.validate(json.loads(result.text), SCHEMAS[name])


def test_a_name_only_a_conditional_subschema_declares_gets_that_subschema_in_the_grammar() -> None:
    plan = plan_schema(SCHEMAS["dependentSchemas"], ORDER)  # (b's subschema or the rest's, both strings: one)
    assert plan.schema["properties"]["b"] == {"type": "string"}
    assert plan.schema["additionalProperties"] == {"type": "string"}
    mixed = plan_schema({**SCHEMAS["dependentSchemas"], "unevaluatedProperties": {"type": "boolean"}}, ORDER)
    assert mixed.schema["properties"]["b"] == {"anyOf": [{"type": "string"}, {"type": "boolean"}]}
    closed = plan_schema({**SCHEMAS["dependentSchemas"], "unevaluatedProperties": False}, ORDER)
    assert closed.schema["properties"]["b"] == {"type": "string"} and closed.schema["additionalProperties"] is False


def test_each_branch_of_an_array_evaluating_only_its_prefix_items_is_closed_after_them() -> None:
    schema = {"type": "array", "anyOf": [{"prefixItems": [{"type": "integer"}]},
                                         {"prefixItems": [{"type": "string"}, {"type": "string"}]}],
              "unevaluatedItems": False}
    plan = plan_schema(schema, ORDER)
    assert [branch["items"] for branch in plan.schema["anyOf"]] == [False, False]
    assert plan.checks == ("unevaluatedItems at #/",)
    # An item keyword beside the branches: the grammar leaves the items open, the check decides.
    beside = plan_schema({**schema, "contains": {"type": "integer"}}, ORDER)
    assert all("items" not in branch for branch in beside.schema["anyOf"])
