"""What output is allowed: one discriminated union of typed constraints.

Each constraint validates itself at construction (so a bad one never reaches a replica), has a
canonical ``cache_key()``, knows how to check an output (``is_satisfied_by``), and converts to
the Outlines output type. No torch or Outlines import at module level: the router uses this.
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
        payload = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"))
        return f"{self.type}:{hashlib.sha256(payload.encode()).hexdigest()[:32]}"  # type: ignore[attr-defined]

    def _canonical(self) -> Any:
        raise NotImplementedError

    def source_bytes(self) -> int:
        return len(json.dumps(self._canonical()).encode())


class JsonSchemaConstraint(_Base):
    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool = Field(True, description="false: when no backend enforces the schema exactly, accept an "
                                           "approximation; the output is still checked after generation")

    @field_validator("json_schema")
    @classmethod
    def _meta_valid(cls, schema: dict[str, Any]) -> dict[str, Any]:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(schema)
        except jsonschema.SchemaError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            raise ValueError(f"invalid JSON Schema at #/{path}: {error.message}") from None
        return schema

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
        return bool(self._validator.is_valid(value))

    def to_outlines(self) -> Any:
        from outlines.types import JsonSchema

        return JsonSchema(json.dumps(self.json_schema))


def regex_search(pattern: str, text: str, timeout_s: float) -> bool | None:
    """`re.search` semantics (as JSON Schema's `pattern`) with a time limit: None when a
    backtracking pattern such as ``^(a+)+$`` takes too long on this text."""
    import regex

    try:
        return regex.search(pattern, text, timeout=timeout_s) is not None
    except TimeoutError:
        return None
    except regex.error:
        return False


def safe_validator(schema: dict[str, Any], timeout_s: float, format_checker: Any = None) -> Any:
    """A jsonschema validator whose `pattern` runs with a time limit (a pattern it cannot decide
    in time counts as not matching: output is never called valid without proof)."""
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)

    def pattern(validator: Any, expected: str, instance: Any, _schema: Any) -> Any:
        if validator.is_type(instance, "string") and not regex_search(expected, instance, timeout_s):
            yield jsonschema.ValidationError(f"{instance!r} does not match {expected!r} (or not decided in time)")

    return jsonschema.validators.extend(base, {"pattern": pattern})(schema, format_checker=format_checker)


class RegexConstraint(_Base):
    type: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        if _UNSUPPORTED_REGEX.search(pattern):
            raise ValueError("lookaround and backreferences cannot be enforced token by token")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"invalid regex: {error}") from None
        return pattern

    def _canonical(self) -> Any:
        return self.pattern

    def is_satisfied_by(self, text: str) -> bool | None:
        """None when the check itself ran out of time: a backtracking checker can take
        exponential time on patterns like ``(a+)+$`` that token automata handle fine."""
        import regex

        try:
            return regex.fullmatch(self.pattern, text, timeout=REGEX_CHECK_TIMEOUT_S) is not None
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

    @field_validator("grammar")
    @classmethod
    def _parses(cls, grammar: str) -> str:
        import lark

        try:
            lark.Lark(grammar, start="start", parser="earley")
        except lark.exceptions.LarkError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"invalid Lark grammar: {first_line}") from None
        return grammar

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


def parse_constraint(data: Any) -> JsonSchemaConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint:
    """Build a constraint from a mapping; any problem becomes a `ConstraintError` naming it."""
    try:
        return _ConstraintHolder.model_validate({"constraint": data}).constraint
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"][1:]) or "constraint"
        message = item["msg"].removeprefix("Value error, ")
        raise ConstraintError(f"{where}: {message}", param=where) from None


def check_limits(constraint: Any, limits: Any) -> None:
    """Raise `LimitExceededError` naming the limit a constraint goes over."""
    size = constraint.source_bytes()
    checks = {
        "json_schema": ("max_schema_bytes", size),
        "regex": ("max_regex_length", len(getattr(constraint, "pattern", ""))),
        "grammar": ("max_grammar_bytes", size),
        "choice": ("max_choices", len(getattr(constraint, "choices", []))),
    }
    name, value = checks[constraint.type]
    _check_limit(constraint, limits, name, value)
    if isinstance(constraint, JsonSchemaConstraint):
        from serve_app.engine.schema_support import schema_size

        depth, nodes = schema_size(constraint.json_schema, limits.max_ref_expansion)
        _check_limit(constraint, limits, "max_schema_depth", depth)
        _check_limit(constraint, limits, "max_ref_expansion", nodes)


def _check_limit(constraint: Any, limits: Any, name: str, value: int) -> None:
    limit = getattr(limits, name)
    if value > limit:
        shown = f"more than {limit}" if name == "max_ref_expansion" else str(value)
        raise LimitExceededError(
            f"constraint is too large: {shown} > limits.{name} ({limit})", param=constraint.type, code=name)

