"""References rewritten as root pointers (constraints/refs.py): the rewritten schema accepts
exactly what jsonschema accepts under the original's own resolution (nested `$id` bases, anchors
inside embedded resources, dynamic references), and what cannot be kept exact is refused."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from serve_app.constraints import parse_constraint
from serve_app.constraints.refs import needs_rebasing, rebased
from serve_app.errors import ConstraintError

NESTED = {"$id": "https://example.com/schemas/root.json", "type": "object",
          "properties": {"a": {"$ref": "item.json"}, "b": {"$ref": "item.json#/$defs/n"},
                         "c": {"$ref": "sub/deep.json"}, "d": {"$ref": "item.json#short"}},
          "$defs": {"item": {"$id": "item.json", "type": "string", "maxLength": 3,
                             "$defs": {"n": {"type": "integer", "minimum": 0},
                                       "s": {"$anchor": "short", "maxLength": 1}}},
                    "deep": {"$id": "sub/deep.json", "type": "array", "items": {"$ref": "../item.json"}}}}
STRICT_TREE = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://example.com/strict-tree",
               "$dynamicAnchor": "node", "$ref": "tree", "unevaluatedProperties": False,
               "$defs": {"tree": {"$id": "https://example.com/tree", "$dynamicAnchor": "node", "type": "object",
                                  "properties": {"data": {"type": "integer"},
                                                 "children": {"type": "array", "items": {"$dynamicRef": "#node"}}}}}}
PLAIN_TREE = STRICT_TREE["$defs"]["tree"]  # alone: its $dynamicRef reaches itself
INSTANCES: list[Any] = [
    {}, {"a": "abc"}, {"a": "abcd"}, {"b": 1}, {"b": -1}, {"c": ["ab", "x"]}, {"c": ["abcd"]}, {"d": "x"},
    {"d": "xy"}, {"data": 1, "children": [{"data": 2}]}, {"data": 1, "children": [{"data": 2, "extra": 1}]},
    {"data": "x"}, {"extra": 1}, [], "abc", 3,
]


def verdicts(schema: dict[str, Any]) -> list[bool]:
    kind = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return [kind(schema).is_valid(value) for value in INSTANCES]


@pytest.mark.parametrize("schema", [NESTED, STRICT_TREE, PLAIN_TREE], ids=["nested-ids", "strict-tree", "tree"])
def test_the_rewritten_schema_accepts_what_the_original_does(schema: dict[str, Any]) -> None:
    out = rebased(schema)
    assert not needs_rebasing(out)
    assert all(ref.startswith("#") for ref in _refs(out))
    assert verdicts(out) == verdicts(schema)


def test_the_strict_tree_is_strict_at_every_level() -> None:
    nested_extra = {"data": 1, "children": [{"data": 2, "extra": 1}]}
    assert not jsonschema.Draft202012Validator(rebased(STRICT_TREE)).is_valid(nested_extra)
    assert jsonschema.Draft202012Validator(rebased(PLAIN_TREE)).is_valid(nested_extra)


def test_a_schema_without_moved_bases_or_dynamic_keywords_is_left_as_sent() -> None:
    schema = {"$id": "https://example.com/s", "$defs": {"a": {"$anchor": "x", "type": "integer"}}, "$ref": "#x"}
    assert rebased(schema) is schema


@pytest.mark.parametrize(("schema", "says"), [
    ({"$id": "https://example.com/a", "properties": {"x": {"$ref": "https://other.example/b.json"}}},
     "only local"),
    ({"$defs": {"i": {"$id": "i.json", "type": "string"}}, "properties": {"x": {"$ref": "j.json"}}},
     "leaves this document"),
    ({"$id": "https://example.com/r", "$defs": {
        "a": {"$id": "a", "$dynamicAnchor": "n", "items": {"$dynamicRef": "#n"}},
        "b": {"$id": "b", "$dynamicAnchor": "n", "$ref": "a"}}, "anyOf": [{"$ref": "a"}, {"$ref": "b"}]},
     "depends on the path"),
    ({"$defs": {"i": {"$id": "i.json"}}, "properties": {"x": {"$ref": "i.json#nope"}}}, "no anchor 'nope'"),
])
def test_what_cannot_be_kept_exact_is_refused_naming_the_reference(schema: dict[str, Any], says: str) -> None:
    with pytest.raises(ConstraintError, match=says):
        parse_constraint({"type": "json_schema", "schema": schema})


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref" and isinstance(v, str)] + \
            [r for v in node.values() for r in _refs(v)]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []
