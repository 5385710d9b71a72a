"""Reading a request body as JSON with the work bounded before anything else looks at it.

`json.loads` alone accepts what is not JSON (``NaN``, ``Infinity``), turns ``1e999`` into an
infinite float, and hands on strings holding lone UTF-16 surrogates (``"\\ud800"``), which no
tokenizer or UTF-8 encoder takes. Deep nesting makes every recursive consumer after it (pydantic,
jsonschema, `re`, Lark) overflow the stack. `load_json` refuses all of these with a 400 naming
where, so what comes out is finite, valid Unicode and at most `max_depth` deep.
"""

from __future__ import annotations

import json
import math
from typing import Any

from serve_app.errors import InvalidRequestError, LimitExceededError

MAX_SHOWN_PATH = 120


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range (a double holds up to about 1.8e308)")
    return value


def load_json(raw: bytes | str, max_depth: int, param: str = "body") -> Any:
    """Parse JSON text, then check nesting and strings; `param` names the field in errors."""
    try:
        value = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise LimitExceededError(f"{param}: JSON nested too deeply (limit {max_depth})", param=param,
                                 code="max_json_depth") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, NaN, 1e999, int over 4300 digits
        code = "invalid_json" if param == "body" else "invalid_value"
        raise InvalidRequestError(f"malformed JSON {'body' if param == 'body' else 'in ' + param}: "
                                  f"{str(error)[:200]}", param=None if param == "body" else param,
                                  code=code) from None
    check_tree(value, max_depth, param)
    return value


def check_tree(value: Any, max_depth: int, param: str = "body") -> None:
    """Iteratively: nesting at most `max_depth`, no lone surrogate in any key or string."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            _check_text(node, path, param)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > max_depth:
            shown = where(path, param)
            raise LimitExceededError(f"{shown}: nested deeper than {max_depth} levels of arrays and objects "
                                     f"(server.max_json_depth)", param=shown, code="max_json_depth")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(key, str):
                _check_text(key, path, param)
            stack.append((child, depth + 1, (*path, str(key))))


def _check_text(text: str, path: tuple[str, ...], param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.start + 1].encode("utf-8", "backslashreplace").decode()
        raise InvalidRequestError(f"{where(path, param)}: contains a lone UTF-16 surrogate ({bad}); send valid "
                                  f"Unicode", param=where(path, param), code="invalid_unicode") from None


def where(path: tuple[str, ...], param: str) -> str:
    """``messages.0.content``: the path as error messages name fields (surrogates escaped)."""
    parts = [] if param == "body" else [param]
    text = ".".join([*parts, *path]) or "body"
    if len(text) > MAX_SHOWN_PATH:  # a path as deep as the nesting it reports: show its two ends
        text = f"{text[:MAX_SHOWN_PATH // 2]}...{text[-MAX_SHOWN_PATH // 2:]}"
    return text.encode("utf-8", "backslashreplace").decode()
