"""What output is allowed: one discriminated union of typed constraints.

Construction checks only shapes and types (cheap, bounded). What parses or compiles the
constraint (JSON Schema meta-validation, `re.compile`, a Lark parse) is `check_semantics`, and
`check_constraint` runs it only after `check_limits` has bounded the work: sizes, nesting depths,
counts. Each constraint has a canonical ``cache_key()``, knows how to check an output
(``is_satisfied_by``), and converts to the Outlines output type. No torch or Outlines import at
module level: the router uses this.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.errors import ConstraintError, LimitExceededError

REGEX_CHECK_TIMEOUT_S = 0.5
# Outputs are checked for the formats a backend enforces; any other `format` is an annotation
# (as JSON Schema specifies by default), so the check must not enforce it either.
# (jsonschema checks a format only when its optional checker library is installed.)
ENFORCED_FORMATS = jsonschema.FormatChecker(formats=[
    name for name in ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri")
    if name in jsonschema.FormatChecker.checkers])
# Regex features no token-level automaton can enforce: lookaround and backreferences.
_UNSUPPORTED_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\\k<|\(\?P=")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    backend: Literal["llguidance", "outlines_core", "xgrammar"] | None = Field(
        None, description="compile with this backend instead of the model's default for the kind"
    )

    def cache_key(self) -> str:
        payload = self._dumps(sort_keys=True, separators=(",", ":"))
        return f"{self.type}:{hashlib.sha256(payload.encode()).hexdigest()[:32]}"  # type: ignore[attr-defined]

    def _canonical(self) -> Any:
        raise NotImplementedError

    def source_bytes(self) -> int:
        return len(self._dumps().encode())

    def _dumps(self, **options: Any) -> str:
        try:
            return json.dumps(self._canonical(), **options)
        except RecursionError:  # nesting past Python's stack: over any depth limit there is
            kind = str(getattr(self, "type", "constraint"))
            raise LimitExceededError(f"{kind} is nested too deeply (past limits.max_schema_depth)", param=kind,
                                     code="max_schema_depth") from None


class JsonSchemaConstraint(_Base):
    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool = Field(True, description="false: when no backend enforces the schema exactly, accept an "
                                           "approximation; the output is still checked after generation")

    def check_semantics(self) -> None:
        validator = jsonschema.validators.validator_for(self.json_schema, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(self.json_schema)
        except jsonschema.SchemaError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            raise ConstraintError(f"invalid JSON Schema at #/{path}: {error.message}",
                                  param="json_schema", code="invalid_schema") from None

    def _canonical(self) -> Any:
        return self.json_schema if self.strict else [self.json_schema, "approximate"]

    @cached_property
    def _validator(self) -> jsonschema.protocols.Validator:
        return safe_validator(self.json_schema, REGEX_CHECK_TIMEOUT_S, ENFORCED_FORMATS)

    def is_satisfied_by(self, text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        try:
            return bool(self._validator.is_valid(value))
        except Exception:  # noqa: BLE001 - a check that cannot finish (_Undecided too) never proves validity
            return False

    def to_outlines(self) -> Any:
        from outlines.types import JsonSchema

        return JsonSchema(json.dumps(self.json_schema))


def regex_search(pattern: str, text: str, timeout_s: float) -> bool | None:
    """`re.search` semantics (as JSON Schema's `pattern`) with a time limit: None when a
    backtracking pattern such as ``^(a+)+$`` takes too long on this text."""
    import regex

    try:  # concurrent: the match runs without the GIL, so other threads (the event loop) go on
        return regex.search(pattern, text, timeout=timeout_s, concurrent=True) is not None
    except TimeoutError:
        return None
    except (regex.error, RecursionError):
        return False


class _Undecided(Exception):
    """A key pattern ran out of time: nothing can be concluded about the instance."""


def safe_validator(schema: dict[str, Any], timeout_s: float, format_checker: Any = None) -> Any:
    """A jsonschema validator whose every regex runs with a time limit: `pattern`, and the key
    patterns of `patternProperties` and of `additionalProperties` (jsonschema runs those through
    plain `re`, which holds the GIL while it backtracks). A pattern it cannot decide in time
    counts as not matching: output is never called valid without proof."""
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)

    def matches(pattern: str, key: str) -> bool:
        """Whether `key` matches; a pattern not decided in time raises (the output is then invalid)."""
        found = regex_search(pattern, key, timeout_s)
        if found is None:
            raise _Undecided(f"key {key[:40]!r} against {pattern[:40]!r} not decided in time")
        return found

    def pattern(validator: Any, expected: str, instance: Any, _schema: Any) -> Any:
        if validator.is_type(instance, "string") and not matches(expected, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {expected!r} (or not decided in time)")

    def pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, _schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        for regex, subschema in patterns.items():
            for key, value in instance.items():
                if matches(regex, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=regex)

    def additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        declared = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in declared and not any(matches(p, k) for p in patterns)]
        if validator.is_type(additional, "object"):
            for key in extras:
                yield from validator.descend(instance[key], additional, path=key)
        elif additional is False and extras:
            yield jsonschema.ValidationError(f"additional properties are not allowed ({sorted(extras)!r})")

    overrides = {"pattern": pattern, "patternProperties": pattern_properties,
                 "additionalProperties": additional_properties}
    return jsonschema.validators.extend(base, overrides)(schema, format_checker=format_checker)


class RegexConstraint(_Base):
    type: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1)

    def check_semantics(self) -> None:
        if _UNSUPPORTED_REGEX.search(self.pattern):
            raise ConstraintError("lookaround and backreferences cannot be enforced token by token",
                                  param="pattern", code="unsupported")
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ConstraintError(f"invalid regex: {error}", param="pattern", code="invalid_regex") from None

    def _canonical(self) -> Any:
        return self.pattern

    def is_satisfied_by(self, text: str) -> bool | None:
        """None when the check itself ran out of time: a backtracking checker can take
        exponential time on patterns like ``(a+)+$`` that token automata handle fine."""
        import regex

        try:
            return regex.fullmatch(self.pattern, text, timeout=REGEX_CHECK_TIMEOUT_S, concurrent=True) is not None
        except TimeoutError:
            return None

    def to_outlines(self) -> Any:
        from outlines.types import Regex

        return Regex(self.pattern)


class ChoiceConstraint(_Base):
    type: Literal["choice"] = "choice"
    choices: list[str] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[str]) -> list[str]:
        if any(choice == "" for choice in choices):
            raise ValueError("choices must be non-empty strings")
        if len(set(choices)) != len(choices):
            raise ValueError("choices must be distinct")
        return choices

    def _canonical(self) -> Any:
        return sorted(self.choices)

    def check_semantics(self) -> None:
        """Nothing to parse: the field validator has checked everything."""

    def as_regex(self) -> str:
        return "(" + "|".join(re.escape(choice) for choice in self.choices) + ")"

    def is_satisfied_by(self, text: str) -> bool:
        return text in self.choices

    def to_outlines(self) -> Any:
        from outlines.types import Regex

        return Regex(self.as_regex())


class GrammarConstraint(_Base):
    """A Lark context-free grammar whose start rule is ``start``."""

    type: Literal["grammar"] = "grammar"
    grammar: str = Field(min_length=1)

    def check_semantics(self) -> None:
        import lark

        check_lark_imports(self.grammar)
        try:
            lark.Lark(self.grammar, start="start", parser="earley")
        except (lark.exceptions.LarkError, OSError) as error:  # OSError: an %import lark could not read
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConstraintError(f"invalid Lark grammar: {first_line[:300]}", param="grammar",
                                  code="invalid_grammar") from None

    def _canonical(self) -> Any:
        return self.grammar

    @cached_property
    def _parser(self) -> Any:
        import lark

        return lark.Lark(self.grammar, start="start", parser="earley")

    def is_satisfied_by(self, text: str) -> bool:
        import lark

        try:
            self._parser.parse(text)
        except lark.exceptions.LarkError:
            return False
        return True

    def to_outlines(self) -> Any:
        from outlines.types import CFG

        return CFG(self.grammar)


Constraint = Annotated[
    JsonSchemaConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint,
    Field(discriminator="type"),
]


class _ConstraintHolder(BaseModel):
    constraint: Constraint


AnyConstraint = JsonSchemaConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint
# The Lark modules a grammar may %import: lark's own `common` terminals. Anything else would read
# a file on the server (and a 400 for a missing one would tell a client what exists there).
LARK_IMPORTABLE = frozenset({"common"})
_LARK_IMPORT = re.compile(r"%import\s+(\S+)")


def build_constraint(data: Any) -> AnyConstraint:
    """A constraint from a mapping, shapes and types checked only (cheap: nothing is parsed or
    compiled); any problem becomes a `ConstraintError` naming it. `check_constraint` comes next."""
    try:
        return _ConstraintHolder.model_validate({"constraint": data}).constraint
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"][1:]) or "constraint"
        message = item["msg"].removeprefix("Value error, ")
        raise ConstraintError(f"{where}: {message}", param=where) from None


def parse_constraint(data: Any, limits: Any = None) -> AnyConstraint:
    """`build_constraint`, then `check_constraint` against `limits` (the defaults when None)."""
    constraint = build_constraint(data)
    if limits is None:
        from serve_app.config import LimitsConfig

        limits = LimitsConfig()
    check_constraint(constraint, limits)
    return constraint


# The field that holds each kind's source text, for errors that name where the problem is.
SOURCE_FIELD = {"json_schema": "schema", "regex": "pattern", "choice": "choices", "grammar": "grammar"}


def check_constraint(constraint: AnyConstraint, limits: Any, source: str | None = None) -> None:
    """Everything a constraint must pass before a backend sees it, cheapest first: the limits
    (sizes, depths, counts: bounded work, no parsing), then the checks that parse it. `source`
    is the request field the constraint came from (``guided_regex``), named in the error."""
    check_limits(constraint, limits)
    try:
        constraint.check_semantics()
    except ConstraintError as error:
        where = source or SOURCE_FIELD[constraint.type]
        raise ConstraintError(f"{where}: {error.message}", param=where, code=error.code) from None
    except RecursionError:  # a last line of defence: the depth limits should have caught it
        raise LimitExceededError(f"{constraint.type} nests too deeply to parse", param=constraint.type,
                                 code="max_group_depth") from None


def check_limits(constraint: Any, limits: Any) -> None:
    """Raise `LimitExceededError` naming the limit a constraint goes over. Iterative and linear
    in the constraint's size: safe to run on anything a client sends."""
    size = constraint.source_bytes()
    checks = {
        "json_schema": ("max_schema_bytes", size),
        "regex": ("max_regex_length", len(getattr(constraint, "pattern", ""))),
        "grammar": ("max_grammar_bytes", size),
        "choice": ("max_choices", len(getattr(constraint, "choices", []))),
    }
    name, value = checks[constraint.type]
    _check_limit(constraint, limits, name, value)
    if isinstance(constraint, ChoiceConstraint):
        _check_limit(constraint, limits, "max_choice_bytes", sum(len(c.encode(errors="replace"))
                                                                 for c in constraint.choices))
    elif isinstance(constraint, RegexConstraint):
        _check_limit(constraint, limits, "max_group_depth", group_depth(constraint.pattern))
    elif isinstance(constraint, GrammarConstraint):
        _check_limit(constraint, limits, "max_group_depth", group_depth(constraint.grammar, grammar=True))
    elif isinstance(constraint, JsonSchemaConstraint):
        _check_schema_limits(constraint, limits)


def _check_schema_limits(constraint: JsonSchemaConstraint, limits: Any) -> None:
    from serve_app.engine.schema_support import check_refs, schema_patterns, schema_size

    depth, nodes = schema_size(constraint.json_schema, limits.max_ref_expansion)
    _check_limit(constraint, limits, "max_schema_depth", depth)
    _check_limit(constraint, limits, "max_ref_expansion", nodes)
    deepest = max((group_depth(p) for p in schema_patterns(constraint.json_schema)), default=0)
    _check_limit(constraint, limits, "max_group_depth", deepest)
    check_refs(constraint.json_schema)


def check_lark_imports(grammar: str) -> None:
    for target in _LARK_IMPORT.findall(grammar):
        module = target.split(".", 1)[0].split("(", 1)[0]
        if module not in LARK_IMPORTABLE:
            raise ConstraintError(f"%import {target[:80]!r} is not allowed; a grammar may import "
                                  f"from: {', '.join(sorted(LARK_IMPORTABLE))}", param="grammar",
                                  code="unsupported_import")


def group_depth(text: str, grammar: bool = False) -> int:
    """The deepest nesting of brackets in a regex (groups; escapes and character classes skipped)
    or in a Lark grammar (quoted literals skipped). Linear, no recursion: it bounds the work
    before `re`, Lark or a backend parses the text recursively."""
    opens, closes = ("([{", ")]}") if grammar else ("(", ")")
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if grammar and ch in "\"'":
            i = _skip_quoted(text, i)
        elif not grammar and ch == "[":
            i = _skip_class(text, i)
        elif ch in opens:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in closes:
            depth = max(0, depth - 1)
        i += 1
    return deepest


def _skip_quoted(text: str, start: int) -> int:
    """Index of the quote that closes the literal opened at `start` (or the end)."""
    quote, i = text[start], start + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i


def _skip_class(text: str, start: int) -> int:
    """Index of the `]` that closes the character class opened at `start` (or the end)."""
    i = start + 1
    if i < len(text) and text[i] == "^":
        i += 1
    if i < len(text) and text[i] == "]":  # a leading ] is a literal
        i += 1
    while i < len(text) and text[i] != "]":
        i += 2 if text[i] == "\\" else 1
    return i


def _check_limit(constraint: Any, limits: Any, name: str, value: int) -> None:
    limit = getattr(limits, name)
    if value > limit:
        shown = f"more than {limit}" if name == "max_ref_expansion" else str(value)
        raise LimitExceededError(
            f"constraint is too large: {shown} > limits.{name} ({limit})", param=constraint.type, code=name)
