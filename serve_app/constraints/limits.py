"""A model's limits, and the checks that bound a constraint's work before anything parses it.

`check_constraint` is the one gate every constraint passes (router, registry in the config,
engine): sizes, nesting depths and counts first (iterative, linear in the input), then the
kind's own semantic check (meta-validation, `re.compile`, a Lark parse), which recurses and so
may only run on input the limits have bounded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.constraints.keywords import check_refs, schema_patterns, schema_size
from serve_app.constraints.kinds import (
    SOURCE_FIELD,
    AnyConstraint,
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    build_constraint,
)
from serve_app.constraints.refs import rebased
from serve_app.errors import ConstraintError, LimitExceededError


class LimitsConfig(BaseModel):
    """A model's limits: what one request may ask for, checked before any work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(512, ge=1, description="upper bound a request may ask for")
    max_prompt_tokens: int = Field(4096, ge=1, description="tokens of the prompt (the chat template applied)")
    max_batch_size: int = Field(16, ge=1, description="rows generated together (also capped by memory)")
    # Real-world schemas (Kubernetes CRDs, SchemaStore files) reach 72-157 KB; the router checks
    # sizes before anything parses a schema, off its event loop.
    max_schema_bytes: int = Field(512 * 1024, ge=16, description="a JSON Schema's size, as compact JSON")
    max_schema_depth: int = Field(32, ge=1, description="nesting of subschemas")
    max_ref_expansion: int = Field(
        10_000, ge=1, description="subschemas after inlining local $refs (a recursive $ref, one whose definitions "
        "reach it again, counted once: it stays a reference)")
    max_regex_length: int = Field(4096, ge=1, description="characters of a regex")
    max_grammar_bytes: int = Field(64 * 1024, ge=16, description="a Lark grammar's size")
    max_group_depth: int = Field(
        64, ge=1, description="nesting of groups in a regex or schema pattern, of brackets in a grammar "
        "(their parsers recurse; deeper input would exhaust the stack)")
    max_choices: int = Field(1024, ge=1, description="entries of a choice list")
    max_choice_bytes: int = Field(64 * 1024, ge=1, description="all choices together, in UTF-8 bytes")
    compile_timeout_s: float = Field(30.0, gt=0, description="per backend; a compile past it goes on in the "
                                     "background and a retry uses its result")
    max_pending_requests: int = Field(
        256, ge=1, description="requests accepted and not finished per model; more get 429 + Retry-After")



def parse_constraint(data: Any, limits: LimitsConfig | None = None) -> AnyConstraint:
    """`build_constraint`, then `check_constraint` against `limits` (the defaults when None)."""
    constraint = build_constraint(data)
    check_constraint(constraint, LimitsConfig() if limits is None else limits)
    return constraint


def check_constraint(constraint: AnyConstraint, limits: LimitsConfig, source: str | None = None) -> None:
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


def check_limits(constraint: AnyConstraint, limits: LimitsConfig) -> None:
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


def _check_schema_limits(constraint: JsonSchemaConstraint, limits: LimitsConfig) -> None:
    schema = rebased(constraint.json_schema)  # what planning sees: references as root pointers
    depth, nodes = schema_size(schema, limits.max_ref_expansion)
    _check_limit(constraint, limits, "max_schema_depth", depth)
    _check_limit(constraint, limits, "max_ref_expansion", nodes)
    deepest = max((group_depth(p) for p in schema_patterns(schema)), default=0)
    _check_limit(constraint, limits, "max_group_depth", deepest)
    check_refs(schema)


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


def check_max_new_tokens(requested: int, limits: LimitsConfig, model: str) -> None:
    """The one check of a request's max_tokens against the model's limit (router and engine)."""
    if requested > limits.max_new_tokens:
        raise LimitExceededError(f"max_tokens {requested} exceeds the limit of {limits.max_new_tokens} for model "
                                 f"{model}", param="max_tokens", code="max_new_tokens")


def _check_limit(constraint: AnyConstraint, limits: LimitsConfig, name: str, value: int) -> None:
    limit = getattr(limits, name)
    if value > limit:
        shown = f"more than {limit}" if name == "max_ref_expansion" else str(value)
        raise LimitExceededError(
            f"constraint is too large: {shown} > limits.{name} ({limit})", param=constraint.type, code=name)
