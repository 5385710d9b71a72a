"""What output is allowed: one discriminated union of typed constraints.

Construction checks only shapes and types (cheap, bounded). What parses or compiles the
constraint (JSON Schema meta-validation, `re.compile`, a Lark parse) is `check_semantics`, and
`check_constraint` runs it only after `check_limits` has bounded the work: sizes, nesting depths,
counts. Each constraint has a canonical ``cache_key()``, knows how to check an output
(``is_satisfied_by``). No torch or Outlines import: the router uses this.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.constraints.registry import BackendName
from serve_app.constraints.validation import (
    ENFORCED_FORMATS,
    META_FORMATS,
    REGEX_CHECK_TIMEOUT_S,
    BoundedValidator,
    safe_validator,
)
from serve_app.errors import ConstraintError, LimitExceededError

# Regex features no token-level automaton can enforce: lookaround and backreferences.
_UNSUPPORTED_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\\k<|\(\?P=")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    backend: BackendName | None = Field(
        None, description="compile with this backend instead of the model's default for the kind"
    )

    def cache_key(self) -> str:
        """What the constraint means and how it asks to be enforced (its backend): equal keys, equal plans."""
        payload = self._dumps(sort_keys=True, separators=(",", ":"))
        via = f"@{self.backend}" if self.backend is not None else ""
        return f"{self.type}{via}:{hashlib.sha256(payload.encode()).hexdigest()[:32]}"  # type: ignore[attr-defined]

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

    undeclared_properties: bool | None = Field(
        None, description="true: objects whose schema leaves additionalProperties out may also get undeclared "
        "properties; false: only declared ones; unset: the model's backends.undeclared_properties (false)")

    def check_semantics(self) -> None:
        validator = jsonschema.validators.validator_for(self.json_schema, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(self.json_schema, format_checker=META_FORMATS)  # type: ignore[call-arg]
        except jsonschema.SchemaError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            raise ConstraintError(f"invalid JSON Schema at #/{path}: {error.message}",
                                  param="json_schema", code="invalid_schema") from None

    def _canonical(self) -> Any:
        canonical = self.json_schema if self.strict else [self.json_schema, "approximate"]
        return canonical if self.undeclared_properties is None else [canonical, self.undeclared_properties]

    @cached_property
    def _validator(self) -> BoundedValidator:
        return safe_validator(self.json_schema, REGEX_CHECK_TIMEOUT_S, ENFORCED_FORMATS)

    def is_satisfied_by(self, text: str) -> bool:
        try:  # (a repeated key reads differently in different parsers: not valid)
            value = json.loads(text, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # nested past the parser's stack: not checkable, not valid
            return False
        try:
            return self._validator.is_valid(value)
        except Exception:  # noqa: BLE001 - a check that cannot finish (checking.Undecided too) never proves validity
            return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a repeated key")
    return found


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


# The field that holds each kind's source text, for errors that name where the problem is.
SOURCE_FIELD = {"json_schema": "schema", "regex": "pattern", "choice": "choices", "grammar": "grammar"}


def check_lark_imports(grammar: str) -> None:
    for target in _LARK_IMPORT.findall(grammar):
        module = target.split(".", 1)[0].split("(", 1)[0]
        if module not in LARK_IMPORTABLE:
            raise ConstraintError(f"%import {target[:80]!r} is not allowed; a grammar may import "
                                  f"from: {', '.join(sorted(LARK_IMPORTABLE))}", param="grammar",
                                  code="unsupported_import")
