"""One plan per constraint: `plan_constraint` decides everything that needs no tokenizer, once,
with the same function at the router (to reject early) and in the engine (whose compiler
consumes the plan and checks nothing again).

A plan has passed `check_constraint` (limits, then semantics); for a JSON Schema, the schema is
normalised (rewrites that keep meaning, `normalize.py`) and each backend of the cascade, in
order, is checked against its keyword table (`keywords.SUPPORTED`): those that pass are the
plan's backends, compiled in that order by the engine's compiler, which falls through on an
explicit error, a detected approximation or the compile timeout. No torch or Outlines import.

Default order, from measurement (`bench/schema_coverage.py`, SmolLM2's tokenizer): llguidance
first (compiles in milliseconds and errors instead of approximating), then xgrammar when it is
installed (fast, but approximates silently: its warnings are parsed), then outlines_core (its
regex index takes from 0.1 s to timeouts on large schemas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.constraints.checks import has_checked_keywords, may_repeat_keys, split_checks
from serve_app.constraints.drafts import walk_schema
from serve_app.constraints.keywords import FORMATS, unsupported_keywords
from serve_app.constraints.kinds import AnyConstraint, JsonSchemaConstraint
from serve_app.constraints.limits import LimitsConfig, check_constraint
from serve_app.constraints.normalize import normalize_schema
from serve_app.constraints.refs import rebased
from serve_app.constraints.registry import KINDS, BackendDefaults
from serve_app.constraints.schema_facts import is_never
from serve_app.errors import ConstraintError, InvalidRequestError

KNOWN_FORMATS = frozenset(FORMATS)
KIND_NAMES = {"json_schema": "JSON Schemas", "regex": "regexes", "choice": "choice lists", "grammar": "Lark grammars"}
# The backend that approximates a schema no backend enforces exactly, under `strict: false`.
LENIENT_BACKEND = "llguidance"


@dataclass(frozen=True)
class Plan:
    """What the compiler needs: which backends to try, in order, on what."""

    constraint: AnyConstraint  # as sent: outputs are checked against it
    target: AnyConstraint  # what the backends compile (a JSON Schema normalised)
    backends: tuple[str, ...]  # in order; for a JSON Schema, those whose tables cover it
    key: str  # the cache key of what is compiled: candidate order + the constraint's key
    rewrites: tuple[str, ...] = ()  # meaning-preserving rewrites of the schema
    lenient: bool = False  # strict: false; when no backend is exact, llguidance approximates
    checks: tuple[str, ...] = ()  # keywords taken out of `target`, checked while generating (checks.py)
    check_schema: dict[str, Any] | None = None  # the normalised schema with them: what the checks read


def plan_constraint(constraint: AnyConstraint, limits: LimitsConfig, defaults: BackendDefaults,
                    installed: Sequence[str], source: str | None = None) -> Plan:
    """The plan, or the 4xx error that refuses the constraint (naming `source`, the request
    field it came from, where the error is about its text)."""
    try:
        return _plan(constraint, limits, defaults, installed, source)
    except InvalidRequestError as error:
        raise in_tool(error, constraint, source) from None


def in_tool(error: InvalidRequestError, constraint: AnyConstraint, source: str | None) -> InvalidRequestError:
    """A refusal of a tool's parameters (`source` is `tools.N.function.parameters`) names that
    field, in `param` and in the message, where it named the constraint's kind."""
    if not source or not source.startswith("tools.") or error.param not in (None, constraint.type, "schema"):
        return error
    return type(error)(f"{source}: {error.message}", param=source, code=error.code)


def _plan(constraint: AnyConstraint, limits: LimitsConfig, defaults: BackendDefaults,
          installed: Sequence[str], source: str | None) -> Plan:
    check_constraint(constraint, limits, source)
    order = backend_order(constraint, defaults, installed)
    key = f"{'|'.join(order)}|{constraint.cache_key()}"
    if not isinstance(constraint, JsonSchemaConstraint):
        return Plan(constraint, constraint, tuple(order), key)
    undeclared = defaults.undeclared_properties if constraint.undeclared_properties is None \
        else constraint.undeclared_properties
    schema_plan = plan_schema(rebased(constraint.json_schema), order, limits.max_ref_expansion,
                              declared_only=not undeclared)
    lenient = not constraint.strict and LENIENT_BACKEND in installed
    if not schema_plan.exact and not lenient:
        raise schema_plan.rejection(constraint.strict)
    target = constraint.model_copy(update={"json_schema": schema_plan.schema})
    return Plan(constraint, target, schema_plan.exact, key, schema_plan.rewrites, lenient, schema_plan.checks,
                schema_plan.checked)


def backend_order(constraint: AnyConstraint, defaults: BackendDefaults, installed: Sequence[str]) -> list[str]:
    """The backends to try: the one the request names, the cascade (JSON Schema), or the kind's
    configured backend; each installed here and able to compile the kind."""
    chosen = constraint.backend or getattr(defaults, constraint.type)
    if chosen == "cascade":
        order: list[str] = [b for b in defaults.cascade if b in installed]
        if not order:
            raise ConstraintError(f"no backend of backends.cascade ({', '.join(defaults.cascade)}) is installed "
                                  f"here; installed: {', '.join(installed)}", param="backend")
        return order
    if chosen not in installed:
        raise ConstraintError(f"backend {chosen!r} is not installed here; installed: {', '.join(installed)}",
                              param="backend")
    if constraint.type not in KINDS[chosen]:
        able = [b for b, kinds in KINDS.items() if constraint.type in kinds]
        raise ConstraintError(f"{KIND_NAMES[constraint.type]} compile with {', '.join(able)} only, not {chosen}",
                              param="backend")
    return [chosen]


@dataclass(frozen=True)
class SchemaPlan:
    schema: dict[str, Any]  # normalised (without the checked keywords when there are checks)
    rewrites: tuple[str, ...]
    exact: tuple[str, ...]  # backends whose tables cover every keyword, in cascade order
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # backend -> (keyword, pointer)
    checks: tuple[str, ...] = ()  # "keyword at #pointer" of each keyword checked while generating
    checked: dict[str, Any] | None = None  # the normalised schema with them

    def rejection(self, strict: bool = True) -> ConstraintError:
        """The 400 for a schema no backend enforces: the first keyword (and its pointer in the
        schema as sent) that the first backend of the cascade lacks."""
        backend = next(iter(self.missing))
        keyword, pointer = self.missing[backend][0]
        others = [f"{b} also lacks '{m[0][0]}' at #{m[0][1] or '/'}" for b, m in self.missing.items() if b != backend]
        more = f" ({len(self.missing[backend]) - 1} more)" if len(self.missing[backend]) > 1 else ""
        hint = "; set strict: false to accept an approximation checked after generation" if strict else ""
        return ConstraintError(
            f"unsupported JSON Schema keyword '{keyword}' at #{pointer or '/'} for backend {backend}{more}: "
            f"no backend enforces it exactly{' (' + '; '.join(others) + ')' if others else ''}{hint}",
            param="json_schema", code="unsupported_keyword")


def plan_schema(schema: dict[str, Any], order: Sequence[str], max_nodes: int = 10_000,
                declared_only: bool = False) -> SchemaPlan:
    """Normalise; with `declared_only`, objects that leave `additionalProperties` out get only their
    declared properties; then keywords no grammar expresses (`not`, overlapping `oneOf`, `uniqueItems`,
    `if`, ...) move from the grammar to checks made while generating (checks.py); then the backends
    that cover the rest."""
    normalized = normalize_schema(schema, KNOWN_FORMATS, max_nodes)
    if _rejects_everything(normalized.schema):
        raise ConstraintError("this schema admits no value (its normalised form rejects everything: "
                              f"{'; '.join(normalized.rewrites[-3:]) or 'false'})", param="json_schema",
                              code="unsatisfiable_schema")
    rewrites, planned = normalized.rewrites, normalized.schema
    if declared_only:
        planned, closed = DeclaredOnly(planned).schema()
        rewrites += (f"additionalProperties at {_listed(closed)} -> false (declared properties only; "
                     "undeclared_properties: true allows others)",) if closed else ()
    grammar, checks, checked = planned, tuple[str, ...](), None
    if has_checked_keywords(planned):
        split = split_checks(planned)  # (`then` without `if` is an annotation: dropped, not checked)
        grammar, checks, checked = split.grammar, split.sites, planned if split.sites else None
    if checked is None and may_repeat_keys(grammar):  # (no keyword to check; each object's names are)
        checked = planned
    exact: list[str] = []
    missing: dict[str, list[tuple[str, str]]] = {}
    for backend in order:
        found = unsupported_keywords(grammar, backend)
        if found:  # point into the schema as sent where the keyword is there too ($refs get inlined)
            as_sent: dict[str, str] = {}
            for keyword, pointer in unsupported_keywords(schema, backend):
                as_sent.setdefault(keyword, pointer)
            missing[backend] = [(k, as_sent.get(k, p)) for k, p in found]
        else:
            exact.append(backend)
    return SchemaPlan(grammar, rewrites, tuple(exact), missing, checks, checked)


def _rejects_everything(schema: Any) -> bool:
    """The normalised root is `false` (or draft-04's `not: {}`), beside its identity keys."""
    if isinstance(schema, dict):
        schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
    return is_never(schema)


# Where a subschema stands alone (its properties are all an instance there may have, if it says so),
# and where it is combined with others (allOf members, if/then/else, not, contains): never closed there.
_STANDALONE = ("properties", "additionalProperties", "items", "prefixItems", "propertyNames", "$defs", "definitions",
               "additionalItems")
# contains applies to items beside `items`; a key can match a pattern and be declared too.
_COMBINED = ("allOf", "not", "if", "then", "else", "dependentSchemas", "dependencies", "contains", "patternProperties")
_ALTERNATIVES = ("anyOf", "oneOf")
_OBJECT_WORDS = frozenset({"properties", "required", "patternProperties", "additionalProperties", "minProperties",
                           "maxProperties", "propertyNames", "dependentRequired", "dependencies"})
_OPENS = frozenset({"additionalProperties", "unevaluatedProperties", "$ref", "$dynamicRef", *_COMBINED,
                    *_ALTERNATIVES, "dependentRequired"})
# Beside declared properties, these may stay when they name only declared ones (_names_only).
_APPLICATORS = frozenset({"allOf", "anyOf", "oneOf", "not", "if", "then", "else"})
_NAMING = frozenset({"patternProperties", "additionalProperties", "unevaluatedProperties", "propertyNames", "$ref",
                     "$dynamicRef", "dependentSchemas", "dependencies", "dependentRequired"})


class DeclaredOnly:
    """`additionalProperties: false` on every object subschema that declares properties, leaves
    additionalProperties out and stands alone (not an allOf member or a $ref target used in one;
    the applicators beside it and everything it requires name only declared properties;
    minProperties within reach): what OpenAI's strict mode and xgrammar generate. The grammar's
    outputs are a subset of the valid ones; the output is still checked against the schema as sent."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.root = schema
        self.shared: set[str] = set()  # $refs used where schemas combine: their targets stay open
        self.closed: list[str] = []

    def schema(self) -> tuple[dict[str, Any], list[str]]:
        if any("unevaluatedProperties" in node for node in walk_schema(self.root)):
            return self.root, []  # "evaluated" depends on every applicator: left as it is
        self._find_shared(self.root, False)
        closed = self._close(self.root, "", True)
        return closed, sorted(self.closed, key=lambda pointer: (pointer.count("/"), pointer))

    def _find_shared(self, node: Any, combined: bool) -> None:
        if not isinstance(node, dict):
            return
        if combined and isinstance(node.get("$ref"), str):
            self.shared.add(node["$ref"])
        for key, child, _ in _children(node):
            self._find_shared(child, combined or key in _COMBINED)

    def _close(self, node: Any, ptr: str, alone: bool) -> Any:
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key, child, where in _children(node):
            own = alone if key in _ALTERNATIVES and not _OBJECT_WORDS & node.keys() else key in _STANDALONE
            own = own and not (key == "properties" and "patternProperties" in node)  # a pattern may match too
            rewritten = self._close(child, f"{ptr}/{key}/{where}".rstrip("/"), own)
            _put(out, key, where, rewritten)
        if alone and f"#{ptr}" not in self.shared and self._closable(node):
            out["additionalProperties"] = False
            self.closed.append(f"#{ptr or '/'}")
        return out

    @staticmethod
    def _closable(node: dict[str, Any]) -> bool:
        props = node.get("properties")
        if not isinstance(props, dict) or not props or (_OPENS - _APPLICATORS) & node.keys():
            return False
        types = node.get("type", "object")
        if "object" not in (types if isinstance(types, list) else [types]):
            return False
        return _names_only(node, set(props))


def _names_only(node: Any, declared: set[str]) -> bool:
    """Whether `node` and the applicators beside it (anyOf branches, if/then/else, ...) name only
    `declared` properties and ask for no more of them than there are: closing the object to them
    then leaves every constraint satisfiable that was."""
    if not isinstance(node, dict):
        return True
    required, least = node.get("required", []), node.get("minProperties", 0)
    if _NAMING & node.keys() or not isinstance(required, list) or not set(required) <= declared:
        return False
    if not set(node.get("properties") or {}) <= declared or isinstance(least, int) and least > len(declared):
        return False
    members: list[Any] = []
    for key in _APPLICATORS & node.keys():
        members += node[key] if isinstance(node[key], list) else [node[key]]
    return all(_names_only(member, declared) for member in members)


def _children(node: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(keyword, subschema, its key or index under the keyword) for each subschema of `node`."""
    out: list[tuple[str, Any, str]] = []
    for key in (*_STANDALONE, *_COMBINED, *_ALTERNATIVES):
        value = node.get(key)
        if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"):
            out += [(key, v, k) for k, v in value.items()] if isinstance(value, dict) else []
        elif isinstance(value, list):
            out += [(key, v, str(i)) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            out.append((key, value, ""))
    return out


def _put(out: dict[str, Any], key: str, where: str, value: Any) -> None:
    if where == "":
        out[key] = value
    elif isinstance(out[key], dict):
        out[key] = {**out[key], where: value}
    else:
        out[key] = [value if str(i) == where else v for i, v in enumerate(out[key])]


def _listed(pointers: list[str], shown: int = 8) -> str:
    more = f" and {len(pointers) - shown} more" if len(pointers) > shown else ""
    return ", ".join(pointers[:shown]) + more
