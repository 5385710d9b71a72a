"""Facts about subschemas that normalisation decides rewrites by: the JSON types a schema admits,
its finite domain (const/enum), whether it admits nothing, and whether two schemas can share an
instance (disjointness, for `oneOf` and `not`). Pure functions over schemas as JSON; no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve_app.constraints.keywords import VALIDATION_KEYWORDS

ALL_TYPES = frozenset({"null", "boolean", "object", "array", "string", "integer", "fraction"})


TYPE_NAMES = {"null": {"null"}, "boolean": {"boolean"}, "object": {"object"}, "array": {"array"},
               "string": {"string"}, "integer": {"integer"}, "number": {"integer", "fraction"}}


def excluded_values(sub: Any) -> list[Any] | None:
    """The values a `{const}` / `{enum}` / `{const, enum}` subschema accepts, or None for other shapes."""
    if not isinstance(sub, dict) or not (VALIDATION_KEYWORDS & sub.keys()) or not VALIDATION_KEYWORDS & sub.keys() \
            <= {"const", "enum"}:
        return None
    if "enum" in sub and not isinstance(sub["enum"], list):
        return None
    values = list(sub.get("enum", [])) + ([sub["const"]] if "const" in sub else [])
    if "const" in sub and "enum" in sub:  # both must hold: the const, if the enum lists it
        values = [sub["const"]] if any(json_equal(sub["const"], v) for v in sub["enum"]) else []
    return values


def finite_domain(schema: Any) -> list[Any] | None:
    """Every value `schema` can accept, when its own const/enum/boolean or null type makes that a finite
    list (the values other keywords beside them reject are not removed: they stay rejected there)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:  # with an enum too, both must hold
        listed = schema.get("enum")
        if isinstance(listed, list) and not any(json_equal(schema["const"], v) for v in listed):
            return []
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    names = type_list(schema.get("type"))
    if names and all(n in ("boolean", "null") for n in names):
        return [v for n in names for v in ([False, True] if n == "boolean" else [None])]
    return None


def is_never(schema: Any) -> bool:
    return schema is False or schema == {"not": {}}


def is_name_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def type_list(declared: Any) -> list[Any]:
    return [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []


def value_types(value: Any) -> frozenset[str]:
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, (int, float)):  # 1 == 1.0 in const/enum: a number may be of either kind
        return frozenset({"integer", "fraction"})
    kinds = {type(None): "null", str: "string", list: "array", dict: "object"}
    return frozenset({kinds[type(value)]}) if type(value) in kinds else ALL_TYPES


def union_of(sets: list[frozenset[str]]) -> frozenset[str]:
    return frozenset().union(*sets)


def admitted_types(schema: Any, refs: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """A superset of the JSON types `schema` accepts, from type, const, enum, kept $refs (`refs`) and the
    in-place applicators."""
    if schema is False:
        return frozenset()
    if not isinstance(schema, dict):
        return ALL_TYPES
    allowed = refs.get(schema.get("$ref", ""), ALL_TYPES)
    if isinstance(schema.get("type"), (str, list)):
        allowed &= union_of([frozenset(TYPE_NAMES.get(name, ALL_TYPES)) if isinstance(name, str) else ALL_TYPES
                           for name in type_list(schema["type"])])
    if "const" in schema:
        allowed &= value_types(schema["const"])
    if isinstance(schema.get("enum"), list):
        allowed &= union_of([value_types(value) for value in schema["enum"]])
    for member in schema.get("allOf", []):
        allowed &= admitted_types(member, refs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            allowed &= union_of([admitted_types(branch, refs) for branch in schema[key]])
    return allowed


def facets_of(schema: Any) -> list[dict[str, Any]]:
    """`schema` and its allOf members, recursively: all of them hold for a valid instance."""
    if not isinstance(schema, dict):
        return []
    return [schema] + [facet for member in schema.get("allOf", []) for facet in facets_of(member)]


def value_sets(schema: Any) -> list[list[Any]]:
    """Finite supersets of the values `schema` accepts, one per const or enum among its facets."""
    found = []
    for facet in facets_of(schema):
        if "const" in facet:
            found.append([facet["const"]])
        if isinstance(facet.get("enum"), list):
            found.append(facet["enum"])
    return found


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema's const and enum see it: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[key], b[key]) for key in a)
    return type(a) is type(b) and a == b


def property_schemas(schema: Any, name: str) -> list[Any]:
    return [props[name] for facet in facets_of(schema) if isinstance(props := facet.get("properties"), dict)
            and name in props]


def disjoint(a: Any, b: Any, refs: Mapping[str, frozenset[str]], within: frozenset[str] = ALL_TYPES) -> str | None:
    """Why no instance of a type in `within` is valid against both `a` and `b`, or None if unproven."""
    common = admitted_types(a, refs) & admitted_types(b, refs) & within
    if not common:
        return "types"
    if any(not any(json_equal(x, y) for x in xs for y in ys) for xs in value_sets(a) for ys in value_sets(b)):
        return "values"
    if common != {"object"}:
        return None
    facets = facets_of(a) + facets_of(b)
    required = {name for facet in facets if is_name_list(names := facet.get("required", [])) for name in names}
    for name in sorted(required):  # present in every object valid against both, so both its schemas hold
        if any(disjoint(x, y, refs) for x in property_schemas(a, name) for y in property_schemas(b, name)):
            return f"discriminator {name!r}"
    return None


def disjoint_schemas(branches: list[Any], within: frozenset[str], refs: Mapping[str, frozenset[str]]) -> str | None:
    """Why no two branches accept the same instance (of a type in `within`), or None if unproven."""
    reasons = []
    for i, a in enumerate(branches):
        for b in branches[i + 1:]:
            reason = disjoint(a, b, refs, within)
            if reason is None:
                return None
            reasons.append(reason)
    return ", ".join(dict.fromkeys(reasons))


# (the only JSON type a pair of bounds applies to, lower bound, upper bound)
_BOUND_PAIRS = (("object", "minProperties", "maxProperties"), ("array", "minItems", "maxItems"),
                ("array", "minContains", "maxItems"), ("string", "minLength", "maxLength"))


def admits_nothing(node: dict[str, Any], types: frozenset[str]) -> str | None:
    """Why `node` provably rejects every value (`types`: a superset of the JSON types it admits),
    or None: bounds that cross on the only type left, more required names than `maxProperties`,
    more unique items than their values, a `oneOf` whose branches are all the same schema."""
    if isinstance(node.get("enum"), list) and not node["enum"]:
        return "enum [] (no value is listed)"
    for kind, low, high in _BOUND_PAIRS:
        if types <= TYPE_NAMES[kind] and _number(node.get(low), 0) > _number(node.get(high), float("inf")):
            return f"{low} {node[low]} > {high} {node[high]}"
    if types <= {"integer", "fraction"} and _number(node.get("minimum"), -float("inf")) > \
            _number(node.get("maximum"), float("inf")):
        return f"minimum {node['minimum']} > maximum {node['maximum']}"
    required = set(node["required"]) if is_name_list(node.get("required")) else set()
    if types <= {"object"} and len(required) > _number(node.get("maxProperties"), float("inf")):
        return f"{len(required)} required properties > maxProperties {node['maxProperties']}"
    values = finite_domain(node.get("items")) if node.get("uniqueItems") is True and "prefixItems" not in node \
        else None
    if types <= {"array"} and values is not None and _number(node.get("minItems"), 0) > _distinct(values):
        return f"uniqueItems with minItems {node['minItems']} > the {_distinct(values)} values items allows"
    branches = node.get("oneOf")
    if isinstance(branches, list) and len(branches) > 1 and all(json_equal(b, branches[0]) for b in branches):
        return "oneOf whose branches are all the same schema (a value matching one matches every one)"
    return None


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _distinct(values: list[Any]) -> int:
    """How many different values (at most: past 1,000 values, not deduplicated; bounded work)."""
    if len(values) > 1000:
        return len(values)
    kept: list[Any] = []
    for value in values:
        if not any(json_equal(value, seen) for seen in kept):
            kept.append(value)
    return len(kept)


# In-place applicators whose annotations depend on the instance (which branch holds, whether a
# property is there): what they evaluate is not known before generating.
_CONDITIONAL = frozenset({"anyOf", "oneOf", "if", "then", "else", "dependentSchemas", "$ref", "$dynamicRef",
                          "$recursiveRef"})


def evaluated_properties(members: list[Any]) -> tuple[set[str], set[str], bool] | None:
    """What `allOf` members (which always apply) evaluate in every object they accept: (names of
    their `properties`, their `patternProperties`, whether one evaluates every property through
    `additionalProperties` or `unevaluatedProperties`); None where that depends on the instance.
    `not` evaluates nothing (its annotations are dropped)."""
    names: set[str] = set()
    patterns: set[str] = set()
    everything = False
    for member in members:
        if not isinstance(member, dict):
            continue
        if _CONDITIONAL & member.keys():
            return None
        names.update(member.get("properties", {}) if isinstance(member.get("properties"), dict) else ())
        patterns.update(member.get("patternProperties", {}) if isinstance(member.get("patternProperties"), dict)
                        else ())
        everything = everything or "additionalProperties" in member or "unevaluatedProperties" in member
        nested = member.get("allOf")
        inner = evaluated_properties(nested) if isinstance(nested, list) else (set(), set(), False)
        if inner is None:
            return None
        names, patterns, everything = names | inner[0], patterns | inner[1], everything or inner[2]
    return names, patterns, everything
