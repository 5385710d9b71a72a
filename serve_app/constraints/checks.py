"""Keywords no grammar expresses, enforced while generating: `not`, `oneOf` whose branches may
overlap, `uniqueItems`, `if`/`then`/`else`, `contains`, `dependentRequired`/`dependencies`,
`dependentSchemas`.

Planning (`split_checks`) takes them out of what the backend compiles (`oneOf` becomes `anyOf`,
the others go), which leaves a looser grammar, and keeps the schema with them as the one the
checks read. While a row generates, `RowChecker` scans its JSON text as it grows and, at the
close of every value, validates that value against the checked keywords of every subschema
that applies at its location (and, in an array with `uniqueItems`, against the items before
it). A token whose text would close a value that fails is not kept: the decode loop bans it
at that position and samples again, and when nothing is left there it rolls the row back a
token (never before the start of the value that failed), a depth-first search bounded by
`CHECK_BUDGET`. A row that spends its budget ends (`length`) and is reported, never valid.

Where a location is reached through `anyOf` branches, the checks of every branch apply: that
can only refuse more, never accept an invalid output. The full jsonschema validation after
generation still decides `valid`. No torch import: the router plans with this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from serve_app.cache import BoundedCache
from serve_app.constraints.evaluated import (
    UNEVALUATED,
    EvaluatedKeys,
    grammar_closed,
    items_closed,
    reaches_unevaluated,
)
from serve_app.constraints.keywords import (
    CHECKED_KEYWORDS,
    COUNT_KEYWORDS,
    iter_subschemas,
    map_subschemas,
    resolve_pointer,
)
from serve_app.constraints.normalize import exact_complement
from serve_app.constraints.patterns import GRAMMARLESS_REGEX, grammar_pattern, overlapping_patterns
from serve_app.constraints.validation import ENFORCED_FORMATS, PATTERN_TIMEOUT_S, regex_search, safe_validator
from serve_app.errors import ConstraintError

# Subschemas one location may expand to (anyOf branches, $refs, allOf parts); beyond, the rest are not checked.
MAX_APPLICABLE = 512
_CACHED_LOCATIONS = 4096


@dataclass(frozen=True)
class Split:
    grammar: dict[str, Any]  # what the backends compile
    sites: tuple[str, ...]  # "keyword at #/pointer", one per checked keyword


def has_checked_keywords(schema: dict[str, Any]) -> bool:
    return any(_checked(k, sub) for _, sub in iter_subschemas(schema) for k in sub)


def _checked(key: str, node: dict[str, Any]) -> bool:
    """Whether `key` of `node` leaves the grammar for the checks."""
    if key in COUNT_KEYWORDS:
        properties = node.get("properties")
        required = node.get("required")
        listed = set(required) if isinstance(required, list) else set()
        return isinstance(properties, dict) and bool(properties) and not set(properties) <= listed
    if key == "patternProperties":
        return overlapping_patterns(node[key])
    if key == "pattern":
        return isinstance(node[key], str) and GRAMMARLESS_REGEX.search(node[key]) is not None
    return key in CHECKED_KEYWORDS and not (key == "uniqueItems" and node[key] is not True)


# Keywords through which other subschemas say what a typeless one holds.
_APPLIES_OTHERS = frozenset({"$ref", "allOf", "anyOf", "oneOf"})
_SHAPES = frozenset({"properties", "patternProperties", "additionalProperties", "items", "prefixItems"})


def may_repeat_keys(schema: dict[str, Any]) -> bool:
    """Whether the grammar may write an object whose names are not all declared ones, spelled as
    declared: an object open to other names, or an array item or value any JSON may fill. There a
    name may repeat, or spell a declared one with escapes: the checks refuse both (row_checks.py)."""
    for _, node in iter_subschemas(schema):
        declared = node.get("type")
        types = {declared} if isinstance(declared, str) else set(declared) if isinstance(declared, list) else None
        if "enum" in node or "const" in node or (types is None and _APPLIES_OTHERS & node.keys()
                                                   and not _SHAPES & node.keys()):
            continue  # (its values are listed, or its branches say)
        if (types is None or "object" in types) and (
                node.get("additionalProperties") is not False or node.get("patternProperties")):
            return True
        items = node.get("items")
        if (types is None or "array" in types) and items is not False and (
                items is None or isinstance(items, list) and node.get("additionalItems") is not False):
            return True
    return False


def split_checks(schema: dict[str, Any]) -> Split:
    """The schema without its checked keywords (`oneOf` as `anyOf`), and where they were."""
    sites: list[str] = []

    def strip(node: Any, ptr: str) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in CHECKED_KEYWORDS or _checked(key, node):
                if _checked(key, node) and key not in ("then", "else", "minContains", "maxContains"):
                    sites.append(f"{key} at #{ptr or '/'}")
                continue
            out[key] = map_subschemas(key, value, ptr, strip)
        if "pattern" in node and _checked("pattern", node):  # the grammar has what it can of it
            relaxed = grammar_pattern(node["pattern"])
            out.update({"pattern": relaxed} if relaxed else {})
        if overlapping_patterns(node.get("patternProperties")):  # a name may match several: any one's subschema
            stripped = map_subschemas("patternProperties", node["patternProperties"], ptr, strip)
            out["patternProperties"] = {"|".join(f"(?:{p})" for p in stripped): {"anyOf": list(stripped.values())}}
        alternatives = []  # (the branches as sent, as the grammar has them): at least one holds
        if isinstance(node.get("oneOf"), list):
            alternatives.append((node["oneOf"], [strip(b, f"{ptr}/oneOf/{i}") for i, b in enumerate(node["oneOf"])]))
        if {"if", "then", "else"} <= node.keys():
            alternatives.append(_then_or_else(node, ptr, strip, sites))
        if any(k in node for k in UNEVALUATED) and isinstance(node.get("anyOf"), list) and "anyOf" in out:
            alternatives.insert(0, (node["anyOf"], out.pop("anyOf")))
        if "unevaluatedProperties" in node:
            rest = strip(node["unevaluatedProperties"], f"{ptr}/unevaluatedProperties")
            out, alternatives = grammar_closed(out, node, schema, rest, alternatives)
        if "unevaluatedItems" in node:
            alternatives = items_closed(node, strip(node["unevaluatedItems"], f"{ptr}/unevaluatedItems"), alternatives)
        for _, branches in alternatives:
            if "anyOf" in out:
                out["allOf"] = [*out.get("allOf", []), {"anyOf": branches}]
            else:
                out["anyOf"] = branches
        return out

    return Split(strip(schema, ""), tuple(dict.fromkeys(sites)))


def _then_or_else(node: dict[str, Any], ptr: str, strip: Callable[[Any, str], Any],
                  sites: list[str]) -> tuple[list[Any], list[Any]]:
    """Whatever `if` says, `if and then` or `else` holds (`not-if and else` where `if` has an exact
    complement): the grammar's part of if/then/else, as sent and as the grammar has it."""
    given = node["if"] if isinstance(node["if"], dict) else {}
    known = len(sites)
    condition = strip(given, f"{ptr}/if")
    del sites[known:]  # (checked as part of `if`)
    sent = [{"allOf": [given, node["then"]]}, node["else"]]
    branches = [{"allOf": [condition, strip(node["then"], f"{ptr}/then")]}, strip(node["else"], f"{ptr}/else")]
    complement = exact_complement(given, node) if given else None
    if complement is not None:
        sent[1], branches[1] = {"allOf": [complement, node["else"]]}, {"allOf": [complement, branches[1]]}
    return sent, branches


class Location(NamedTuple):
    checks: tuple[Any, ...]  # validators of the checked keywords of each subschema that applies
    unique: bool  # an array whose items must differ
    names: tuple[Any, ...] = ()  # validators of propertyNames: each key of an object here
    max_properties: int | None = None  # the fewest maxProperties that applies here
    declared: frozenset[str] = frozenset()  # property names the subschemas here declare

    @property
    def watched(self) -> bool:
        return bool(self.checks or self.names) or self.max_properties is not None


class ValueChecks:
    """The checks of one schema by instance location, shared by every row that uses it."""

    def __init__(self, schema: dict[str, Any], sites: tuple[str, ...]) -> None:
        self.root = schema
        self.sites = sites
        self._validator = safe_validator(schema, PATTERN_TIMEOUT_S, ENFORCED_FORMATS)
        # Keyed by id(): each entry holds its subschema, which keeps the id from being reused.
        self._fragments: BoundedCache[tuple[int, bool], tuple[Any, Any]] = BoundedCache(_CACHED_LOCATIONS)
        self._locations: BoundedCache[tuple[Any, ...], Location] = BoundedCache(_CACHED_LOCATIONS)
        self._tuple_items = max((len(sub[k]) for _, sub in iter_subschemas(schema) for k in ("prefixItems", "items")
                                 if isinstance(sub.get(k), list)), default=0)

    def at(self, path: tuple[Any, ...]) -> Location:
        # Items past the longest tuple form (prefixItems, items as a list) all follow the same subschemas.
        path = tuple(min(p, self._tuple_items) if isinstance(p, int) else p for p in path)
        found = self._locations.get(path)
        if found is not None:
            return found
        schemas = self._expand([(self.root, False)])
        for segment in path:
            schemas = self._expand(self._child(schemas, segment))
        checks: list[Any] = []
        names: list[Any] = []
        unique, most, declared = False, None, set[str]()
        for node, conditional in schemas:
            declared.update(node["properties"] if isinstance(node.get("properties"), dict) else ())
            unique = unique or node.get("uniqueItems") is True
            validator = self._fragment(node, conditional)
            if validator is not None:
                checks.append(validator)
            if isinstance(node.get("propertyNames"), (dict, bool)):
                names.append(self._validator.evolve(schema=node["propertyNames"]))
            if not conditional and node.get("unevaluatedProperties") is False:
                names.append(EvaluatedKeys(node, self.root))
            limit = node.get("maxProperties")
            if isinstance(limit, int) and not isinstance(limit, bool):
                most = limit if most is None else min(most, limit)
        found = Location(tuple(checks), unique, tuple(names), most, frozenset(declared))
        self._locations.put(path, found)
        return found

    def _fragment(self, node: dict[str, Any], conditional: bool) -> Any:
        known = self._fragments.get((id(node), conditional))
        if known is not None and known[0] is node:
            return known[1]
        keys = [k for k in (*CHECKED_KEYWORDS, *COUNT_KEYWORDS)
                if k in node and k not in ("uniqueItems", "propertyNames", *UNEVALUATED)]
        if not conditional:
            keys += self._evaluating(node)
        keys += [k for k in ("pattern", "patternProperties") if k in node and _checked(k, node)]
        if "if" not in node:
            keys = [k for k in keys if k not in ("then", "else")]
        fragment = {k: node[k] for k in dict.fromkeys(keys)}
        validator = self._validator.evolve(schema=fragment) if fragment else None
        self._fragments.put((id(node), conditional), (node, validator))
        return validator

    def _evaluating(self, node: dict[str, Any]) -> list[str]:
        """The keywords of a subschema that applies whatever the branches which decide an
        `unevaluated*` at or below it: all of them where it has one (what it evaluates depends on
        every applicator), else each conditional applicator holding one (validated whole: inside a
        branch, `unevaluated*` counts only where that branch holds, which only the whole says)."""
        if any(key in node for key in UNEVALUATED):
            return list(node)
        return [key for key in ("anyOf", "oneOf", "if", "then", "else", "dependentSchemas")
                if key in node and reaches_unevaluated(node[key], self.root)]

    def _expand(self, schemas: list[tuple[Any, bool]]) -> list[tuple[dict[str, Any], bool]]:
        """The subschemas that apply in place: through $ref, allOf/anyOf/oneOf, then/else, dependent
        schemas; each with whether it applies only where a branch holds (`conditional`: reached
        through anyOf/oneOf, then/else, a dependent schema, or from such a subschema)."""
        found: dict[int, tuple[dict[str, Any], bool]] = {}
        stack = list(reversed(schemas))
        while stack and len(found) < MAX_APPLICABLE:
            node, conditional = stack.pop()
            if not isinstance(node, dict) or (id(node) in found and (conditional or not found[id(node)][1])):
                continue
            found[id(node)] = (node, conditional)  # (reached again unconditionally: said so, and walked again)
            ref = node.get("$ref")
            if isinstance(ref, str):
                with contextlib.suppress(ConstraintError):
                    stack.append((resolve_pointer(self.root, ref), conditional))
            if isinstance(node.get("allOf"), list):
                stack.extend((member, conditional) for member in reversed(node["allOf"]))
            for key in ("anyOf", "oneOf"):
                if isinstance(node.get(key), list):
                    stack.extend((member, True) for member in reversed(node[key]))
            stack.extend((node[key], True) for key in ("then", "else") if key in node)
            for key in ("dependentSchemas", "dependencies"):
                if isinstance(node.get(key), dict):
                    stack.extend((v, True) for v in node[key].values() if isinstance(v, dict))
        return list(found.values())

    def _child(self, schemas: list[tuple[dict[str, Any], bool]], segment: Any) -> list[tuple[Any, bool]]:
        out: list[tuple[Any, bool]] = []
        for node, conditional in schemas:
            if isinstance(segment, str):
                matched = False
                properties = node.get("properties")
                if isinstance(properties, dict) and segment in properties:
                    out.append((properties[segment], conditional))
                    matched = True
                patterns = node.get("patternProperties")
                for pattern, sub in (patterns.items() if isinstance(patterns, dict) else ()):
                    if regex_search(pattern, segment, PATTERN_TIMEOUT_S):
                        out.append((sub, conditional))
                        matched = True
                if not matched and isinstance(node.get("additionalProperties"), dict):
                    out.append((node["additionalProperties"], conditional))
                continue
            prefix, items = node.get("prefixItems"), node.get("items")
            if isinstance(items, list):  # draft-04..2019 tuple form
                prefix, items = items, node.get("additionalItems")
            if isinstance(prefix, list) and segment < len(prefix):
                out.append((prefix[segment], conditional))
            elif isinstance(items, dict):
                out.append((items, conditional))
        return out
