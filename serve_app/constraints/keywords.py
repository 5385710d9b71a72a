"""Which JSON Schema keywords and formats each backend enforces, and the walkers over a schema
(subschemas, patterns, $refs, size) that every later step relies on.

A keyword a backend would silently ignore makes the request fail with the keyword and its JSON
pointer, instead of returning output that violates the schema. The tables come from probing the
installed backends (llguidance errors on exactly the keys in its "unimplemented" set; see
docs/json-schema.md for outlines_core and xgrammar, which ignore keys silently).
No torch or Outlines import: the router uses this to reject early.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from serve_app.errors import ConstraintError

# Keywords that constrain instances. Anything else (title, description, default, examples,
# $comment, x-*, unknown keys) is an annotation and changes nothing a validator accepts.
VALIDATION_KEYWORDS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems", "minItems",
    "uniqueItems", "contains", "maxContains", "minContains", "maxProperties", "minProperties",
    "required", "dependentRequired", "dependencies", "allOf", "anyOf", "oneOf", "not", "if",
    "then", "else", "dependentSchemas", "prefixItems", "items", "additionalItems", "properties",
    "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
    "unevaluatedProperties", "$ref", "$dynamicRef", "$recursiveRef",
})

_COMMON = frozenset({
    "type", "enum", "const", "maxLength", "minLength", "pattern", "format", "maxItems",
    "minItems", "required", "anyOf", "prefixItems", "items", "properties",
    "additionalProperties", "$ref",
})

SUPPORTED: dict[str, frozenset[str]] = {
    "llguidance": _COMMON | {
        "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
        "maxProperties", "minProperties", "allOf", "oneOf", "additionalItems", "patternProperties",
    },
    # outlines_core ignores numeric bounds, min/maxProperties, not/if/uniqueItems/contains, and
    # compiles oneOf as a regex union (anyOf). Its allOf is too strict, never too loose.
    "outlines_core": _COMMON | {"allOf"},
    # xgrammar treats overlapping oneOf as anyOf, ignores allOf and multipleOf.
    "xgrammar": _COMMON | {
        "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxProperties",
        "minProperties", "additionalItems",
    },
}

# Every `format` some backend enforces, with its shortest instance (what closing writes; each
# is checked by jsonschema before use), and the subset each backend enforces. An unknown format
# is an annotation: normalisation drops it (llguidance would refuse it).
FORMATS: dict[str, str] = {
    "date-time": "2000-01-01T00:00:00Z", "date": "2000-01-01", "time": "00:00:00Z", "duration": "P1D",
    "email": "a@a.aa", "hostname": "a", "ipv4": "0.0.0.0", "ipv6": "::1",
    "uuid": "00000000-0000-0000-0000-000000000000", "uri": "a:a",
}
SUPPORTED_FORMATS: dict[str, frozenset[str]] = {
    "llguidance": frozenset(FORMATS),
    "outlines_core": frozenset({"date-time", "time", "date", "uuid", "email", "uri"}),
    "xgrammar": frozenset({"date-time", "time", "date", "email", "ipv4", "ipv6", "hostname", "uuid", "uri"}),
}
# Keywords no grammar expresses: taken out of what the backends compile and checked while
# generating, at the close of the value they apply to (checks.py; `propertyNames` at the close of
# each key, `maxProperties` as each key starts, too).
CHECKED_KEYWORDS = ("not", "oneOf", "uniqueItems", "if", "then", "else", "contains", "minContains", "maxContains",
                    "dependentRequired", "dependencies", "dependentSchemas", "propertyNames",
                    "unevaluatedProperties", "unevaluatedItems")
# No backend has them; normalisation turns them into keywords that backends have where the schema's
# shape allows it (refs.py: dynamic references; normalize.py: unevaluated*); dynamic references are
# refused otherwise, unevaluated* checked (evaluated.py).
REWRITTEN = ("$dynamicRef", "$recursiveRef", "unevaluatedProperties", "unevaluatedItems")
# Checked where the grammar cannot have them: llguidance enforces these only when every declared
# property is required.
COUNT_KEYWORDS = ("minProperties", "maxProperties")

# Where subschemas sit: keyword -> {name: subschema}, [subschema, ...] or one subschema (`items` is
# either of the last two; `dependencies` maps names to a subschema or a list of names).
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_VALUES = ("not", "if", "then", "else", "additionalProperties", "additionalItems",
                 "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def escape_pointer(token: str) -> str:
    """One JSON pointer segment (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def map_subschemas(key: str, value: Any, pointer: str, fn: Callable[[Any, str], Any]) -> Any:
    """The value of keyword `key` (of the schema at `pointer`) with `fn(subschema, its pointer)`
    applied to every subschema it holds; the value as it is when it holds none."""
    where = f"{pointer}/{escape_pointer(key)}"
    if key in SCHEMA_MAPS and isinstance(value, dict):
        return {name: fn(sub, f"{where}/{escape_pointer(name)}") for name, sub in value.items()}
    if key == "dependencies" and isinstance(value, dict):
        return {name: sub if isinstance(sub, list) else fn(sub, f"{where}/{escape_pointer(name)}")
                for name, sub in value.items()}
    if (key in SCHEMA_LISTS or key == "items") and isinstance(value, list):
        return [fn(sub, f"{where}/{i}") for i, sub in enumerate(value)]
    if key in SCHEMA_VALUES or key == "items":
        return fn(value, where)
    return value


def child_entries(schema: dict[str, Any], definitions: bool = True) -> Iterator[tuple[str, Any]]:
    """(pointer suffix, subschema) for each direct subschema, in document order; `definitions`
    includes ``$defs``/``definitions`` (schemas that only count where a ``$ref`` uses them)."""
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict) and (definitions or key not in ("$defs", "definitions")):
            for name, sub in schema[key].items():
                yield f"/{key}/{escape_pointer(name)}", sub
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield f"/{key}/{i}", sub
    for key in SCHEMA_VALUES:
        if key in schema:
            yield f"/{key}", schema[key]
    items = schema.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            yield f"/items/{i}", sub
    elif items is not None:
        yield "/items", items


def iter_subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (JSON pointer, subschema) in a schema, the root first, in document order. Iterative:
    a schema nested deeper than Python's recursion limit is walked like any other."""
    stack: list[tuple[str, Any]] = [(pointer, schema)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            yield where, node
            stack.extend(reversed([(where + suffix, sub) for suffix, sub in child_entries(node)]))


def schema_patterns(schema: Any) -> Iterator[str]:
    """Every regex in a schema: `pattern` values and `patternProperties` keys."""
    for _, sub in iter_subschemas(schema):
        if isinstance(sub.get("pattern"), str):
            yield sub["pattern"]
        if isinstance(sub.get("patternProperties"), dict):
            yield from sub["patternProperties"]


def check_refs(schema: Any) -> None:
    """Local $refs resolve against the root here; under a nested `$id` (a new base URI) they
    would resolve against that subschema instead. refs.rebased rewrites such schemas first (the
    nested `$id`s go); one that still has them here is refused rather than enforced with a
    different meaning than a validator gives it."""
    stack: list[tuple[str, Any, bool]] = [("", schema, False)]
    while stack:
        where, node, rebased = stack.pop()
        if not isinstance(node, dict):
            continue
        new_id = node.get("$id")  # "#..." ids name a fragment of this document (draft 6/7): no new base
        rebased = rebased or (bool(where) and isinstance(new_id, str) and not new_id.startswith("#"))
        if rebased and isinstance(node.get("$ref"), str):
            raise ConstraintError(f"$ref at #{where} is under a nested $id: only $refs that resolve against the "
                                  f"root schema are supported", param="json_schema", code="unsupported_ref")
        stack.extend((where + suffix, sub, rebased) for suffix, sub in child_entries(node))


def resolve_pointer(root: Any, ref: str) -> Any:
    """A reference inside this document, or ConstraintError: a JSON pointer (``#/...``, percent-
    encoded parts included), a plain-name fragment (``#name``: a `$anchor`, or draft-06/07's
    ``"$id": "#name"``), either after the root's own `$id` (``https://x/s.json#/$defs/a``)."""
    base = root.get("$id") if isinstance(root, dict) else None
    if isinstance(base, str) and not ref.startswith("#") and ref.split("#", 1)[0] in (base, base.split("#", 1)[0]):
        ref = "#" + ref.split("#", 1)[1] if "#" in ref else "#"
    if not ref.startswith("#"):
        raise ConstraintError(f"only local $refs (inside this document: '#/...', '#anchor') are supported, got "
                              f"{ref!r}", param="json_schema", code="unsupported_ref")
    if len(ref) > 1 and not ref.startswith("#/"):
        return _anchor(root, urllib.parse.unquote(ref[1:]), ref)
    node = root
    for raw in [p for p in ref[1:].split("/") if p]:
        part = urllib.parse.unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConstraintError(f"unresolvable $ref {ref!r}", param="json_schema", code="unresolvable_ref")
    return node


def _anchor(root: Any, name: str, ref: str) -> Any:
    for _, node in iter_subschemas(root):
        if node.get("$anchor") == name or node.get("$id") == f"#{name}":
            return node
    raise ConstraintError(f"unresolvable $ref {ref!r} (no $anchor {name!r})", param="json_schema",
                          code="unresolvable_ref")


def schema_size(schema: Any, max_nodes: int) -> tuple[int, int]:
    """(deepest nesting, subschemas after inlining local $refs), counting stops past `max_nodes`.

    A $ref already being expanded on the current path (recursion) counts once, and so does, in the
    whole schema, a $ref that can reach itself: normalisation keeps those as references for the
    backend rather than inlining them. A "$ref bomb" (definitions that each reference the next
    twice, no cycle: everything must be inlined) grows exponentially and hits the cap."""
    nodes, depth = 0, 0
    cyclic, expanded = recursive_refs(schema), set()
    stack: list[tuple[Any, int, frozenset[str]]] = [(schema, 1, frozenset())]
    while stack and nodes <= max_nodes:
        node, level, active = stack.pop()
        if not isinstance(node, dict):
            continue
        nodes, depth = nodes + 1, max(depth, level)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in active and not (ref in cyclic and ref in expanded):
            expanded.add(ref)
            stack.append((resolve_pointer(schema, ref), level + 1, active | {ref}))
        stack.extend((child, level + 1, active) for _, child in child_entries(node, definitions=False))
    return depth, nodes


# Subschemas `recursive_refs` visits at most, over all the $refs' targets: past it (a hostile
# schema of many $refs to large targets) no $ref counts as recursive, the stricter count.
MAX_CYCLE_VISITS = 200_000


def recursive_refs(schema: Any) -> frozenset[str]:
    """The local $refs whose target can reach the same $ref again (through other $refs)."""
    if not isinstance(schema, dict):
        return frozenset()
    refs = {n["$ref"] for _, n in iter_subschemas(schema) if isinstance(n.get("$ref"), str)}
    graph: dict[str, set[str]] = {}
    budget = [MAX_CYCLE_VISITS]
    for ref in refs:
        try:
            target = resolve_pointer(schema, ref)
        except ConstraintError:
            continue
        graph[ref] = {n["$ref"] for n in _applied(target, budget) if isinstance(n.get("$ref"), str)}
        if budget[0] <= 0:
            return frozenset()
    return frozenset(ref for ref in graph if ref in _reachable(graph, graph[ref]))


def _applied(node: Any, budget: list[int]) -> Iterator[dict[str, Any]]:
    """`node` and its subschemas, definitions left out (what applies to an instance of it), while
    `budget` (visits, shared) lasts."""
    stack = [node]
    while stack and budget[0] > 0:
        sub = stack.pop()
        if isinstance(sub, dict):
            budget[0] -= 1
            yield sub
            stack.extend(child for _, child in child_entries(sub, definitions=False))


def _reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def unsupported_keywords(schema: dict[str, Any], backend: str) -> list[tuple[str, str]]:
    """(keyword, pointer) pairs the backend cannot enforce, in document order."""
    supported, formats = SUPPORTED[backend], SUPPORTED_FORMATS[backend]
    found = []
    for pointer, sub in iter_subschemas(schema):
        for key in sub:
            if key in VALIDATION_KEYWORDS and key not in supported:
                found.append((key, pointer))
        fmt = sub.get("format")
        if isinstance(fmt, str) and fmt not in formats:
            found.append((f"format: {fmt}", pointer))
        for key in ("exclusiveMinimum", "exclusiveMaximum"):  # draft-04 booleans outside draft-04: ambiguous
            if isinstance(sub.get(key), bool):
                found.append((f"{key}: {str(sub[key]).lower()}", pointer))
    return found


def check_schema_supported(schema: dict[str, Any], backend: str) -> None:
    """Raise `ConstraintError` naming the first keyword `backend` would not enforce."""
    found = unsupported_keywords(schema, backend)
    if found:
        keyword, pointer = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConstraintError(
            f"unsupported JSON Schema keyword '{keyword}' at #{pointer or '/'} "
            f"for backend {backend}{more}",
            param="json_schema", code="unsupported_keyword",
        )


def keyword_table_markdown() -> str:
    """The README's supported-keyword table, generated from `SUPPORTED` ("checked": taken out of the
    grammar and checked while generating, whatever the backend; serve_app/constraints/checks.py)."""
    backends = list(SUPPORTED)
    lines = ["| keyword | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for key in sorted(VALIDATION_KEYWORDS, key=str.lower):
        cells = ["rewritten, else checked" if key in CHECKED_KEYWORDS and key in REWRITTEN else
                 "checked" if key in CHECKED_KEYWORDS else "rewritten" if key in REWRITTEN else
                 "yes" if key in SUPPORTED[b] else "rejected" for b in backends]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    for b in backends:
        lines.append(f"\n`format` values enforced by {b}: " + ", ".join(sorted(SUPPORTED_FORMATS[b])))
    return "\n".join(lines)
