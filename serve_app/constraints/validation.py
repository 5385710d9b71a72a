"""Checking an output against a constraint, with every regex under a time limit.

jsonschema runs `pattern` and the key patterns of `patternProperties` and
`additionalProperties` through plain `re`, which holds the GIL while it backtracks: a key
pattern such as ``^(a+)+$`` froze a replica. Here each runs through the `regex` module with a
timeout and without the GIL, and a match not decided in time never makes output valid.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jsonschema

from serve_app.constraints.keywords import FORMATS

# Long enough for any sane pattern on an output; short enough that a hostile one costs little.
REGEX_CHECK_TIMEOUT_S = 0.5
# Outputs are checked for the formats a backend enforces; any other `format` is an annotation
# (as JSON Schema specifies by default), so the check must not enforce it either.
# (jsonschema checks a format only when its optional checker library is installed.)
ENFORCED_FORMATS = jsonschema.FormatChecker(formats=[
    name for name in FORMATS if name in jsonschema.FormatChecker.checkers])

# Every regex run while a row generates (closing, the checks) gets this limit: it runs in the decode
# loop on every token; the output check after generation has its own, longer one. Undecided = refused.
PATTERN_TIMEOUT_S = 0.01


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


class Undecided(Exception):
    """A key pattern ran out of time: nothing can be concluded about the instance."""


class _Matcher:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def __call__(self, pattern: str, text: str) -> bool:
        """Whether `text` matches; not decided in time raises `Undecided` (the output is invalid)."""
        found = regex_search(pattern, text, self.timeout_s)
        if found is None:
            raise Undecided(f"{text[:40]!r} against {pattern[:40]!r} not decided in time")
        return found


def _pattern(matches: _Matcher) -> Any:
    def pattern(validator: Any, expected: str, instance: Any, _schema: Any) -> Any:
        if validator.is_type(instance, "string") and not matches(expected, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {expected!r}")
    return pattern


def _pattern_properties(matches: _Matcher) -> Any:
    def pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, _schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        for regex, subschema in patterns.items():
            for key, value in instance.items():
                if matches(regex, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=regex)
    return pattern_properties


def _additional_properties(matches: _Matcher) -> Any:
    def additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        declared, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in declared and not any(matches(p, k) for p in patterns)]
        if validator.is_type(additional, "object"):
            for key in extras:
                yield from validator.descend(instance[key], additional, path=key)
        elif additional is False and extras:
            yield jsonschema.ValidationError(f"additional properties are not allowed ({sorted(extras)!r})")
    return additional_properties


def safe_validator(schema: dict[str, Any], timeout_s: float, format_checker: Any = None) -> BoundedValidator:
    """A jsonschema validator (the schema's own draft) whose every regex has a time limit, and
    whose every `is_valid` has one too (`BoundedValidator`)."""
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    matches = _Matcher(timeout_s)
    overrides = {"pattern": _pattern(matches), "patternProperties": _pattern_properties(matches),
                 "additionalProperties": _additional_properties(matches)}
    overrides |= {name: _on_the_clock(base.VALIDATORS[name]) for name in _BRANCHING if name in base.VALIDATORS}
    validator = jsonschema.validators.extend(base, overrides)(schema, format_checker=format_checker)
    return BoundedValidator(validator, min(MAX_VALIDATION_S, timeout_s * VALIDATION_S_PER_PATTERN_S))


# Keywords through which a self-referencing schema's work grows (a `$ref` loop under `anyOf` doubles
# per level of the instance): each call looks at the clock.
_BRANCHING = ("$ref", "$dynamicRef", "$recursiveRef", "anyOf", "oneOf", "allOf", "not", "if", "items",
              "prefixItems", "properties", "additionalItems", "contains", "dependentSchemas")
# A whole `is_valid` may take this many times its pattern timeout, and never more than MAX_VALIDATION_S:
# 2 s for the output check, 0.2 s for a check in the decode loop.
VALIDATION_S_PER_PATTERN_S = 20
MAX_VALIDATION_S = 2.0
_clock = threading.local()


def _on_the_clock(keyword: Any) -> Any:
    def timed(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        deadline = getattr(_clock, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise Undecided("validation ran out of time (a self-referencing schema branching per level?)")
        return keyword(validator, value, instance, schema)
    return timed


class BoundedValidator:
    """`is_valid` within `budget_s` (else `Undecided`, which callers read as not valid): the
    work of a `$ref` loop under `anyOf` can double with each level of the instance."""

    def __init__(self, inner: Any, budget_s: float) -> None:
        self.inner, self.budget_s = inner, budget_s

    def is_valid(self, instance: Any) -> bool:
        outer = getattr(_clock, "deadline", None)
        mine = time.monotonic() + self.budget_s
        _clock.deadline = mine if outer is None else min(outer, mine)
        try:
            return bool(self.inner.is_valid(instance))
        except RecursionError:
            raise Undecided("the instance or the schema nests too deeply to check") from None
        finally:
            _clock.deadline = outer

    def evolve(self, **changes: Any) -> BoundedValidator:
        return BoundedValidator(self.inner.evolve(**changes), self.budget_s)
