"""References as a validator resolves them, rewritten as pointers from the root: a `$ref` under a
nested `$id` (an embedded resource, a relative id) resolves against that resource's base URI,
and a `$dynamicRef` (`$recursiveRef` in draft 2019-09) in the recursive-extension pattern reaches
the outermost resource that declares its dynamic anchor. What the rest of the constraint layer
sees afterwards is one document whose `$ref`s are `#/...` pointers, so inlining, normalising and
the backends keep the meaning a validator gives the schema. The check after generation still
runs on the schema as sent.

A `$dynamicRef` whose target would depend on the path taken to reach it (two resources below the
root declare its anchor) is refused, as are references that leave the document.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

from serve_app.constraints.keywords import child_entries, resolve_pointer
from serve_app.errors import ConstraintError

# The root's base URI when it declares none (never fetched: nothing here leaves the document).
ROOT_BASE = "urn:serve-app:schema"
DYNAMIC = ("$dynamicRef", "$recursiveRef")
DYNAMIC_KEYS = frozenset({*DYNAMIC, "$dynamicAnchor", "$recursiveAnchor"})


def needs_rebasing(schema: Any) -> bool:
    """Whether any `$ref` could mean something else than a pointer from the root (a nested `$id`
    that moves the base URI, a dynamic reference), or a dynamic anchor is left that some backends
    refuse (llguidance does, though nothing refers to it)."""
    return any(node is not schema and _moves_base(node) or node.keys() & DYNAMIC_KEYS for _, node in _walk(schema))


def rebased(schema: Any) -> Any:
    """`schema` with every reference a pointer from the root (unchanged when none needs it)."""
    if not isinstance(schema, dict) or not needs_rebasing(schema):
        return schema
    return _Index(schema).rewrite(schema)


def _moves_base(node: dict[str, Any]) -> bool:
    ident = node.get("$id")
    return isinstance(ident, str) and not ident.startswith("#")


def _walk(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    stack: list[tuple[str, Any]] = [(pointer, schema)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            yield where, node
            stack.extend((where + suffix, sub) for suffix, sub in child_entries(node))


def _quoted(pointer: str) -> str:
    return "/".join(urllib.parse.quote(part, safe="~$!&'()*+,;=:@") for part in pointer.split("/"))


class _Index:
    """Every resource (by absolute URI) and anchor in the document, with its pointer."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.base_of: dict[str, str] = {}  # pointer of a subschema -> its base URI
        self.resources: dict[str, str] = {}  # resource URI -> pointer
        self.anchors: dict[tuple[str, str], str] = {}  # (resource URI, name) -> pointer
        self.dynamic: dict[str, list[str]] = {}  # dynamic anchor name -> resource URIs declaring it
        self.recursive: list[str] = []  # resources with "$recursiveAnchor": true
        self._index("", root, urllib.parse.urljoin(ROOT_BASE, root.get("$id", "")) if _moves_base(root) else ROOT_BASE)

    def _index(self, pointer: str, node: dict[str, Any], base: str) -> None:
        stack = [(pointer, node, base)]
        while stack:
            where, sub, outer = stack.pop()
            here = urllib.parse.urljoin(outer, sub["$id"]) if where and _moves_base(sub) else outer
            here = urllib.parse.urldefrag(here)[0]
            self.base_of[where] = here
            if where == "" or _moves_base(sub):
                self.resources.setdefault(here, where)
            self._anchors(where, sub, here)
            stack.extend((where + suffix, child, here) for suffix, child in child_entries(sub)
                         if isinstance(child, dict))

    def _anchors(self, where: str, node: dict[str, Any], resource: str) -> None:
        names = [node.get("$anchor"), node.get("$dynamicAnchor")]
        ident = node.get("$id")
        if isinstance(ident, str) and "#" in ident and not ident.endswith("#"):
            names.append(ident.split("#", 1)[1])  # draft-06/07's "#name" (or "doc.json#name")
        for name in (n for n in names if isinstance(n, str)):
            self.anchors.setdefault((resource, name), where)
        if isinstance(node.get("$dynamicAnchor"), str):
            self.dynamic.setdefault(node["$dynamicAnchor"], []).append(resource)
        if node.get("$recursiveAnchor") is True and self.resources.get(resource) == where:
            self.recursive.append(resource)

    def rewrite(self, schema: dict[str, Any]) -> dict[str, Any]:
        """A copy with every reference a root pointer, and no nested `$id` left to move a base."""
        copy = json.loads(json.dumps(schema))
        for pointer, node in _walk(copy):
            if pointer and _moves_base(node):
                del node["$id"]  # every reference below is a root pointer now: the base it set is spent
            for spent in ("$dynamicAnchor", "$recursiveAnchor"):  # nothing refers dynamically any more
                node.pop(spent, None)
            for key in ("$ref", *DYNAMIC):
                if isinstance(node.get(key), str):
                    target = self.target(key, node.pop(key), self.base_of[pointer], pointer)
                    if "$ref" in node:  # a $ref beside a $dynamicRef: both apply
                        node["allOf"] = [*node.get("allOf", []), {"$ref": target}]
                    else:
                        node["$ref"] = target
        return copy

    def target(self, key: str, ref: str, base: str, pointer: str) -> str:
        """The root pointer `ref` (written at `pointer`, under `base`) reaches."""
        uri, fragment = urllib.parse.urldefrag(urllib.parse.urljoin(base, ref))
        if uri not in self.resources:
            raise ConstraintError(f"$ref {ref!r} at #{pointer} leaves this document: only references inside it are "
                                  f"supported", param="json_schema", code="unsupported_ref")
        fragment = urllib.parse.unquote(fragment)
        if key == "$recursiveRef":
            uri = self._outermost(uri, self.recursive, ref, pointer)
        elif key == "$dynamicRef" and fragment and not fragment.startswith("/"):
            uri = self._outermost(uri, self.dynamic.get(fragment, []), ref, pointer)
        if not fragment or fragment.startswith("/"):
            found = "#" + _quoted(self.resources[uri] + fragment)
            try:
                resolve_pointer(self.root, found)
            except ConstraintError:
                raise ConstraintError(f"unresolvable $ref {ref!r} at #{pointer} (against the base {uri})",
                                      param="json_schema", code="unresolvable_ref") from None
            return found
        anchored = self.anchors.get((uri, fragment))
        if anchored is None:
            raise ConstraintError(f"unresolvable $ref {ref!r} at #{pointer} (no anchor {fragment!r})",
                                  param="json_schema", code="unresolvable_ref")
        return "#" + _quoted(anchored)

    def _outermost(self, uri: str, declaring: list[str], ref: str, pointer: str) -> str:
        """The resource a dynamic reference reaches: its static target's where that declares no
        dynamic anchor (or $recursiveAnchor); else the root's, or the only resource declaring it."""
        if uri not in declaring:
            return uri
        if self.base_of[""] in declaring:  # the root is the outermost resource of every path
            return self.base_of[""]
        if len(set(declaring)) == 1:
            return uri
        raise ConstraintError(f"{ref!r} at #{pointer}: several resources declare its dynamic anchor and which one "
                              f"it reaches depends on the path; not supported", param="json_schema",
                              code="unsupported_ref")
