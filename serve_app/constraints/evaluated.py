"""`unevaluatedProperties` / `unevaluatedItems` where normalisation cannot rewrite them (beside
`anyOf`, `oneOf`, `if`/`then`/`else`, `dependentSchemas` or a recursive `$ref`: what is evaluated
depends on which branches hold): checked while generating (checks.py), with the grammar made as
tight as it can be without knowing the branches.

- The grammar: keys that no in-place subschema may evaluate (`possibly_evaluated`) follow the
  `unevaluatedProperties` subschema (`additionalProperties`); the others stay open.
- Each key, as it closes, where the object's subschema applies whatever the branches
  (`EvaluatedKeys`): one that nothing may evaluate is refused before its value is written.
- The whole subschema, at the value's close (jsonschema decides what was evaluated).
No torch import: the router plans with this.
"""

from __future__ import annotations

from typing import Any

from serve_app.constraints.keywords import iter_subschemas, resolve_pointer
from serve_app.constraints.validation import PATTERN_TIMEOUT_S, regex_search
from serve_app.errors import ConstraintError

UNEVALUATED = ("unevaluatedProperties", "unevaluatedItems")
# In-place applicators: their subschemas apply to the same instance.
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_VALUES = ("if", "then", "else")
# Subschemas one walk visits at most: past it, the answer is the cautious one (everything may be
# evaluated; an applicator may hold unevaluated*).
MAX_VISITS = 10_000


Evaluated = tuple[dict[str, list[Any]], set[str], bool]


def possibly_evaluated(node: dict[str, Any], root: Any) -> Evaluated:
    """Every property some in-place subschema of `node` (itself, its applicators, conditional ones
    included, and their `$ref`s, resolved against `root`) may evaluate in an object: (names of
    their `properties`, each with the subschemas declaring it, their `patternProperties`, whether
    one may evaluate any property through `additionalProperties` or a nested
    `unevaluatedProperties`). A key outside it is unevaluated in every instance, whichever branches
    hold. `not` evaluates nothing (its annotations are dropped)."""
    names: dict[str, list[Any]] = {}
    patterns: set[str] = set()
    stack, seen = [node], set()
    while stack:
        sub = stack.pop()
        if not isinstance(sub, dict) or id(sub) in seen:
            continue
        seen.add(id(sub))
        if len(seen) > MAX_VISITS or "additionalProperties" in sub or "$dynamicRef" in sub or \
                (sub is not node and "unevaluatedProperties" in sub):
            return names, patterns, True
        for name, declared in (sub["properties"].items() if isinstance(sub.get("properties"), dict) else ()):
            names.setdefault(name, []).append(declared)
        patterns.update(sub["patternProperties"] if isinstance(sub.get("patternProperties"), dict) else ())
        stack += [member for key in _IN_PLACE_LISTS if isinstance(sub.get(key), list) for member in sub[key]]
        stack += [sub[key] for key in _IN_PLACE_VALUES if key in sub]
        if isinstance(sub.get("dependentSchemas"), dict):
            stack += list(sub["dependentSchemas"].values())
        if isinstance(sub.get("$ref"), str):
            try:
                stack.append(resolve_pointer(root, sub["$ref"]))
            except ConstraintError:
                return names, patterns, True
    return names, patterns, False


def reaches_unevaluated(node: Any, root: Any) -> bool:
    """Whether `node` or a subschema under it (through `$ref`s too) has `unevaluated*`."""
    stack, seen = [node], set()
    while stack:
        for _, sub in iter_subschemas(stack.pop()):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if len(seen) > MAX_VISITS or any(key in sub for key in UNEVALUATED):
                return True
            if isinstance(sub.get("$ref"), str):
                try:
                    stack.append(resolve_pointer(root, sub["$ref"]))
                except ConstraintError:
                    return True
    return False


def grammar_closed(out: dict[str, Any], node: dict[str, Any], root: Any, rest: Any,
                   alternatives: list[tuple[list[Any], list[Any]]]) -> tuple[dict[str, Any], list[Any]]:
    """`out` (`node` as the grammar has it, `unevaluatedProperties` taken out) and its `alternatives`
    (groups of branches, as sent and as the grammar has them, one of each must hold), with keys
    that nothing may evaluate following `rest` (`unevaluatedProperties` in the grammar's form).

    Where the branches are one group (an `anyOf`, a `oneOf`, or `if`/`then`/`else`), each branch
    is closed to what it and the node around it may evaluate: an object whose keys only two `anyOf`
    branches together evaluate is left out (as declared-only objects leave undeclared keys out), and
    a branch's key never takes a value its branch forbids. Otherwise the node is closed to what any
    branch may evaluate: a branch's key is allowed whether or not its branch holds."""
    around = possibly_evaluated({k: v for k, v in node.items() if k not in _BRANCHING}, root)
    if len(alternatives) == 1 and "dependentSchemas" not in node and not around[2]:
        sent, branches = alternatives[0]
        closed = [_closed(branch, _joined(around, possibly_evaluated(whole, root)), rest)
                  for whole, branch in zip(sent, branches, strict=True)]
        return out, [(sent, closed)]
    return _closed(out, possibly_evaluated(node, root), rest), alternatives


_BRANCHING = ("anyOf", "oneOf", "if", "then", "else", "dependentSchemas")
# What may evaluate an array's items besides `prefixItems`.
_ITEM_WORDS = frozenset({"items", "additionalItems", "contains", "unevaluatedItems", "$ref", "$dynamicRef", "allOf",
                         "anyOf", "oneOf", "if", "then", "else", "dependentSchemas", "not"})


def items_closed(node: dict[str, Any], rest: Any,
                 alternatives: list[tuple[list[Any], list[Any]]]) -> list[tuple[list[Any], list[Any]]]:
    """`unevaluatedItems` (as `rest`, its grammar form) in the grammar where the node's branches are
    one group, each evaluating only its `prefixItems`, and nothing around them evaluates items: the
    items after each branch's `prefixItems` follow `rest`. Elsewhere the check alone decides."""
    around = {k: v for k, v in node.items() if k not in _BRANCHING and k != "unevaluatedItems"}
    if len(alternatives) != 1 or "dependentSchemas" in node or _ITEM_WORDS & around.keys():
        return alternatives
    sent, branches = alternatives[0]
    if not all(isinstance(whole, dict) and not _ITEM_WORDS & whole.keys() for whole in sent):
        return alternatives
    return [(sent, [{**branch, "items": rest} if isinstance(branch, dict) else branch for branch in branches])]


def _joined(a: Evaluated, b: Evaluated) -> Evaluated:
    names = {name: [*a[0].get(name, []), *b[0].get(name, [])] for name in {*a[0], *b[0]}}
    return names, a[1] | b[1], a[2] or b[2]


def _closed(schema: Any, evaluated: Evaluated, rest: Any) -> Any:
    """`schema` closed to the keys of `evaluated` (declared where it does not declare them: as what
    the subschemas declaring them or `rest` allow), the others following `rest`; as it is where
    anything may be evaluated."""
    names, patterns, everything = evaluated
    if everything or schema is False:
        return schema
    out = dict(schema) if isinstance(schema, dict) else {}
    declared = {**{name: _either(names[name], rest, name, patterns) for name in sorted(names)},
                **(out.get("properties") or {})}
    matching = {**{pattern: {} for pattern in sorted(patterns)}, **(out.get("patternProperties") or {})}
    for key, value in (("properties", declared), ("patternProperties", matching)):
        if value:
            out[key] = value
    out["additionalProperties"] = rest
    return out


def _either(declaring: list[Any], rest: Any, name: str, patterns: set[str]) -> Any:
    """What a name's value may be when the subschemas `declaring` it may not apply: one of theirs, or
    `rest`'s when none evaluates it; any value where a pattern may evaluate it or a subschema has
    keywords the grammar cannot have."""
    from serve_app.constraints.checks import has_checked_keywords  # (checks builds on this module)

    if any(regex_search(p, name, PATTERN_TIMEOUT_S) is not False for p in patterns) or any(
            not isinstance(s, dict) or not s or has_checked_keywords(s) for s in declaring):
        return {}
    options = [*declaring, *([] if rest is False else [rest])]
    kept = [o for i, o in enumerate(options) if o not in options[:i]]
    return kept[0] if len(kept) == 1 else {"anyOf": kept}


class EvaluatedKeys:
    """A key check (like a `propertyNames` validator): whether some in-place subschema may evaluate
    the key, where `unevaluatedProperties: false` applies whatever the branches."""

    def __init__(self, node: dict[str, Any], root: Any) -> None:
        self.names, self.patterns, self.everything = possibly_evaluated(node, root)

    def is_valid(self, key: str) -> bool:
        return self.everything or key in self.names or any(  # (a pattern too slow to decide: None, let through)
            regex_search(pattern, key, PATTERN_TIMEOUT_S) is not False for pattern in self.patterns)
