"""Conformance cases, generated here: for every JSON Schema keyword the project serves, schemas
over a few parameter values, each with instances that satisfy it and instances that do not.

A valid instance is written the way the grammar generates it: properties in declared order,
compact, and no property the schema does not declare (objects are declared-only by default).
`tests/unit/test_conformance.py` checks the labels against jsonschema, then feeds each instance
token by token through a compiled constraint as the decode loop does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    keyword: str
    schema: dict[str, Any]
    valid: tuple[Any, ...]
    invalid: tuple[Any, ...]
    labelled: bool = True  # jsonschema can check the labels (False: formats it cannot check here)
    # Invalid, but no grammar can refuse them while generating (a calendar's days, a leap second's
    # minute): the check after generation must flag them `valid: false`.
    flagged: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.keyword}:{abs(hash(repr(self.schema))) % 10**6}"


def obj(properties: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **more}


def strings() -> Iterator[Case]:
    for n in (1, 3):
        yield Case("minLength", {"type": "string", "minLength": n}, ("a" * n, "b" * (n + 2)), ("a" * (n - 1), 5))
        yield Case("maxLength", {"type": "string", "maxLength": n}, ("", "a" * n), ("a" * (n + 1), None))
    for pattern, good, bad in (("^[a-c]{2}[0-9]$", ("ab1", "cc9"), ("ab", "abd", "ab12")),
                               ("^x+-y$", ("x-y", "xxx-y"), ("-y", "x-yy"))):
        yield Case("pattern", {"type": "string", "pattern": pattern}, good, bad)
    # Lookarounds, word boundaries, backreferences: the grammar has the rest, the check the whole.
    yield Case("pattern", {"type": "string", "pattern": "^(?!.*--)[a-z-]{2,6}$"}, ("ab", "a-b-c"), ("a--b", "A"))
    yield Case("pattern", {"type": "string", "pattern": "\\bcat\\b"}, ("cat", "a cat"), ("cats", "concat"))
    yield Case("pattern", {"type": "string", "pattern": "^([a-z])-\\1$"}, ("a-a",), ("a-b",))
    # Python's re has no \p{...}: jsonschema cannot label it here (the regex module checks it in the service).
    yield Case("pattern", {"type": "string", "pattern": "^\\p{Lu}\\d$"}, ("A1", "Q7"), ("a1", "AA"), labelled=False)
    yield Case("enum", {"enum": ["red", "green", 3, None]}, ("red", 3, None), ("blue", 4, "Red"))
    yield Case("const", {"const": {"a": [1, "x"]}}, ({"a": [1, "x"]},), ({"a": [1]}, {"a": [1, "y"]}, 1))


def formats() -> Iterator[Case]:
    table = {
        "date": (("2024-02-29", "1999-12-31"), ("2024-02-30", "2024-13-01", "2024-1-01")),
        "time": (("08:30:06Z", "23:59:59.5+02:00"), ("08:30:06", "24:00:00Z", "8:30:06Z")),
        "date-time": (("2024-02-29T08:30:06Z", "1999-12-31T23:59:60Z"), ("2024-02-29 08:30:06Z", "2024-02-29T08:30Z")),
        "uuid": (("123e4567-e89b-12d3-a456-426614174000",), ("123e4567e89b12d3a456426614174000", "xyz")),
        "ipv4": (("192.168.0.1", "0.0.0.0"), ("256.1.1.1", "1.2.3", "01.2.3.4")),
        "ipv6": (("::1", "2001:db8::8a2e:370:7334"), ("2001:db8:::1", "12345::")),
        "email": (("ada@example.com",), ("ada.example.com", "@example.com")),
        "hostname": (("example.com", "a-b.c"), ("-ab.com", "a..b")),
        "duration": (("P1D", "PT1H30M"), ("P", "1D", "PT")),
        "uri": (("https://example.com/a?b=1", "urn:isbn:0451450523"), ("example.com", "://x")),
    }
    flagged = {"date": ("2023-02-29", "2100-02-29"), "date-time": ("2024-02-29T22:59:60Z", "2023-02-29T00:00:00Z")}
    for fmt, (good, bad) in table.items():
        yield Case("format", {"type": "string", "format": fmt}, good, bad, labelled=False,
                   flagged=flagged.get(fmt, ()))


def numbers() -> Iterator[Case]:
    for low, high in ((0, 10), (-5, 5)):
        yield Case("minimum", {"type": "integer", "minimum": low}, (low, low + 7), (low - 1, low - 20))
        yield Case("maximum", {"type": "integer", "maximum": high}, (high, high - 9), (high + 1, high + 100))
        yield Case("exclusiveMinimum", {"type": "number", "exclusiveMinimum": low}, (low + 1, low + 0.5),
                   (low, low - 1))
        yield Case("exclusiveMaximum", {"type": "integer", "exclusiveMaximum": high}, (high - 1,), (high, high + 1))
    for step in (3, 5):
        yield Case("multipleOf", {"type": "integer", "multipleOf": step}, (0, step, step * 4), (1, step + 1))
    yield Case("type", {"type": "integer"}, (0, -12, 345), (1.5, "1", None))
    yield Case("type", {"type": ["string", "null"]}, ("a", None), (1, False, []))
    yield Case("type", {"type": "boolean"}, (True, False), (0, "true"))


def arrays() -> Iterator[Case]:
    for n in (1, 2):
        yield Case("minItems", {"type": "array", "items": {"type": "integer"}, "minItems": n},
                   ([1] * n, [1] * (n + 1)), ([1] * (n - 1), ["a"] * n))
        yield Case("maxItems", {"type": "array", "items": {"type": "integer"}, "maxItems": n},
                   ([], [2] * n), ([2] * (n + 1),))
    yield Case("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
               ([], [1, 2, 3]), ([1, 1], [2, 3, 2]))
    yield Case("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                               "items": False}, (["a", 1], ["a"]), ([1, "a"], ["a", 1, 2]))
    yield Case("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 5}},
               ([5], [1, 9]), ([], [1, 2]))
    yield Case("minContains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 1},
                               "minContains": 2, "maxContains": 3}, ([1, 1], [1, 2, 1, 1]), ([1, 2], [1, 1, 1, 1]))
    yield Case("unevaluatedItems", {"type": "array", "prefixItems": [{"type": "integer"}],
                                    "unevaluatedItems": False}, ([1], []), ([1, 2], ["a"]))


def objects() -> Iterator[Case]:
    person = {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0}}
    yield Case("properties", obj(person), ({"name": "Ada", "age": 3},), ({"name": "Ada", "age": -1}, {"name": 1,
                                                                                                   "age": 3}))
    yield Case("required", obj(person, ["age"]), ({"age": 3}, {"name": "A", "age": 1}), ({"name": "Ada"}, {}))
    yield Case("additionalProperties", obj({"a": {"type": "integer"}}, [], additionalProperties={"type": "string"}),
               ({"a": 1}, {"a": 1, "b": "x"}), ({"a": 1, "b": 2},))
    yield Case("patternProperties", {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                                     "additionalProperties": False}, ({}, {"n_a": 1}), ({"n_a": "x"}, {"m": 1}))
    # Regexes that overlap: a name matching both satisfies both subschemas (checked while generating).
    yield Case("patternProperties", {"type": "object", "patternProperties": {"^a": {"type": "integer"},
                                                                             "b$": {"minimum": 5}},
                                     "additionalProperties": False},
               ({"ab": 7}, {"a": 1}, {"b": 9}, {"b": "x"}), ({"ab": 3}, {"ab": "x"}, {"b": 3}, {"c": 1}))
    yield Case("propertyNames", {"type": "object", "propertyNames": {"maxLength": 2},
                                 "additionalProperties": {"type": "integer"}}, ({"ab": 1},), ({"abc": 1},))
    for n in (1, 2):
        some = {k: {"type": "integer"} for k in "abc"}
        yield Case("minProperties", obj(some, [], minProperties=n), ({k: 1 for k in "abc"[:n]},),
                   ({k: 1 for k in "abc"[:n - 1]},))
        yield Case("maxProperties", obj(some, [], maxProperties=n), ({"a": 1}, {k: 1 for k in "abc"[:n]}),
                   ({k: 1 for k in "abc"[:n + 1]},))
    yield Case("dependentRequired", obj({"card": {"type": "string"}, "zip": {"type": "string"}}, [],
                                        dependentRequired={"card": ["zip"]}),
               ({}, {"zip": "1"}, {"card": "x", "zip": "1"}), ({"card": "x"},))
    yield Case("dependentSchemas", obj({"a": {"type": "integer"}, "b": {"type": "integer"}}, [],
                                       dependentSchemas={"a": {"required": ["b"]}}), ({"a": 1, "b": 2}, {"b": 2}),
               ({"a": 1},))
    yield Case("unevaluatedProperties", {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}}],
                                         "properties": {"b": {"type": "string"}}, "unevaluatedProperties": False},
               ({"a": 1}, {"b": "x"}, {}), ({"a": 1, "c": 2}, {"a": "x"}))
    yield from unevaluated()


def unevaluated() -> Iterator[Case]:
    """unevaluated* where what is evaluated depends on which branches hold: checked while generating."""
    a, b = {"a": {"type": "integer"}}, {"b": {"type": "string"}}
    for applicator in ("anyOf", "oneOf"):
        yield Case("unevaluatedProperties", {"type": "object", applicator: [obj(a), obj(b)],
                                             "unevaluatedProperties": False},
                   ({"a": 1}, {"b": "x"}), ({"a": 1, "c": 2}, {"a": "x", "b": "y"}, {"c": 1}))
    yield Case("unevaluatedProperties", {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}},
                                         "required": ["kind"], "if": {"properties": {"kind": {"const": "x"}}},
                                         "then": obj({"xv": {"type": "integer"}}),
                                         "else": obj({"yv": {"type": "boolean"}}), "unevaluatedProperties": False},
               ({"kind": "x", "xv": 1}, {"kind": "y", "yv": True}),
               ({"kind": "x", "yv": True}, {"kind": "y", "xv": 1}, {"kind": "x", "xv": 1, "z": 0}))
    yield Case("unevaluatedProperties", {"type": "object", "properties": {"a": {"type": "integer"}},
                                         "dependentSchemas": {"a": {"properties": {"b": {"type": "integer"}}}},
                                         "unevaluatedProperties": {"type": "string"}},
               ({"a": 1, "b": 2}, {"b": "x"}, {}), ({"b": 2}, {"a": 1, "c": 3}))
    pairs = {"prefixItems": [{"type": "string"}, {"type": "string"}]}
    yield Case("unevaluatedItems", {"type": "array", "anyOf": [{"prefixItems": [{"type": "integer"}]}, pairs],
                                    "unevaluatedItems": False},
               ([1], ["x", "y"], []), ([1, 2], ["x", "y", "z"]))


def applicators() -> Iterator[Case]:
    yield Case("allOf", {"allOf": [{"type": "integer", "minimum": 2}, {"maximum": 5}]}, (2, 5), (1, 6, "3"))
    yield Case("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]}, (7, "a"), ("ab", None))
    yield Case("oneOf", {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 10}]},
               (-3, 20), (5, "x"))
    yield Case("not", {"type": "integer", "not": {"enum": [1, 2]}}, (0, 3), (1, 2))
    yield Case("if", {"type": "integer", "if": {"minimum": 10}, "then": {"multipleOf": 2}, "else": {"maximum": 3}},
               (12, 2), (11, 5))
    yield Case("$ref", {"$defs": {"id": {"type": "string", "pattern": "^[0-9]{3}$"}},
                        "type": "array", "items": {"$ref": "#/$defs/id"}}, ([], ["123", "456"]), (["12"], [123]))
    yield Case("$anchor", {"$defs": {"id": {"$anchor": "ident", "type": "integer", "maximum": 3}},
                           "type": "array", "items": {"$ref": "#ident"}}, ([1, 3],), ([4],))
    tree = {"$defs": {"node": obj({"v": {"type": "integer"}, "kids": {"type": "array", "maxItems": 2,
                                                                       "items": {"$ref": "#/$defs/node"}}}, ["v"])},
            "$ref": "#/$defs/node"}
    yield Case("$ref", tree, ({"v": 1}, {"v": 1, "kids": [{"v": 2, "kids": []}]}), ({"v": 1, "kids": [{"w": 2}]},))


def references() -> Iterator[Case]:
    """Embedded resources, relative ids and dynamic references: what a validator resolves them to."""
    nested = {"$id": "https://example.com/root.json", "type": "object",
              "properties": {"a": {"$ref": "item.json"}, "b": {"$ref": "item.json#/$defs/n"}},
              "required": ["a", "b"],
              "$defs": {"item": {"$id": "item.json", "type": "string", "maxLength": 3,
                                 "$defs": {"n": {"type": "integer", "minimum": 0}}}}}
    yield Case("$id", nested, ({"a": "abc", "b": 1},), ({"a": "abcd", "b": 1}, {"a": "x", "b": -1}))
    tree = {"$id": "https://example.com/tree", "$dynamicAnchor": "node", "type": "object",
            "properties": {"data": {"type": "integer"},
                           "children": {"type": "array", "items": {"$dynamicRef": "#node"}}}}
    strict = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://example.com/strict-tree",
              "$dynamicAnchor": "node", "$ref": "tree", "unevaluatedProperties": False,
              "$defs": {"tree": tree}}
    # Strict at every level: the children's $dynamicRef reaches the strict root, not the plain tree.
    yield Case("$dynamicRef", strict, ({"data": 1, "children": [{"data": 2, "children": []}]}, {"data": 1}),
               ({"data": 1, "children": [{"data": 2, "extra": 1}]}, {"data": "x"}, {"extra": 1}))
    recursive = {"$schema": "https://json-schema.org/draft/2019-09/schema", "$id": "https://example.com/r",
                 "$recursiveAnchor": True, "type": "object", "required": ["v"],
                 "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$recursiveRef": "#"}}}}
    # Twelve definitions, each reaching three others: inlined path by path it passes any limit
    # (3**12 paths); kept as references it is twelve subschemas.
    mutual = {"$defs": {f"n{i}": obj({"v": {"type": "integer"}, **{f"to{j}": {"$ref": f"#/$defs/n{(i + j + 1) % 12}"}
                                                                      for j in range(3)}}, ["v"]) for i in range(12)},
              "$ref": "#/$defs/n0"}
    yield Case("$ref", mutual, ({"v": 1, "to0": {"v": 2, "to2": {"v": 3}}}, {"v": 0}),
               ({"v": 1, "to0": {"v": "x"}}, {"to0": {"v": 1}}, {"v": 1, "to1": {"w": 2}}))
    lone = {"$dynamicAnchor": "meta", "type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}
    yield Case("$dynamicAnchor", lone, ({"v": 1},), ({"v": "x"}, {}))
    yield Case("$recursiveRef", recursive, ({"v": 1, "kids": [{"v": 2}]},), ({"v": 1, "kids": [{"v": "x"}]}, {}))


def cases() -> list[Case]:
    return [*strings(), *formats(), *numbers(), *arrays(), *objects(), *applicators(), *references()]
