"""normalize_schema: each rewrite on its own, and on ~30 realistic schemas `jsonschema` gives the same verdict
before and after for many generated instances."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

import serve_app.constraints
from serve_app.constraints.checks import ValueChecks, split_checks
from serve_app.constraints.drafts import walk_schema
from serve_app.constraints.normalize import normalize_schema
from serve_app.constraints.row_checks import RowChecker

KNOWN = frozenset({"date-time", "date", "uuid", "email"})
D4 = "http://json-schema.org/draft-04/schema#"
D7 = "http://json-schema.org/draft-07/schema#"
D2019 = "https://json-schema.org/draft/2019-09/schema"


def _norm(schema: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return normalize_schema(schema, KNOWN, **kwargs).schema


def _validator(schema: Any) -> Validator:
    """The validator `$schema` names, 2020-12 without one, and no format checker (formats are annotations)."""
    return validator_for(schema, default=Draft202012Validator)(schema)


def _valid(schema: Any, instance: Any) -> bool:
    return _validator(schema).is_valid(instance)


# --- $ref ------------------------------------------------------------------------------------------------------

def test_local_refs_are_inlined_and_definitions_dropped() -> None:
    schema = {"$defs": {"name": {"type": "string", "maxLength": 5}},
              "properties": {"a": {"$ref": "#/$defs/name"}, "b": {"$ref": "#/properties/a"}}}
    result = normalize_schema(schema, KNOWN)
    name = {"type": "string", "maxLength": 5}
    assert result.schema == {"properties": {"a": name, "b": name}}
    assert "$ref #/$defs/name at #/properties/a inlined" in result.rewrites


def test_recursive_ref_points_at_a_defs_entry_of_the_output() -> None:
    node = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/definitions/node"}}}}
    out = _norm({"definitions": {"node": node}, "$ref": "#/definitions/node"})
    kept = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
    assert out == {**kept, "$defs": {"node": kept}}
    assert _valid(out, {"kids": [{"kids": []}]}) and not _valid(out, {"kids": [{"kids": 3}]})


def test_ref_to_the_root_stays_a_ref_to_the_root() -> None:
    schema = {"type": "object", "properties": {"next": {"$ref": "#"}, "note": {"description": "x"}}}
    assert _norm(schema) == {"type": "object", "properties": {"next": {"$ref": "#"}, "note": {}}}


def test_mutual_recursion_keeps_one_ref_per_cycle() -> None:
    schema = {"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/b"}},
                        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}},
              "$ref": "#/$defs/a"}
    out = _norm(schema)
    assert out["items"]["properties"]["a"] == {"$ref": "#/$defs/a"}
    items = {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}
    assert out["$defs"] == {"a": {"type": "array", "items": items}}


def test_recursive_targets_with_the_same_name_get_distinct_defs() -> None:
    schema = {"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}},
                        "b": {"$defs": {"a": {"type": "object", "properties": {"y": {"$ref": "#/$defs/b/$defs/a"}}}}}},
              "properties": {"p": {"$ref": "#/$defs/a"}, "q": {"$ref": "#/$defs/b/$defs/a"}}}
    out = _norm(schema)
    assert sorted(out["$defs"]) == ["a", "a_2"]
    assert _valid(out, {"p": {"x": {}}, "q": {"y": {"y": {}}}}) and not _valid(out, {"q": {"y": {"x": 1, "y": 2}}})


def test_the_constraint_language_imports_no_torch_and_no_backend() -> None:
    folder = Path(serve_app.constraints.__file__).parent
    modules = ", ".join(f"serve_app.constraints.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__")
    heavy = "{'torch', 'outlines', 'llguidance', 'outlines_core', 'xgrammar', 'transformers'}"
    code = f"import sys, {modules}; print(sorted({heavy} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_siblings_of_ref_are_ignored_in_draft_07() -> None:
    schema = {"$schema": D7, "definitions": {"s": {"type": "string"}},
              "properties": {"a": {"$ref": "#/definitions/s", "maxLength": 2}}}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"$schema": D7, "properties": {"a": {"type": "string"}}}
    assert "keywords next to $ref at #/properties/a dropped (ignored in draft-07)" in result.rewrites


def test_siblings_of_ref_apply_in_2020_merged_or_under_allof() -> None:
    schema = {"$defs": {"s": {"type": "string", "maxLength": 5}},
              "properties": {"a": {"$ref": "#/$defs/s", "minLength": 2}, "b": {"$ref": "#/$defs/s", "maxLength": 3}}}
    out = _norm(schema)
    assert out["properties"]["a"] == {"minLength": 2, "type": "string", "maxLength": 5}
    assert out["properties"]["b"] == {"maxLength": 3, "allOf": [{"type": "string", "maxLength": 5}]}


def test_ref_bomb_stops_inlining_at_max_nodes_and_keeps_refs_that_work() -> None:
    defs: dict[str, Any] = {f"d{i}": {"type": "object", "properties": {
        "a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(20)}
    schema = {"$defs": {**defs, "d20": {"type": "integer"}}, "$ref": "#/$defs/d0"}  # 2**20 subschemas inlined
    result = normalize_schema(schema, KNOWN, max_nodes=200)
    assert len(str(result.schema)) < 20_000
    assert any("inlining would pass max_nodes" in line for line in result.rewrites)
    for leaf, verdict in ((3, True), ("x", False)):
        deep: Any = leaf
        for key in "abababababbbbbaaaaab":
            deep = {key: deep}
        assert _valid(result.schema, deep) is _valid(schema, deep) is verdict


@pytest.mark.parametrize("schema", [
    {"properties": {"a": {"$ref": "https://example.com/other.json"}}},
    {"$defs": {"a": {"$id": "https://example.com/a", "type": "string"}}, "properties": {"a": {"$ref": "#/$defs/a"}}},
    {"$dynamicAnchor": "node", "properties": {"a": {"$dynamicRef": "#node"}}, "oneOf": [{"type": "object"}]},
    {"properties": {"a": {"$ref": "#/$defs/missing"}, "b": {"description": "x"}}},
    {"$schema": "http://json-schema.org/draft-03/schema#", "properties": {"a": {"description": "x"}}},
])
def test_refs_that_cannot_be_followed_exactly_leave_the_whole_schema_untouched(schema: dict[str, Any]) -> None:
    assert normalize_schema(schema, KNOWN) == normalize_schema(copy.deepcopy(schema), KNOWN)
    assert normalize_schema(schema, KNOWN).schema == schema
    assert normalize_schema(schema, KNOWN).rewrites == ()


def test_input_is_never_mutated_and_output_shares_nothing_mutable_with_it() -> None:
    schema = {"$defs": {"x": {"enum": [1, 2], "description": "d"}}, "type": "object", "required": ["a"],
              "properties": {"a": {"$ref": "#/$defs/x"}}, "dependentRequired": {"a": ["b"]}}
    before = copy.deepcopy(schema)
    out = _norm(schema)
    out["properties"]["a"]["enum"].append(3)
    assert schema == before


# --- annotations, booleans, formats -----------------------------------------------------------------------------

def test_annotation_only_subschemas_become_any_value() -> None:
    schema = {"type": "object", "title": "T", "properties": {
        "a": {"description": "free text", "default": 3, "x-kubernetes-preserve-unknown-fields": True},
        "b": {"title": "B", "examples": [1]}, "c": {}, "d": {"type": "string", "description": "kept"}}}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"type": "object", "title": "T", "properties": {
        "a": {}, "b": {}, "c": {}, "d": {"type": "string", "description": "kept"}}}
    assert "annotation-only subschema at #/properties/a -> {} (any value)" in result.rewrites


def test_root_keeps_its_identity_keys_when_annotation_only() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y", "description": "d"}
    assert _norm(schema) == {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y"}


def test_boolean_subschemas_true_becomes_empty_false_stays_and_not_empty_becomes_false() -> None:
    schema = {"properties": {"t": True, "f": False, "n": {"not": {}}, "nn": {"not": {"not": {}}},
                             "nt": {"not": True, "type": "string"}}}
    assert _norm(schema)["properties"] == {"t": {}, "f": False, "n": False, "nn": {}, "nt": False}


def test_draft04_has_no_boolean_schemas_so_not_empty_stays() -> None:
    schema = {"$schema": D4, "properties": {"n": {"not": {}}}}
    assert _norm(schema)["properties"] == {"n": {"not": {}}}


def test_unknown_formats_are_dropped_known_ones_kept() -> None:
    schema = {"properties": {"id": {"type": "integer", "format": "int64"}, "blob": {"format": "byte"},
                             "at": {"type": "string", "format": "date-time"}}}
    result = normalize_schema(schema, KNOWN)
    assert result.schema["properties"] == {"id": {"type": "integer"}, "blob": {},
                                           "at": {"type": "string", "format": "date-time"}}
    assert "format 'int64' at #/properties/id dropped (an unknown format is an annotation)" in result.rewrites


def test_keywords_from_other_drafts_are_dropped() -> None:
    schema = {"$schema": D7, "type": "array", "prefixItems": [{"type": "string"}], "dependentRequired": {"a": ["b"]},
              "then": {"type": "string"}, "minContains": 2}
    assert _norm(schema) == {"$schema": D7, "type": "array"}
    assert _norm({"$schema": D4, "const": 3, "type": "number"}) == {"$schema": D4, "type": "number"}
    assert _norm({"dependencies": {"a": ["b"]}, "additionalItems": False}) == {}


# --- oneOf ------------------------------------------------------------------------------------------------------

def test_oneof_with_disjoint_types_becomes_anyof() -> None:
    schema = {"oneOf": [{"type": "string"}, {"type": ["integer", "null"]}, {"enum": [True]}, {"type": "array"}]}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"anyOf": schema["oneOf"]}
    assert result.rewrites == ("oneOf at #/ -> anyOf (branches disjoint: types)",)


def test_oneof_with_a_discriminator_becomes_anyof() -> None:
    cat = {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}
    dog = {"type": "object", "properties": {"kind": {"enum": ["dog"]}, "bark": {"type": "boolean"}},
           "required": ["kind", "bark"]}
    schema = {"$defs": {"Cat": cat, "Dog": dog},
              "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}}}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"properties": {"pet": {"anyOf": [cat, dog]}}}
    assert "oneOf at #/properties/pet -> anyOf (branches disjoint: discriminator 'kind')" in result.rewrites


def test_discriminator_may_sit_in_an_allof_base_and_the_type_on_the_parent() -> None:
    base = {"required": ["kind"], "properties": {"kind": {"type": "string"}}}
    schema = {"type": "object", "oneOf": [{"allOf": [base, {"properties": {"kind": {"const": "a"}}}]},
                                          {"allOf": [base, {"properties": {"kind": {"const": "b"}}}]}]}
    assert "anyOf" in _norm(schema)


def test_oneof_of_a_recursive_ref_and_null_becomes_anyof() -> None:
    schema = {"$defs": {"node": {"type": "object", "properties": {
        "next": {"oneOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}}, "$ref": "#/$defs/node"}
    assert _norm(schema)["properties"]["next"] == {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}


def test_oneof_with_disjoint_values_becomes_anyof() -> None:
    schema = {"oneOf": [{"const": "a"}, {"enum": ["b", 1]}, {"const": 1.5}, {"enum": [{"x": 1}]}]}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"anyOf": schema["oneOf"]}
    assert result.rewrites == ("oneOf at #/ -> anyOf (branches disjoint: values, types)",)


@pytest.mark.parametrize("one_of", [
    [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "object", "required": ["b"]}],
    [{"properties": {"t": {"const": 1}}, "required": ["t"]}, {"properties": {"t": {"const": 2}}, "required": ["t"]}],
    [{"type": "integer"}, {"type": "number", "maximum": 3}],
    [{"enum": [1, 2]}, {"enum": [2.0, 3]}],
])
def test_oneof_that_cannot_be_proven_disjoint_stays_oneof(one_of: list[Any]) -> None:
    out = _norm({"oneOf": one_of})
    assert "oneOf" in out and "anyOf" not in out


def test_oneof_of_a_type_and_anything_is_everything_else() -> None:
    out = _norm({"oneOf": [{"type": "string"}, {"description": "anything"}]})
    assert "oneOf" not in json.dumps(out)
    for instance in ("s", 1, None, [], {}):
        assert _valid(out, instance) is (not isinstance(instance, str))


def test_oneof_proof_work_is_bounded_by_max_nodes() -> None:
    schema = {"oneOf": [{"const": i} for i in range(20)]}  # 190 pairs
    assert "anyOf" in _norm(schema, max_nodes=190) and _norm(schema, max_nodes=189) == schema


def test_oneof_with_one_branch_is_merged_and_next_to_anyof_goes_under_allof() -> None:
    assert _norm({"type": "object", "oneOf": [{"required": ["a"]}]}) == {
        "type": "object", "required": ["a"], "properties": {"a": {}}}
    schema = {"anyOf": [{"minimum": 0}, {"maximum": -5}], "oneOf": [{"type": "string"}, {"type": "number"}]}
    assert _norm(schema) == {"anyOf": schema["anyOf"], "allOf": [{"anyOf": schema["oneOf"]}]}


# --- numbers, arrays, objects ------------------------------------------------------------------------------------

def test_draft04_exclusive_bounds_become_numeric_and_schema_becomes_draft07() -> None:
    schema = {"$schema": D4, "type": "number", "minimum": 0, "exclusiveMinimum": True,
              "maximum": 1, "exclusiveMaximum": False}
    result = normalize_schema(schema, KNOWN)
    assert result.schema == {"$schema": D7, "type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert "exclusiveMinimum: true at #/ -> exclusiveMinimum: 0 (draft-06 form)" in result.rewrites


def test_draft04_with_an_integer_type_keeps_boolean_bounds() -> None:
    # draft-04 says 1.0 is not an integer, draft-06+ says it is: no draft upgrade is exact then
    schema = {"$schema": D4, "properties": {"n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
                                            "x": {"maximum": 3, "exclusiveMaximum": False}}}
    assert _norm(schema) == {"$schema": D4, "properties": {"n": schema["properties"]["n"], "x": {"maximum": 3}}}


def test_boolean_exclusive_bound_outside_draft04_is_left_for_the_keyword_check() -> None:
    schema = {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert _norm(schema) == schema


def test_unique_items_dropped_where_it_cannot_fail() -> None:
    schema = {"properties": {"a": {"type": "array", "uniqueItems": False}, "b": {"uniqueItems": True, "maxItems": 1},
                             "c": {"uniqueItems": True, "maxItems": 2}}}
    assert _norm(schema)["properties"] == {"a": {"type": "array"}, "b": {"maxItems": 1},
                                           "c": {"uniqueItems": True, "maxItems": 2}}


def test_unevaluated_keywords_become_additional_ones_without_in_place_applicators() -> None:
    assert _norm({"properties": {"a": {}}, "unevaluatedProperties": False}) == {
        "properties": {"a": {}}, "additionalProperties": False}
    assert _norm({"additionalProperties": {"type": "string"}, "unevaluatedProperties": False}) == {
        "additionalProperties": {"type": "string"}}
    assert _norm({"type": "array", "unevaluatedItems": {"type": "integer"}}) == {
        "type": "array", "items": {"type": "integer"}}


def test_beside_allof_unevaluated_properties_is_additional_properties_over_what_allof_declares() -> None:
    schema = {"allOf": [{"properties": {"a": {"type": "string"}}}], "properties": {"b": {"type": "string"}},
              "unevaluatedProperties": False}
    assert _norm(schema) == {"allOf": [{"properties": {"a": {"type": "string"}}}], "additionalProperties": False,
                             "properties": {"a": {}, "b": {"type": "string"}}}


def test_beside_an_allof_member_with_a_conditional_applicator_unevaluated_properties_stays() -> None:
    schema = {"allOf": [{"anyOf": [{"properties": {"a": {}}}, {"required": ["b"]}]}, {"properties": {"c": {}}}],
              "unevaluatedProperties": False}
    assert "unevaluatedProperties" in _norm(schema)


@pytest.mark.parametrize("schema", [
    {"anyOf": [{"properties": {"a": {"type": "string"}}}, {"required": ["b"]}], "unevaluatedProperties": False},
    {"contains": {"type": "string"}, "unevaluatedItems": False},
])
def test_unevaluated_keywords_stay_when_something_else_evaluates(schema: dict[str, Any]) -> None:
    assert _norm(schema) == schema


def test_dependent_required_becomes_anyof_clauses() -> None:
    result = normalize_schema({"type": "object", "dependentRequired": {"a": ["b", "c"], "d": []}}, KNOWN)
    assert result.schema == {"type": "object", "anyOf": [{"properties": {"a": False}}, {"required": ["a", "b", "c"]}]}
    assert "dependentRequired at #/ -> allOf of anyOf [property absent, dependency holds]" in result.rewrites
    two = _norm({"dependentRequired": {"a": ["b"], "b": ["a"]}})
    assert two == {"allOf": [{"anyOf": [{"properties": {"a": False}}, {"required": ["a", "b"]}]},
                             {"anyOf": [{"properties": {"b": False}}, {"required": ["b", "a"]}]}]}


def test_draft07_dependencies_arrays_and_schemas_become_anyof_clauses() -> None:
    schema = {"$schema": D7, "dependencies": {"a": ["b"], "c": {"required": ["d"], "description": "x"}}}
    assert _norm(schema) == {"$schema": D7, "allOf": [
        {"anyOf": [{"properties": {"a": False}}, {"required": ["a", "b"]}]},
        {"anyOf": [{"properties": {"c": False}}, {"required": ["d"], "description": "x", "properties": {"d": {}}}]}]}
    assert _norm({"$schema": D4, "dependencies": {"a": ["b"]}})["anyOf"][0] == {"properties": {"a": {"not": {}}}}


def test_dependent_schemas_in_2020_stay() -> None:
    schema = {"dependentSchemas": {"a": {"maxProperties": 1}}}
    assert _norm(schema) == schema


def test_undeclared_required_names_are_declared_with_the_schema_they_get_anyway() -> None:
    result = normalize_schema({"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "string"}}},
                              KNOWN)
    assert result.schema["properties"] == {"a": {"type": "string"}, "b": {}}
    assert "required 'b' at #/ declared in properties" in result.rewrites
    extra = _norm({"required": ["x"], "additionalProperties": {"type": "integer"}})
    assert extra["properties"] == {"x": {"type": "integer"}}


@pytest.mark.parametrize("schema", [
    {"required": ["x"], "additionalProperties": False},
    {"required": ["x"], "patternProperties": {"^x": {"type": "string"}}},
    {"required": ["x"], "properties": {"a": {}}, "unevaluatedProperties": False, "allOf": [{"required": ["a"]}]},
])
def test_undeclared_required_names_stay_where_declaring_them_could_change_anything(schema: dict[str, Any]) -> None:
    assert "x" not in _norm(schema).get("properties", {})


def test_allof_with_one_branch_merges_unless_keywords_clash_or_read_each_other() -> None:
    assert _norm({"description": "d", "allOf": [{"type": "string"}, {}]}) == {"description": "d", "type": "string"}
    clash = {"type": "string", "allOf": [{"type": "string", "maxLength": 3}]}
    assert _norm(clash) == clash
    reads = {"additionalProperties": False, "allOf": [{"properties": {"a": {"type": "string"}}}]}
    assert _norm(reads) == reads
    scoped = {"properties": {"a": {"type": "string"}}, "allOf": [{"unevaluatedProperties": False}]}
    assert _norm(scoped) == {"properties": {"a": {"type": "string"}}, "allOf": [{"additionalProperties": False}]}
    # within its member, unevaluatedProperties evaluates everything `not` leaves (all of it): the
    # member is additionalProperties: false, which merges without reading the anyOf beside it
    beside = {"anyOf": [{"properties": {"a": {}}}],
              "allOf": [{"not": {"required": ["x"]}, "unevaluatedProperties": False}]}
    assert _norm(beside) == {"anyOf": [{"properties": {"a": {}}}], "not": {"required": ["x"]},
                             "additionalProperties": False}


def test_not_over_what_has_a_complement_is_rewritten_and_what_has_none_stays() -> None:
    out = normalize_schema({"type": "object", "not": {"required": ["a"]}}, KNOWN)
    assert out.schema == {"type": "object", "allOf": [{"type": "object", "properties": {"a": False}}]}
    assert any(r.startswith("not at #/ ->") for r in out.rewrites)
    assert _norm({"enum": ["x", "y"], "not": {"const": "y"}}) == {"enum": ["x"]}
    assert _norm({"type": "boolean", "not": {"const": False}}) == {"type": "boolean", "enum": [True]}
    both = {"properties": {"p": {"const": "a", "enum": ["b"], "not": {"const": "x"}}}}  # accepts no p at all
    assert not _valid(_norm(both), {"p": "a"}) and not _valid(both, {"p": "a"})
    assert _norm({"properties": {"p": {"const": 1, "not": {"enum": [1.0]}}}}) == {"properties": {"p": False}}
    for kept in ({"not": {"type": "integer"}}, {"not": {"const": "x"}}, {"not": {"pattern": "^a"}},
                 {"type": "string", "not": {"enum": ["a"]}}):
        assert "not" in json.dumps(_norm(kept)), kept


def test_if_then_else_with_a_decidable_if_becomes_anyof() -> None:
    schema = next(case for case in CASES if case.name == "if_discriminator").schema
    out = _norm(schema)
    assert "if" not in out and "anyOf" in out
    assert "not" not in json.dumps(out)  # the other kinds are listed instead
    undecidable = {"if": {"properties": {"kind": {"const": "card"}}}, "then": {"required": ["n"]}}
    assert "if" in _norm(undecidable)  # kind's other values are not listed anywhere


def test_a_oneof_of_overlapping_branches_with_complements_becomes_exclusive_anyof() -> None:
    schema = next(case for case in CASES if case.name == "oneof_exactly_one_required").schema
    out = normalize_schema(schema, KNOWN)
    assert "oneOf" not in json.dumps(out.schema) and len(out.schema["anyOf"]) == 3
    assert any("each branch without the others" in r for r in out.rewrites)
    for instance, valid in (({"a": "x"}, True), ({"a": "x", "b": 1}, False), ({"a": "x", "c": 1}, False),
                            ({"b": 1, "c": 0}, True), ({}, False)):
        assert _valid(out.schema, instance) is valid and _valid(schema, instance) is valid, instance


@pytest.mark.parametrize("name", ["not_required", "if_discriminator", "not_const_enum",
                                  "oneof_exactly_one_required"])
def test_the_rewritten_keywords_are_enforced_exactly(name: str) -> None:
    from serve_app.constraints import JsonSchemaConstraint, LimitsConfig, installed_backends, plan_constraint
    from serve_app.constraints.registry import BackendDefaults

    schema = next(case for case in CASES if case.name == name).schema
    plan = plan_constraint(JsonSchemaConstraint.model_validate({"schema": schema}), LimitsConfig(),
                           BackendDefaults(), installed_backends())
    assert plan.backends and not plan.lenient


# --- the same verdict on realistic schemas -----------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    schema: dict[str, Any]
    valid: Any  # one instance the schema accepts: generated instances start from it


_PET = {"$defs": {
    "Cat": {"type": "object", "description": "A cat.", "properties": {
        "kind": {"type": "string", "const": "cat"}, "lives": {"type": "integer", "format": "int32", "maximum": 9}},
        "required": ["kind"]},
    "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog"]}, "name": {"type": "string", "maxLength": 3}},
            "required": ["kind", "name"], "additionalProperties": False}},
    "type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                                             "discriminator": {"propertyName": "kind"}}}, "required": ["pet"]}
_SHAPES = {"definitions": {
    "Base": {"type": "object", "required": ["kind", "id"], "properties": {
        "id": {"type": "string", "format": "uuid"}, "kind": {"type": "string"}}},
    "Circle": {"allOf": [{"$ref": "#/definitions/Base"}, {"properties": {
        "kind": {"enum": ["circle"]}, "r": {"type": "number", "exclusiveMinimum": 0}}}]},
    "Square": {"allOf": [{"$ref": "#/definitions/Base"}, {"properties": {
        "kind": {"enum": ["square"]}, "side": {"type": "number"}}, "required": ["side"]}]}},
    "oneOf": [{"$ref": "#/definitions/Circle"}, {"$ref": "#/definitions/Square"}]}
_K8S = {"description": "Deployment enables declarative updates.", "type": "object", "required": ["apiVersion", "spec"],
        "properties": {
            "apiVersion": {"description": "APIVersion defines the versioned schema.", "type": "string"},
            "kind": {"description": "Kind is a string value.", "type": "string"},
            "metadata": {"description": "Standard object metadata.", "type": "object", "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Map."},
                "uid": {"description": "UID.", "type": "string", "format": "uuid"},
                "annotations": {"description": "Unstructured.", "x-kubernetes-preserve-unknown-fields": True}}},
            "spec": {"description": "Spec.", "type": "object", "required": ["selector"], "properties": {
                "replicas": {"description": "Number of pods.", "type": "integer", "format": "int32", "minimum": 0},
                "minReadySeconds": {"type": "integer", "format": "int64"},
                "selector": {"description": "Label selector.", "x-kubernetes-map-type": "atomic"},
                "strategy": {"type": "object", "properties": {"type": {"type": "string", "enum": ["Recreate"]}},
                             "x-kubernetes-list-type": "map"}}}},
        "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "Deployment", "version": "v1"}]}
_EXPR = {"$defs": {
    "expr": {"anyOf": [{"type": "number"}, {"$ref": "#/$defs/op"}]},
    "op": {"type": "object", "required": ["op", "args"], "properties": {
        "op": {"enum": ["+", "-"]}, "args": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/expr"}}}}},
    "$ref": "#/$defs/expr"}

CASES = [
    Case("openapi_pet", _PET, {"pet": {"kind": "cat", "lives": 9}}),
    Case("openapi_allof_inheritance", _SHAPES, {"kind": "circle", "id": "x", "r": 1.5}),
    Case("k8s_like", _K8S, {"apiVersion": "apps/v1", "spec": {"replicas": 2, "selector": {}}}),
    Case("recursive_tree", {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
        "$ref": "#/$defs/node"}, {"v": 1, "kids": [{"v": 2, "kids": []}]}),
    Case("recursive_root", {"type": "object", "properties": {"name": {"type": "string"},
                                                             "children": {"type": "array", "items": {"$ref": "#"}}},
                            "required": ["name"]}, {"name": "a", "children": [{"name": "b"}]}),
    Case("mutual_recursion", _EXPR, {"op": "+", "args": [1, {"op": "-", "args": [2, 3]}]}),
    Case("draft07_ref_siblings", {"$schema": D7, "definitions": {"s": {"type": "string"}}, "properties": {
        "a": {"$ref": "#/definitions/s", "maxLength": 2}, "b": {"$ref": "#/definitions/s"}}}, {"a": "long", "b": "x"}),
    Case("ref_siblings_2020", {"$defs": {"s": {"type": "string", "maxLength": 5}}, "properties": {
        "a": {"$ref": "#/$defs/s", "minLength": 2, "description": "x"}, "c": {"$ref": "#/$defs/s", "maxLength": 3}}},
        {"a": "abc", "c": "ab"}),
    Case("draft04_exclusive_bounds", {"$schema": D4, "type": "object", "required": ["ratio"], "properties": {
        "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": False},
        "t": {"type": "number", "maximum": 10, "exclusiveMaximum": True}, "c": {"const": 3}}},
        {"ratio": 0.5, "t": 9.5}),
    Case("draft04_integer_bounds", {"$schema": D4, "properties": {
        "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
        "x": {"type": "number", "maximum": 5, "exclusiveMaximum": True, "minimum": 1, "exclusiveMinimum": False}}},
        {"n": 1, "x": 4}),
    Case("draft07_dependencies", {"$schema": D7, "properties": {
        "card": {"type": "string"}, "billing": {"type": "string"}, "vip": {"type": "boolean"}},
        "dependencies": {"card": ["billing"], "vip": {"required": ["card"]}, "none": []}},
        {"card": "x", "billing": "y", "vip": True}),
    Case("dependent_required", {"type": "object", "dependentRequired": {"a": ["b", "c"], "b": ["a"]},
                                "anyOf": [{"required": ["a"]}, {"required": ["d"]}]}, {"a": 1, "b": 2, "c": 3}),
    Case("unevaluated_properties", {"type": "object", "properties": {"a": {"type": "integer"}},
                                    "patternProperties": {"^x-": {"type": "string"}}, "unevaluatedProperties": False},
         {"a": 1, "x-b": "s"}),
    Case("unevaluated_with_allof", {"allOf": [{"properties": {"a": {"type": "string"}}}],
                                    "properties": {"b": {}}, "unevaluatedProperties": False}, {"a": "s", "b": 1}),
    Case("unevaluated_items", {"type": "array", "unevaluatedItems": {"type": "integer"}, "maxItems": 3,
                               "uniqueItems": True}, [1, 2]),
    Case("oneof_types", {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"},
                                   {"type": "array", "items": {"type": "boolean"}}]}, "s"),
    Case("oneof_overlapping_numbers", {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 3}]}, 5),
    Case("oneof_values", {"oneOf": [{"const": "a"}, {"enum": ["b", 1]}, {"enum": [True, None]}, {"const": 1.5}]}, "b"),
    Case("oneof_single_and_allof", {"type": "object", "properties": {
        "p": {"allOf": [{"type": "string"}], "description": "d"},
        "q": {"type": "string", "allOf": [{"type": "string", "maxLength": 3}]},
        "r": {"allOf": [{"properties": {"x": {}}}], "additionalProperties": False},
        "s": {"allOf": [{}, {"minimum": 2}], "oneOf": [{"type": "integer"}]}}},
        {"p": "a", "q": "ab", "r": {}, "s": 3}),
    Case("unique_items", {"properties": {"a": {"type": "array", "uniqueItems": False},
                                         "b": {"type": "array", "uniqueItems": True, "maxItems": 1},
                                         "c": {"type": "array", "uniqueItems": True, "maxItems": 3}}},
         {"a": [1, 1], "b": [2], "c": [1, 2]}),
    Case("not_required", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {}},
                          "not": {"required": ["a", "b"]}}, {"a": 1}),
    Case("not_required_untyped", {"not": {"required": ["a"]}, "properties": {"b": {"type": "integer"}}}, {"b": 1}),
    Case("not_type_and_not_not", {"properties": {
        "x": {"not": {"type": ["string", "null"]}}, "y": {"not": {"type": "integer"}},
        "z": {"not": {"not": {"type": "string", "maxLength": 2}}}, "w": {"not": {"type": "number"}}}},
        {"x": 1, "z": "ab"}),
    Case("not_const_enum", {"properties": {
        "status": {"enum": ["a", "b", "c", 1], "not": {"enum": ["b", 1.0]}},
        "flag": {"type": "boolean", "not": {"const": True}}, "n": {"const": 3, "not": {"const": 3}},
        "m": {"type": ["null", "boolean"], "not": {"enum": [None, 0]}}}},
        {"status": "a", "flag": False, "m": True}),
    Case("if_discriminator", {"type": "object", "required": ["kind"], "properties": {
        "kind": {"enum": ["card", "bank", "cash"]}, "number": {"type": "string"}, "iban": {"type": "string"}},
        "if": {"properties": {"kind": {"const": "card"}}, "required": ["kind"]},
        "then": {"required": ["number"]}, "else": {"required": ["iban"]}}, {"kind": "card", "number": "4"}),
    Case("if_required_and_type", {"properties": {
        "o": {"if": {"required": ["a"]}, "then": {"required": ["b"]}},
        "s": {"if": {"type": "string"}, "then": {"maxLength": 2}, "else": {"type": "integer"}}}},
        {"o": {"a": 1, "b": 2}, "s": "ab"}),
    Case("oneof_exactly_one_required", {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {}},
        "oneOf": [{"required": ["a"]}, {"required": ["b"]}, {"required": ["c", "a"]}]}, {"b": 1}),
    Case("not_anyof_allof", {"properties": {
        "x": {"not": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "y": {"not": {"allOf": [{"required": ["p"]}, {"required": ["q"]}]}}}}, {"x": 1, "y": {"p": 1}}),
    Case("required_undeclared", {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "string"},
        "p": {"type": "object", "required": ["k"], "patternProperties": {"^k": {"type": "string"}}},
        "f": {"required": ["z"], "additionalProperties": False}},
        "additionalProperties": {"type": "integer"}, "propertyNames": {"maxLength": 3}},
        {"a": "s", "b": 2, "p": {"k": "v"}, "f": 1}),
    Case("formats", {"type": "object", "properties": {
        "id": {"type": "string", "format": "int64"}, "blob": {"type": "string", "format": "byte"},
        "when": {"type": "string", "format": "date-time"}, "n": {"format": "int32"}}},
        {"id": "1", "when": "2020-01-01T00:00:00Z"}),
    Case("booleans", {"properties": {"t": True, "f": False, "n": {"not": {}}, "nn": {"not": {"not": {}}},
                                     "list": {"type": "array", "items": True, "prefixItems": [{"type": "integer"}]}}},
         {"t": 1, "nn": 2, "list": [1, "x"]}),
    Case("draft07_inert_keywords", {"$schema": D7, "type": "array", "prefixItems": [{"type": "string"}],
                                    "items": [{"type": "integer"}], "additionalItems": {"type": "boolean"},
                                    "dependentRequired": {"a": ["b"]}, "then": {"type": "string"}}, [1, True]),
    Case("discriminator_type_on_parent", {"type": "object", "oneOf": [
        {"properties": {"t": {"const": 1}}, "required": ["t"]},
        {"properties": {"t": {"const": 2}, "u": {"type": "string"}}, "required": ["t", "u"]}]}, {"t": 1}),
    Case("discriminator_without_object_type", {"oneOf": [
        {"properties": {"t": {"const": 1}}, "required": ["t"]},
        {"properties": {"t": {"const": 2}}, "required": ["t"]}]}, {"t": 1}),
    Case("overlapping_objects", {"oneOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                                           {"type": "object", "required": ["b"]}]}, {"a": "x"}),
    Case("draft2019_items_array", {"$schema": D2019, "type": "object", "properties": {
        "tags": {"type": "array", "items": [{"type": "string"}], "additionalItems": {"type": "integer"}},
        "d": {"dependencies": {"a": ["b"]}}}, "unevaluatedProperties": {"type": "boolean"}},
        {"tags": ["a", 1], "z": True}),
    Case("unevaluated_scope", {"anyOf": [{"properties": {"a": {}}}, {"required": ["b"]}],
                               "allOf": [{"not": {"required": ["x"]}, "unevaluatedProperties": False}]}, {}),
    # OpenAPI 3.1's shape: a base by $ref (or allOf), own properties, nothing else.
    Case("unevaluated_beside_allof", {"$defs": {"base": {"properties": {"id": {"type": "integer"}},
                                                         "patternProperties": {"^x-": {"type": "string"}}}},
                                      "type": "object", "$ref": "#/$defs/base", "properties": {"a": {"type": "string"}},
                                      "allOf": [{"properties": {"b": {"enum": [1, 2]}}, "allOf": [{"not": {
                                          "properties": {"zz": {}}, "required": ["zz"]}}]}],
                                      "unevaluatedProperties": {"type": "boolean"}},
         {"id": 1, "a": "s", "b": 2, "x-y": "t", "c": True}),
    Case("unevaluated_beside_allof_covered", {"allOf": [{"properties": {"a": {}}, "additionalProperties": {
        "type": "integer"}}], "unevaluatedProperties": False}, {"a": "s", "b": 1}),
    Case("nullable_linked_list", {"$defs": {"node": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer"}, "next": {"oneOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
        "$ref": "#/$defs/node"}, {"v": 1, "next": {"v": 2, "next": None}}),
    Case("recursive_ref_with_siblings", {"$defs": {"list": {"type": "object", "required": ["v"], "properties": {
        "next": {"$ref": "#/$defs/list", "description": "n"}, "v": {"type": "integer"}}}},
        "$ref": "#/$defs/list", "maxProperties": 3}, {"v": 1, "next": {"v": 2}}),
    # Checked while generating (checks.py): the split test draws instances of these too.
    Case("checked_tags", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "x-y", 1, 1.0]}, "uniqueItems": True},
        "name": {"type": "string", "not": {"pattern": "^x"}},
        "v": {"oneOf": [{"type": "integer", "maximum": 5}, {"type": "integer", "minimum": 2}, {"type": "string"}]}},
        "propertyNames": {"maxLength": 4}, "minProperties": 1, "maxProperties": 2},
        {"tags": ["a", "b"], "v": 9}),
    Case("checked_conditional", {"type": "object", "properties": {"kind": {"type": "string"}, "n": {"type": "integer"}},
                                 "if": {"properties": {"kind": {"pattern": "^a"}}},
                                 "then": {"properties": {"n": {"maximum": 3}}}, "else": {"required": ["n"]},
                                 "dependentRequired": {"zz": ["kind"]}}, {"kind": "abc", "n": 1}),
    Case("checked_nested_items", {"$defs": {"item": {"type": "object", "properties": {"a": {"not": {"const": 2}}},
                                                     "contains": {"type": "integer"}}},
                                  "type": "array", "items": {"$ref": "#/$defs/item"}, "uniqueItems": True},
         [{"a": 1}, {"a": 3}]),
]

_DELETE = object()


def _collect(node: Any, names: set[str], values: list[Any]) -> None:
    """Property names and const/enum values anywhere in a schema (or instance)."""
    if isinstance(node, dict):
        names.update(k for k in node.get("properties", {}) if isinstance(node.get("properties"), dict))
        for key in ("required", "dependentRequired", "dependencies"):
            value = node.get(key)
            names.update(v for v in (value if isinstance(value, (list, dict)) else []) if isinstance(v, str))
        if "const" in node:
            values.append(node["const"])
        if isinstance(node.get("enum"), list):
            values.extend(node["enum"])
        for value in node.values():
            _collect(value, names, values)
    elif isinstance(node, list):
        for value in node:
            _collect(value, names, values)


def _paths(instance: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into an instance, the root first."""
    inner: list[tuple[Any, Any]] = []
    if isinstance(instance, dict):
        inner = list(instance.items())
    elif isinstance(instance, list):
        inner = list(enumerate(instance))
    return [here] + [path for key, value in inner for path in _paths(value, (*here, key))]


def _mutate(instance: Any, edits: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """`instance` with values set or deleted at paths (an edit under a path already gone is skipped)."""
    out = copy.deepcopy(instance)
    for path, value in edits:
        if not path:
            out = value if value is not _DELETE else out
            continue
        parent = out
        try:
            for key in path[:-1]:
                parent = parent[key]
            if value is _DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    return out


@functools.cache
def _instances(name: str) -> st.SearchStrategy[Any]:
    """JSON values built from the schema's property names and const/enum values, and edits of `case.valid`:
    both verdicts come up for every case."""
    case = next(case for case in CASES if case.name == name)
    names: set[str] = set()
    values: list[Any] = []
    _collect(case.schema, names, values)
    _collect(case.valid, names, [])
    keys = st.sampled_from(sorted(names) + ["zz", "x-y"])
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2, 11), st.sampled_from([0.5, 1.0, -1.5, 9.5, 3.25]),
                       st.text("abcx-", max_size=6), st.sampled_from(values) if values else st.nothing())

    def nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:  # cheaper than st.recursive
        return st.one_of(inner, st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4))

    random = nest(nest(nest(leaves)))
    paths = _paths(case.valid)
    added = st.tuples(st.sampled_from(paths), keys).map(lambda path_key: (*path_key[0], path_key[1]))
    edits = st.lists(st.tuples(st.sampled_from(paths) | added, leaves | nest(leaves) | st.just(_DELETE)), max_size=2)
    return st.one_of(random, edits.map(lambda e: _mutate(case.valid, e)))


@functools.cache
def _validators(name: str) -> tuple[Validator, Validator]:
    """(original, normalized) validators of a case."""
    schema = next(case for case in CASES if case.name == name).schema
    out = normalize_schema(schema, KNOWN).schema
    return _validator(schema), _validator(out)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fixed_schemas_normalize_to_valid_schemas(case: Case) -> None:
    out = normalize_schema(case.schema, KNOWN).schema
    validator_for(case.schema, default=Draft202012Validator).check_schema(case.schema)
    validator_for(out, default=Draft202012Validator).check_schema(out)
    assert _valid(case.schema, case.valid) and _valid(out, case.valid)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_normalized_schema_gives_the_same_verdict_as_the_original(case: Case, data: st.DataObject) -> None:
    original, normalized = _validators(case.name)
    instance = data.draw(_instances(case.name))
    assert normalized.is_valid(instance) == original.is_valid(instance), (normalized.schema, instance)


def test_a_type_that_a_recursive_refs_target_implies_is_dropped():
    schema = {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"type": "object", "allOf": [{"$ref": "#"}]}}}}
    out = normalize_schema(schema, frozenset())
    assert out.schema["properties"]["kids"]["items"] == {"$ref": "#"}
    assert any("type next to $ref" in r for r in out.rewrites)
    validator = Draft202012Validator
    for instance in [{"kids": [{}]}, {"kids": [1]}, {"kids": [{"kids": ["x"]}]}, {"kids": [{"kids": [{}]}]}]:
        assert validator(schema).is_valid(instance) == validator(out.schema).is_valid(instance)


@functools.cache
def _split(name: str) -> tuple[Validator, Validator, ValueChecks | None]:
    """(original, grammar) validators of a case whose normalised schema is split for checks, and its checks."""
    schema = next(case for case in CASES if case.name == name).schema
    normalized = normalize_schema(schema, KNOWN).schema
    split = split_checks(normalized)
    return _validator(schema), _validator(split.grammar), ValueChecks(normalized, split.sites) if split.sites else None


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_the_grammar_and_the_checks_together_accept_only_what_the_schema_accepts(case: Case,
                                                                                  data: st.DataObject) -> None:
    """What the checks take out of the grammar loosens it (never refuses a valid instance); an instance the
    grammar accepts and whose every value passes the checks as it closes is valid."""
    original, grammar, checks = _split(case.name)
    instance = data.draw(_instances(case.name))
    if original.is_valid(instance):
        assert grammar.is_valid(instance), (grammar.schema, instance)
    if checks is not None and grammar.is_valid(instance):
        checker = RowChecker(checks)
        passed = checker.trial(json.dumps(instance, separators=(",", ":")), final=True) is None
        assert not passed or original.is_valid(instance), (case.name, instance)


@pytest.mark.parametrize("schema", [
    {"allOf": [True, False]},
    {"allOf": [{"$ref": "#/$defs/nothing"}], "$defs": {"nothing": False}},
    {"not": {}},
    {"$schema": D4, "allOf": [{"not": {}}, {"type": "string"}]},
    {"type": "object", "properties": {"a": {"allOf": [True, False]}}, "required": ["a"]},
    {"type": "object", "required": ["o"],
     "properties": {"o": {"type": "object", "properties": {"b": {"not": {}}}, "required": ["b"]}}},
    {"type": "object", "minProperties": 3, "maxProperties": 2},
    {"type": "array", "contains": {"type": "integer"}, "minContains": 4, "maxItems": 3},
    {"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}, {"type": "string"}]}}, "required": ["x"]},
    {"type": "array", "items": {"enum": ["a", "b", "a"]}, "uniqueItems": True, "minItems": 3},
    {"type": "object", "required": ["a", "b"], "maxProperties": 1},
    {"type": "string", "minLength": 5, "maxLength": 4},
    {"type": "integer", "minimum": 10, "maximum": 9},
    {"enum": []},
], ids=["allOf true false", "allOf ref to false", "not empty", "draft-04 allOf not empty", "required false property",
        "nested required false property", "minProperties over maxProperties", "minContains over maxItems",
        "identical oneOf branches", "unique items over their values", "required over maxProperties",
        "minLength over maxLength", "minimum over maximum", "empty enum"])
def test_a_schema_that_provably_admits_nothing_is_a_400_saying_so(schema) -> None:
    from serve_app.config import ModelConfig
    from serve_app.constraints import installed_backends, parse_constraint
    from serve_app.constraints.plan import plan_constraint
    from serve_app.errors import ConstraintError

    model = ModelConfig(name="m", source="x")
    with pytest.raises(ConstraintError, match="this schema admits no value") as raised:
        plan_constraint(parse_constraint({"type": "json_schema", "schema": schema}), model.limits, model.backends,
                        installed_backends())
    assert raised.value.param == "json_schema" and raised.value.code == "unsatisfiable_schema"


def test_crossed_bounds_reject_only_the_type_they_apply_to() -> None:
    assert _norm({"minProperties": 3, "maxProperties": 2}) == {"minProperties": 3, "maxProperties": 2}  # "x" passes
    out = normalize_schema({"type": "object", "properties": {"tags": {"type": "array", "minItems": 2, "maxItems": 1}}},
                           KNOWN)
    assert out.schema["properties"]["tags"] is False  # optional: objects without "tags" remain
    assert any(r.startswith("minItems at #/properties/tags -> rejects everything") for r in out.rewrites)


def test_a_member_that_rejects_everything_makes_its_allof_reject_everything_where_values_remain() -> None:
    optional = {"type": "object", "properties": {"a": {"allOf": [True, False]}, "b": {"type": "integer"}}}
    assert _norm(optional)["properties"] == {"a": False, "b": {"type": "integer"}}  # objects without "a" remain
    not_only_objects = {"properties": {"a": False}, "required": ["a"]}  # a string is still valid
    assert _norm(not_only_objects) == not_only_objects


# --- declared properties only (plan.py DeclaredOnly) -------------------------------------------------------------

def _target(schema: dict[str, Any], **options: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    from serve_app.constraints import JsonSchemaConstraint, LimitsConfig, installed_backends, plan_constraint
    from serve_app.constraints.registry import BackendDefaults

    defaults = BackendDefaults(**options.pop("defaults", {}))
    plan = plan_constraint(JsonSchemaConstraint.model_validate({"schema": schema, **options}), LimitsConfig(),
                           defaults, installed_backends())
    return plan.target.json_schema, plan.rewrites  # type: ignore[union-attr]


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "address": {"type": "object", "properties": {"city": {"type": "string"}}}},
          "required": ["name", "age"]}


def test_objects_that_leave_additional_properties_out_get_only_their_declared_ones() -> None:
    target, rewrites = _target(PERSON)
    assert target["additionalProperties"] is False
    assert target["properties"]["address"]["additionalProperties"] is False
    assert any(r.startswith("additionalProperties at #/, #/properties/address -> false") for r in rewrites)
    for opened in (_target(PERSON, undeclared_properties=True)[0],
                   _target(PERSON, defaults={"undeclared_properties": True})[0]):
        assert "additionalProperties" not in opened and "additionalProperties" not in opened["properties"]["address"]
    assert _target(PERSON, undeclared_properties=False, defaults={"undeclared_properties": True})[0][
        "additionalProperties"] is False  # the request's word over the model's


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
    {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"a": {}}, "minProperties": 2},
    {"type": "object", "properties": {"a": {}}, "anyOf": [{"required": ["b"]}, {"required": ["a"]}]},
], ids=["says true", "requires an undeclared name", "minProperties past the declared",
        "an applicator naming another"])
def test_objects_that_need_other_properties_stay_open(schema: dict[str, Any]) -> None:
    assert _target(schema)[0].get("additionalProperties") in (None, {}, True)  # (normalised: true is {})


def test_a_schema_with_unevaluated_properties_anywhere_is_left_as_it_is() -> None:
    from serve_app.constraints.plan import DeclaredOnly

    schema = {"type": "object", "properties": {"o": {"type": "object", "properties": {"c": {}}}},
              "anyOf": [{"properties": {"b": {}}}], "unevaluatedProperties": False}
    assert DeclaredOnly(schema).schema() == (schema, [])


def test_members_of_a_combination_stay_open_and_alternatives_are_closed() -> None:
    from serve_app.constraints.plan import DeclaredOnly

    combined = {"$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}}}},
                "type": "object", "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"name": {"type": "string"}}}]}
    target, _ = _target(combined)
    assert "additionalProperties" not in json.dumps(target)
    for instance in ({"id": 1, "name": "x"}, {"id": 1}):
        assert _valid(target, instance)
    conditional = {"type": "object", "properties": {"tls": {"type": "boolean"}, "cert": {"type": "string"}},
                   "required": ["tls"], "if": {"properties": {"tls": {"const": True}}}, "then": {"required": ["cert"]},
                   "else": {"not": {"required": ["cert"]}}}
    from serve_app.constraints import JsonSchemaConstraint, LimitsConfig, installed_backends, plan_constraint
    from serve_app.constraints.registry import BackendDefaults

    plan = plan_constraint(JsonSchemaConstraint.model_validate({"schema": conditional}), LimitsConfig(),
                           BackendDefaults(), installed_backends())
    checked = plan.check_schema or plan.target.json_schema  # type: ignore[union-attr]
    assert checked["additionalProperties"] is False  # its applicators name only declared properties
    for instance in ({"tls": True, "cert": "x"}, {"tls": False}, {"tls": True}, {"tls": False, "cert": "x"}):
        assert _valid(checked, instance) == _valid(conditional, instance), instance
    assert not _valid(checked, {"tls": False, "other": 1}) and _valid(conditional, {"tls": False, "other": 1})
    team = {"type": "array", "items": {"type": "object", "properties": {"lead": {"type": "boolean"},
                                                                       "name": {"type": "string"}}},
            "contains": {"properties": {"lead": {"const": True}}}}  # contains applies beside items
    assert "additionalProperties" not in _target(team)[0].get("contains", {})
    assert DeclaredOnly(team).schema()[1] == ["#/items"]
    union = {"anyOf": [{"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"]},
                       {"type": "object", "properties": {"dog": {"type": "string"}}, "required": ["dog"]}]}
    target, _ = _target(union)
    assert [branch["additionalProperties"] for branch in target["anyOf"]] == [False, False]


def test_counts_written_as_integral_floats_become_integers_and_unicode_classes_pass_meta_validation() -> None:
    target, rewrites = _target({"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "string", "pattern": "^\\p{L}+$", "minLength": 1.0}, "maxItems": 2.0}}})
    tags = target["properties"]["tags"]
    assert (tags["maxItems"], tags["items"]["minLength"]) == (2, 1)
    assert type(tags["maxItems"]) is int and type(tags["items"]["minLength"]) is int
    assert "maxItems: 2.0 at #/properties/tags -> 2" in rewrites


@pytest.mark.parametrize("schema,instances", [
    ({"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": False}, [[1], [1, 2], ["a"], []]),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": {"type": "string"}},
     [[1, "a", "b"], [1, 2], [1]]),
    ({"type": "array", "prefixItems": [{}], "items": {"type": "integer"}, "unevaluatedItems": False},
     [[1, 2], ["a", 3]]),
    ({"$schema": "https://json-schema.org/draft/2019-09/schema", "type": "array", "items": [{"type": "integer"}],
      "unevaluatedItems": False}, [[1], [1, 2]]),
])
def test_unevaluated_items_beside_a_tuple_form_become_the_keyword_for_the_rest(schema, instances) -> None:
    out = _norm(schema)
    assert "unevaluatedItems" not in out
    for instance in instances:
        assert _valid(out, instance) == _valid(schema, instance), instance


@pytest.mark.parametrize("schema,instances", [
    ({"$defs": {"n": {"$anchor": "name", "type": "string", "minLength": 2}}, "type": "object",
      "properties": {"a": {"$ref": "#name"}}, "required": ["a"]}, [{"a": "xy"}, {"a": "x"}]),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"n": {"$id": "#name", "type": "integer"}},
      "properties": {"a": {"$ref": "#name"}}}, [{"a": 1}, {"a": "x"}]),
    ({"$defs": {"a b": {"type": "integer"}, "c%d": {"type": "string"}},
      "properties": {"x": {"$ref": "#/$defs/a%20b"}, "y": {"$ref": "#/$defs/c%25d"}}},
     [{"x": 1, "y": "s"}, {"x": "s"}]),
    ({"$id": "https://example.com/s.json", "$defs": {"a": {"type": "boolean"}},
      "properties": {"x": {"$ref": "https://example.com/s.json#/$defs/a"}}}, [{"x": True}, {"x": 1}]),
    ({"$defs": {"node": {"$anchor": "node", "type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#node"}}}}}, "$ref": "#node"}, [{"kids": [{"kids": []}]},
                                                                                    {"kids": [1]}]),
], ids=["$anchor", "draft-07 fragment $id", "percent-encoded pointer", "the root's own $id", "recursive $anchor"])
def test_anchors_encoded_pointers_and_the_roots_id_are_followed(schema, instances) -> None:
    out = _norm(schema)
    refs = [node["$ref"] for node in walk_schema(out) if "$ref" in node]
    assert all(ref.startswith("#/") and "%" not in ref for ref in refs) and "$anchor" not in json.dumps(out)
    for instance in instances:
        assert _valid(out, instance) == _valid(schema, instance), instance
