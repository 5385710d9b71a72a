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
from dataclasses import dataclass
from typing import Any, NamedTuple

from serve_app.cache import BoundedCache
from serve_app.constraints.keywords import (
    CHECKED_KEYWORDS,
    COUNT_KEYWORDS,
    iter_subschemas,
    map_subschemas,
    resolve_pointer,
)
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
    return key in CHECKED_KEYWORDS and not (key == "uniqueItems" and node[key] is not True)


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
        if isinstance(node.get("oneOf"), list):  # an instance matches at least one branch: the grammar's part
            branches = [strip(b, f"{ptr}/oneOf/{i}") for i, b in enumerate(node["oneOf"])]
            if "anyOf" in out:
                out["allOf"] = [*out.get("allOf", []), {"anyOf": branches}]
            else:
                out["anyOf"] = branches
        return out

    return Split(strip(schema, ""), tuple(dict.fromkeys(sites)))


class Location(NamedTuple):
    checks: tuple[Any, ...]  # validators of the checked keywords of each subschema that applies
    unique: bool  # an array whose items must differ
    names: tuple[Any, ...] = ()  # validators of propertyNames: each key of an object here
    max_properties: int | None = None  # the fewest maxProperties that applies here

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
        self._fragments: BoundedCache[int, tuple[Any, Any]] = BoundedCache(_CACHED_LOCATIONS)
        self._locations: BoundedCache[tuple[Any, ...], Location] = BoundedCache(_CACHED_LOCATIONS)
        self._tuple_items = max((len(sub[k]) for _, sub in iter_subschemas(schema) for k in ("prefixItems", "items")
                                 if isinstance(sub.get(k), list)), default=0)

    def at(self, path: tuple[Any, ...]) -> Location:
        # Items past the longest tuple form (prefixItems, items as a list) all follow the same subschemas.
        path = tuple(min(p, self._tuple_items) if isinstance(p, int) else p for p in path)
        found = self._locations.get(path)
        if found is not None:
            return found
        schemas = self._expand([self.root])
        for segment in path:
            schemas = self._expand(self._child(schemas, segment))
        checks, names, unique, most = [], [], False, None
        for node in schemas:
            unique = unique or node.get("uniqueItems") is True
            validator = self._fragment(node)
            if validator is not None:
                checks.append(validator)
            if isinstance(node.get("propertyNames"), (dict, bool)):
                names.append(self._validator.evolve(schema=node["propertyNames"]))
            limit = node.get("maxProperties")
            if isinstance(limit, int) and not isinstance(limit, bool):
                most = limit if most is None else min(most, limit)
        found = Location(tuple(checks), unique, tuple(names), most)
        self._locations.put(path, found)
        return found

    def _fragment(self, node: dict[str, Any]) -> Any:
        known = self._fragments.get(id(node))
        if known is not None and known[0] is node:
            return known[1]
        keys = [k for k in (*CHECKED_KEYWORDS, *COUNT_KEYWORDS)
                if k in node and k not in ("uniqueItems", "propertyNames")]
        if "if" not in node:
            keys = [k for k in keys if k not in ("then", "else")]
        fragment = {k: node[k] for k in keys}
        validator = self._validator.evolve(schema=fragment) if fragment else None
        self._fragments.put(id(node), (node, validator))
        return validator

    def _expand(self, schemas: list[Any]) -> list[dict[str, Any]]:
        """The subschemas that apply in place: through $ref, allOf/anyOf/oneOf, then/else, dependent schemas."""
        out: list[dict[str, Any]] = []
        stack, seen = list(reversed(schemas)), set()
        while stack and len(out) < MAX_APPLICABLE:
            node = stack.pop()
            if not isinstance(node, dict) or id(node) in seen:
                continue
            seen.add(id(node))
            out.append(node)
            ref = node.get("$ref")
            if isinstance(ref, str):
                with contextlib.suppress(ConstraintError):
                    stack.append(resolve_pointer(self.root, ref))
            for key in ("allOf", "anyOf", "oneOf"):
                if isinstance(node.get(key), list):
                    stack.extend(reversed(node[key]))
            stack.extend(node[key] for key in ("then", "else") if key in node)
            for key in ("dependentSchemas", "dependencies"):
                if isinstance(node.get(key), dict):
                    stack.extend(v for v in node[key].values() if isinstance(v, dict))
        return out

    def _child(self, schemas: list[dict[str, Any]], segment: Any) -> list[Any]:
        out: list[Any] = []
        for node in schemas:
            if isinstance(segment, str):
                matched = False
                properties = node.get("properties")
                if isinstance(properties, dict) and segment in properties:
                    out.append(properties[segment])
                    matched = True
                patterns = node.get("patternProperties")
                for pattern, sub in (patterns.items() if isinstance(patterns, dict) else ()):
                    if regex_search(pattern, segment, PATTERN_TIMEOUT_S):
                        out.append(sub)
                        matched = True
                if not matched and isinstance(node.get("additionalProperties"), dict):
                    out.append(node["additionalProperties"])
                continue
            prefix, items = node.get("prefixItems"), node.get("items")
            if isinstance(items, list):  # draft-04..2019 tuple form
                prefix, items = items, node.get("additionalItems")
            if isinstance(prefix, list) and segment < len(prefix):
                out.append(prefix[segment])
            elif isinstance(items, dict):
                out.append(items)
        return out
