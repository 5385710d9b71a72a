"""Which JSON Schema draft a schema is written in, and what its `$ref`s reach: whether inlining
them keeps their meaning (`pointers_hold`) and how large the expansion gets. Pure Python."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from serve_app.constraints.keywords import SCHEMA_LISTS, child_entries, resolve_pointer
from serve_app.constraints.schema_facts import type_list
from serve_app.errors import ConstraintError

DRAFT_URI = re.compile(r"https?://json-schema\.org/(?:draft-0([467])|draft/(2019)-09|draft/(2020)-12)/schema#?")


def schema_draft(schema: dict[str, Any]) -> int | None:
    uri = schema.get("$schema")
    if uri is None:
        return 2020
    match = DRAFT_URI.fullmatch(uri) if isinstance(uri, str) else None
    return int(next(group for group in match.groups() if group)) if match else None


def subschemas_of(node: dict[str, Any]) -> list[Any]:
    deps = node.get("dependencies")
    extra = [d for d in deps.values() if isinstance(d, (dict, bool))] if isinstance(deps, dict) else []
    return [sub for _, sub in child_entries(node)] + extra


def walk_schema(schema: Any) -> Iterator[dict[str, Any]]:
    """Every subschema, definitions included, without following $ref."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(subschemas_of(node))


def pointers_hold(root: dict[str, Any], node: dict[str, Any], draft: int) -> bool:
    """Whether `node` keeps inlining exact: its $ref is a local JSON pointer to a schema, and it neither moves
    the base URI nor refers dynamically."""
    ident = node.get("$id", node.get("id") if draft == 4 else None)
    names_a_fragment = isinstance(ident, str) and ident.startswith("#")  # draft-06/07's "#name": no new base
    if (node is not root and ident is not None and not names_a_fragment) or \
            node.keys() & {"$dynamicRef", "$recursiveRef"}:
        return False
    if any(not isinstance(node.get(key, []), list) for key in SCHEMA_LISTS) or (
            draft == 2020 and isinstance(node.get("items"), list)):
        return False
    ref = node.get("$ref", "#")
    if not isinstance(ref, str) or ref.startswith("#/") and "" in ref[2:].split("/"):
        return False
    try:  # a pointer (percent-encoded too), an anchor, or either after the root's own $id
        return isinstance(resolve_pointer(root, ref), (dict, bool))
    except ConstraintError:
        return False


def needs_draft06_bounds(root: dict[str, Any]) -> bool:
    """Whether a draft-04 schema has boolean exclusive bounds and means the same under draft-07: no `integer`
    type anywhere (draft-04 says 1.0 is not an integer, later drafts say it is)."""
    nodes = list(walk_schema(root))
    bounds = any((n.get("exclusiveMinimum") is True and "minimum" in n)
                 or (n.get("exclusiveMaximum") is True and "maximum" in n) for n in nodes)
    return bounds and not any("integer" in type_list(n.get("type")) for n in nodes)


def expanded_size(root: dict[str, Any], ref: str, limit: int) -> int:
    """Subschemas in the target of `ref` with local $refs inlined (a recursive one counts once), up to `limit`."""
    count, stack = 0, [(resolve_pointer(root, ref), frozenset({ref}))]
    while stack and count <= limit:
        node, active = stack.pop()
        if not isinstance(node, dict):
            continue
        count += 1
        inner = node.get("$ref")
        if isinstance(inner, str) and inner not in active:
            stack.append((resolve_pointer(root, inner), active | {inner}))
        stack.extend((sub, active) for _, sub in child_entries(node, definitions=False))
    return count
