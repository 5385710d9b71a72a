"""The minimum budget of a planned constraint: the fewest tokens of a complete output we can
construct, and, for a JSON Schema, the closer that keeps an output within its `max_tokens`. One
function for every engine: a request whose `max_tokens` is below it gets the same 400 from each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_app.constraints.json_completion import JsonCloser
from serve_app.constraints.keywords import resolve_pointer
from serve_app.constraints.kinds import ChoiceConstraint, JsonSchemaConstraint
from serve_app.constraints.plan import Plan
from serve_app.constraints.validation import ENFORCED_FORMATS
from serve_app.errors import ConstraintError

logger = logging.getLogger(__name__)
COMPACT = (",", ":")


@dataclass(frozen=True)
class Budget:
    closer: JsonCloser | None  # shortest completions, for closing JSON within max_tokens
    min_tokens: int | None  # None: no minimum known (the engine's own length limit decides)


def minimum_budget(plan: Plan, encode: Callable[[str], list[int]], separators: tuple[str, str] = COMPACT) -> Budget:
    """`encode`: the fewest tokens that spell a text; `separators`: what the grammar writes
    between items and after keys."""
    constraint = plan.constraint
    if isinstance(constraint, ChoiceConstraint):
        return Budget(None, min(len(encode(choice)) for choice in constraint.choices))
    if not isinstance(constraint, JsonSchemaConstraint):
        return Budget(None, None)
    # The normalised schema accepts the same instances, in shapes the closer follows (if/then/else and
    # oneOf as anyOf branches, refs inlined); with checks, the grammar's schema, and a completion must
    # pass the checked keywords too. Else (no completion known for it) the schema as sent.
    target = plan.target if isinstance(plan.target, JsonSchemaConstraint) else constraint
    try:
        closer = JsonCloser(target.json_schema, encode, ENFORCED_FORMATS, separators, whole=plan.check_schema)
        if closer.min_text is None and target is not constraint:
            closer = JsonCloser(constraint.json_schema, encode, ENFORCED_FORMATS, separators)
    except Exception:  # noqa: BLE001 - no closer means honest truncation, never a failed request
        logger.warning("cannot build a closer for %s", plan.key, exc_info=True)
        return Budget(None, None)
    return Budget(closer, closer.min_tokens)


def least_chars(plan: Plan) -> int:
    """A lower bound on the characters of any output the plan accepts, computed without building
    one (a 200 KB `const` or a `minLength` of 100,000 is counted, not written): compared with
    `max_tokens` x the longest token, it refuses a budget that cannot fit before any compile."""
    constraint = plan.constraint
    if isinstance(constraint, ChoiceConstraint):
        return min(len(choice) for choice in constraint.choices)
    target = plan.target if isinstance(plan.target, JsonSchemaConstraint) else constraint
    if not isinstance(target, JsonSchemaConstraint):
        return 0
    return _LeastChars(target.json_schema).of(target.json_schema, 0)


class _LeastChars:
    """Per subschema, the fewest characters (compact JSON) of a value it accepts; 1 wherever that
    is not known cheaply (a number, a pattern, a cycle of $refs)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.busy: set[int] = set()  # subschemas being counted: a recursive $ref counts 1 there
        # Each $ref's target counted once: a count made while an ancestor was busy is lower, still a
        # lower bound, and definitions reached along many paths (mutual recursion) are not walked again.
        self.by_ref: dict[str, int] = {}

    def of(self, schema: Any, depth: int) -> int:
        if not isinstance(schema, dict) or id(schema) in self.busy or depth > _MAX_COUNT_DEPTH:
            return 1
        self.busy.add(id(schema))
        try:
            return max(1, self._count(schema, depth))
        finally:
            self.busy.discard(id(schema))

    def _count(self, s: dict[str, Any], depth: int) -> int:
        least = 1
        ref = s.get("$ref")
        if isinstance(ref, str):
            try:
                if ref not in self.by_ref:
                    self.by_ref[ref] = self.of(resolve_pointer(self.root, ref), depth + 1)
                least = self.by_ref[ref]
            except ConstraintError:
                return 1
        if "const" in s:
            least = max(least, _least_text(s["const"]))
        if isinstance(s.get("enum"), list) and s["enum"]:
            least = max(least, min(_least_text(v) for v in s["enum"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list) and s[key]:
                least = max(least, min(self.of(option, depth + 1) for option in s[key]))
        if isinstance(s.get("allOf"), list):
            least = max([least] + [self.of(part, depth + 1) for part in s["allOf"]])
        return max(least, self._by_type(s, depth))

    def _by_type(self, s: dict[str, Any], depth: int) -> int:
        types = s.get("type")
        names = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        if not names or not all(isinstance(n, str) for n in names):
            return 1
        return min(self._of_type(name, s, depth) for name in names)

    def _of_type(self, name: str, s: dict[str, Any], depth: int) -> int:
        if name == "string":
            return 2 + _count_of(s, "minLength")
        if name == "array":
            return self._array(s, depth)
        if name == "object":
            return self._object(s, depth)
        return {"null": 4, "boolean": 4}.get(name, 1)

    def _array(self, s: dict[str, Any], depth: int) -> int:
        count = max(_count_of(s, "minItems"), _count_of(s, "minContains") if "contains" in s else 0)
        prefix: list[Any] = s["prefixItems"] if isinstance(s.get("prefixItems"), list) else []
        items = sum([self.of(sub, depth + 1) for sub in prefix[:count]])
        rest = count - min(count, len(prefix))
        if rest:
            items += rest * self.of(s.get("items", {}), depth + 1)
        return 2 + items + max(0, count - 1)

    def _object(self, s: dict[str, Any], depth: int) -> int:
        required = {k for k in s["required"] if isinstance(k, str)} if isinstance(s.get("required"), list) else set()
        properties: dict[str, Any] = s["properties"] if isinstance(s.get("properties"), dict) else {}
        members = sum([_least_text(k) + 1 + self.of(properties.get(k, {}), depth + 1) for k in required])
        count = max(len(required), _count_of(s, "minProperties"))
        members += (count - len(required)) * 4  # "":0 at least, keys being distinct
        return 2 + members + max(0, count - 1)


_MAX_COUNT_DEPTH = 64


def _count_of(s: dict[str, Any], key: str) -> int:
    value = s.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0


def _least_text(value: Any) -> int:
    """The shortest JSON text of `value`: a number may be written shorter than it was sent (1.0 as 1)."""
    if isinstance(value, str):
        return len(json.dumps(value, ensure_ascii=False))
    if isinstance(value, list):
        return 2 + sum(_least_text(v) for v in value) + max(0, len(value) - 1)
    if isinstance(value, dict):
        return 2 + sum(_least_text(k) + 1 + _least_text(v) for k, v in value.items()) + max(0, len(value) - 1)
    return 4 if isinstance(value, bool) or value is None else 1
