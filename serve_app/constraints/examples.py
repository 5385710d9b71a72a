"""Short example values the closer builds completions from: numbers within a schema's bounds, a
string a regex matches, the types a schema leaves open. Each candidate is validated before use."""

from __future__ import annotations

import math
import re
from typing import Any

from serve_app.constraints.validation import PATTERN_TIMEOUT_S, regex_search


def regex_example(pattern: str) -> str | None:
    """A short string that `pattern` matches (re.search, as JSON Schema applies it), built from
    the parsed pattern: fewest repetitions, first alternative, first character of each class."""
    import re._parser as parser

    def build(items: Any) -> str:
        out = ""
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                out += chr(arg)
            elif name == "ANY":
                out += "a"
            elif name == "IN":
                out += _class_char(arg)
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, _, body = arg
                out += build(body) * low
            elif name == "SUBPATTERN":
                out += build(arg[-1])
            elif name == "BRANCH":
                out += min((build(b) for b in arg[1]), key=len)
            elif name == "NOT_LITERAL":
                out += "a" if arg != ord("a") else "b"
            elif name != "AT":
                raise ValueError(name)
        return out

    try:
        example = build(parser.parse(pattern))
    except (ValueError, TypeError, re.error, RecursionError, OverflowError):
        return None
    return example if regex_search(pattern, example, PATTERN_TIMEOUT_S) else None


def _class_char(items: Any) -> str:
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            return chr(arg)
        if name == "RANGE":
            return chr(arg[0])
        if name == "CATEGORY":
            return {"CATEGORY_DIGIT": "0", "CATEGORY_SPACE": " ", "CATEGORY_WORD": "a"}.get(str(arg), "a")
        if name == "NEGATE":
            return "a"  # checked against the pattern afterwards
    return "a"


_ALL_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


_IMPLIED = {"properties": "object", "required": "object", "additionalProperties": "object", "items": "array",
            "prefixItems": "array", "minItems": "array", "minLength": "string", "pattern": "string",
            "format": "string", "minimum": "number", "maximum": "number"}


def candidate_types(s: dict[str, Any]) -> tuple[str, ...]:
    declared = s.get("type")
    if isinstance(declared, str):
        return (declared,)
    if isinstance(declared, list):
        return tuple(declared)
    implied = {t for k, t in _IMPLIED.items() if k in s}
    return tuple(sorted(implied)) if implied else _ALL_TYPES


def bounded_numbers(s: dict[str, Any], integer: bool) -> list[str]:
    low = -math.inf
    if isinstance(s.get("minimum"), int | float):
        low = s["minimum"]
    if isinstance(s.get("exclusiveMinimum"), int | float) and not isinstance(s["exclusiveMinimum"], bool):
        low = max(low, s["exclusiveMinimum"] + (1 if integer else 0.5))
    high = math.inf
    if isinstance(s.get("maximum"), int | float):
        high = s["maximum"]
    if isinstance(s.get("exclusiveMaximum"), int | float) and not isinstance(s["exclusiveMaximum"], bool):
        high = min(high, s["exclusiveMaximum"] - (1 if integer else 0.5))
    start = 0 if low <= 0 <= high else (low if low != -math.inf else high)
    step = s.get("multipleOf")
    values = [start, math.ceil(start), math.floor(start), 1, -1]
    if isinstance(step, int | float) and step > 0 and not isinstance(step, bool):
        values = [math.ceil(start / step) * step, math.floor(start / step) * step] + values
    out = []
    for value in values:
        if value in (math.inf, -math.inf):
            continue
        as_int = int(value) if float(value).is_integer() else None
        out.append(str(as_int) if as_int is not None else repr(float(value)))
    return out


def complete_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", text))
