"""Checking an output against a constraint, with every regex under a time limit.

jsonschema runs `pattern` and the key patterns of `patternProperties` and
`additionalProperties` through plain `re`, which holds the GIL while it backtracks: a key
pattern such as ``^(a+)+$`` froze a replica. Here each runs through the `regex` module with a
timeout and without the GIL, and a match not decided in time never makes output valid.
"""

from __future__ import annotations

import calendar
import re
import threading
import time
from typing import Any

import jsonschema

from serve_app.constraints.keywords import FORMATS

# Long enough for any sane pattern on an output; short enough that a hostile one costs little.
REGEX_CHECK_TIMEOUT_S = 0.5
# RFC 3339 (date, time with its offset, date-time: as JSON Schema since draft-07 defines them), ISO
# 8601 durations (RFC 3339 appendix A), RFC 1123 host names (punycode labels decoded), RFC 3986 URIs.
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))")
_DURATION = re.compile(r"P(?:(?:\d+Y(?:\d+M(?:\d+D)?)?|\d+M(?:\d+D)?|\d+D)(?:T(?:\d+H(?:\d+M(?:\d+S)?)?|\d+M"
                       r"(?:\d+S)?|\d+S))?|T(?:\d+H(?:\d+M(?:\d+S)?)?|\d+M(?:\d+S)?|\d+S)|\d+W)")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


def is_date(text: str) -> bool:
    found = _DATE.fullmatch(text)
    if found is None:
        return False
    year, month, day = (int(g) for g in found.groups())
    return 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]


def is_time(text: str) -> bool:
    """RFC 3339 full-time: the offset is required; a leap second only at 23:59:60 UTC."""
    found = _TIME.fullmatch(text)
    if found is None:
        return False
    hour, minute, second = int(found[1]), int(found[2]), int(found[3])
    sign, off_h, off_m = found[5], int(found[6] or 0), int(found[7] or 0)
    if hour > 23 or minute > 59 or second > 60 or off_h > 23 or off_m > 59:
        return False
    if second == 60:
        shift = (off_h * 60 + off_m) * (1 if sign == "+" else -1 if sign == "-" else 0)
        return (hour * 60 + minute - shift) % (24 * 60) == 23 * 60 + 59
    return True


def is_date_time(text: str) -> bool:
    date, sep, time_ = text[:10], text[10:11], text[11:]
    return sep in ("T", "t") and is_date(date) and is_time(time_)


def is_hostname(text: str) -> bool:
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return 0 < len(text) <= 253 and all(_LABEL.fullmatch(label) and _punycode_ok(label) for label in labels)


def _punycode_ok(label: str) -> bool:
    if not label.lower().startswith("xn--"):
        return label[2:4] != "--"  # "--" there is reserved for encodings (RFC 5891)
    try:
        return bool(label[4:].encode("ascii").decode("punycode"))
    except (UnicodeError, ValueError):
        return False


_OURS = {"date": is_date, "time": is_time, "date-time": is_date_time, "hostname": is_hostname,
         "duration": lambda t: _DURATION.fullmatch(t) is not None, "uri": lambda t: _URI.fullmatch(t) is not None}


def _format_checker() -> jsonschema.FormatChecker:
    """Every format a backend's grammar enforces (keywords.FORMATS) checked after generation too,
    by one definition: ours above, jsonschema's for email, ipv4, ipv6 and uuid. Any other `format`
    is an annotation (as JSON Schema specifies by default), so the check must not enforce it either."""
    checker = jsonschema.FormatChecker(formats=[n for n in FORMATS if n not in _OURS])
    for name, check in _OURS.items():
        checker.checks(name)(lambda value, check=check: not isinstance(value, str) or check(value))
    missing = set(FORMATS) - set(checker.checkers)
    assert not missing, f"formats the grammar enforces without a check after generation: {missing}"
    return checker


ENFORCED_FORMATS = _format_checker()


def _is_regex(value: object) -> bool:
    """A pattern as the `regex` module reads it (what the checks run; `\\p{L}` classes included)."""
    import regex

    return not isinstance(value, str) or regex.compile(value) is not None


# Meta-validation of a schema: jsonschema's own formats, but patterns read by the `regex` module.
META_FORMATS = jsonschema.FormatChecker()
META_FORMATS.checks("regex", raises=Exception)(_is_regex)

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
