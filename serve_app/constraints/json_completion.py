"""The shortest JSON completion of any prefix, for one JSON Schema: what closing forces before
the token budget runs out, and the minimum budget a request needs.

A `JsonCloser` follows generated text with an incremental JSON parser whose frames carry the
subschema at each level. From any prefix it builds the shortest completion it can construct:
finish the open literal (string, number, true/false/null), add the required properties still
missing, in declared order, with minimal values, add the items ``minItems`` still asks for, and
close every open bracket. Minimal values come from the schema (const/enum, bounds, minLength,
known formats) and each is checked with jsonschema before use.

The distance to completion is the number of tokens of that text. It is the exact cost of the
path the closer will force, so it is an upper bound on the true shortest distance in the
compiled automaton; it does not depend on the backend. Before the closer forces a completion,
the row's matcher validates its tokens and jsonschema validates the whole output, so a forced
completion is never invalid: when either check fails, the row goes on freely and ends honestly.

No torch import: the closer is pure Python over text and a tokenizer's ``encode``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from serve_app.cache import BoundedCache
from serve_app.constraints.examples import (
    bounded_numbers,
    candidate_types,
    complete_number,
    regex_example,
)
from serve_app.constraints.json_scan import LITERALS, Frame, JsonScanner, NotJson, Scalar, ScanState
from serve_app.constraints.keywords import FORMATS, resolve_pointer
from serve_app.constraints.validation import PATTERN_TIMEOUT_S, regex_search, safe_validator

logger = logging.getLogger(__name__)

# Subschema nesting the closer builds minimal values through; deeper, it knows no completion and
# the row ends honestly (the router's max_schema_depth is 32 by default).
_MAX_DEPTH = 24
# Minimal values remembered per schema: bounded memory per compiled constraint.
_MEMO_LIMIT = 4096
# $ref-to-$ref hops followed when resolving one subschema (the router's max_schema_depth is 32).
_MAX_REF_HOPS = 32

# A closer's state is the scanner's (json_scan.py); each open value's data is the tuple of
# subschema branches it may follow.
Stack = ScanState
_JSON_TYPES = {"obj": "object", "arr": "array", "str": "string", "num": "number"}


def _json_type(first: str) -> str:
    return {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(
        first, "number")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class JsonCloser(JsonScanner):
    """Shortest completions for one JSON Schema, shared by every row that uses it."""

    def __init__(self, schema: dict[str, Any], encode: Callable[[str], list[int]],
                 format_checker: Any = None, separators: tuple[str, str] = (",", ":"),
                 whole: dict[str, Any] | None = None) -> None:
        """`whole`: the schema a completed output must pass when `schema` is looser (the grammar
        without the keywords checked while generating)."""
        self.root = schema
        self.item_sep, self.key_sep = separators  # what the backend's grammar emits (xgrammar: ", ", ": ")
        self.encode = encode
        # Patterns come from users and run on generated text at every step: time-limited.
        self._validator = safe_validator(schema, PATTERN_TIMEOUT_S, format_checker)
        self.whole_validator = self._validator if whole is None else \
            safe_validator(whole, PATTERN_TIMEOUT_S, format_checker)
        # Keyed by id(): each entry holds its subschema, which keeps the id from being reused.
        self._minimal: BoundedCache[int, tuple[Any, str | None]] = BoundedCache(_MEMO_LIMIT)
        self.start: Stack = ScanState()
        self.min_text = self.completion(self.start)
        self.min_ids = encode(self.min_text) if self.min_text is not None else None
        self.min_tokens = len(self.min_ids) if self.min_ids is not None else None

    # -- schema helpers --------------------------------------------------------------------------

    def resolve(self, schema: Any) -> Any:
        """Follow a chain of $refs (a $ref to a $ref ...), at most _MAX_REF_HOPS of them: a cycle of
        bare $refs has no instance, and the closer then knows no completion."""
        for _ in range(_MAX_REF_HOPS):
            if not isinstance(schema, dict) or not isinstance(schema.get("$ref"), str):
                break
            target = resolve_pointer(self.root, schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            if target is True:
                target = {}
            schema = {**target, **siblings} if siblings and isinstance(target, dict) else target
        return {} if schema is True else schema

    def branches(self, schema: Any, json_type: str | None = None, depth: int = 0) -> list[dict[str, Any]]:
        """The alternatives a value may follow: anyOf/oneOf expanded, allOf merged shallowly,
        and (given the value's JSON type) only those that allow it."""
        schema = self.resolve(schema)
        if not isinstance(schema, dict) or depth > 8:
            return []
        for key in ("allOf",):
            if isinstance(schema.get(key), list):
                merged = {k: v for k, v in schema.items() if k != key}
                for part in schema[key]:
                    merged = _merge(merged, self.resolve(part))
                schema = merged
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                base = {k: v for k, v in schema.items() if k != key}
                out: list[dict[str, Any]] = []
                for option in schema[key]:
                    out += self.branches(_merge(base, self.resolve(option)), json_type, depth + 1)
                return out
        if json_type is not None and not _allows_type(schema, json_type):
            return []
        return [schema]

    def dumps(self, value: Any) -> str:
        return json.dumps(value, separators=(self.item_sep, self.key_sep), ensure_ascii=False)

    def is_valid(self, schema: Any, value: Any) -> bool:
        try:
            return bool(self._validator.evolve(schema=schema).is_valid(value))
        except Exception:  # noqa: BLE001 - a key pattern not decided in time: not offered as valid
            return False

    def minimal(self, schema: Any, depth: int = 0) -> str | None:
        """The shortest JSON text we can build that `schema` accepts (None if we cannot)."""
        if schema is True or schema == {}:
            return "0"
        if schema is False or depth > _MAX_DEPTH:
            return None
        known = self._minimal.get(id(schema))
        if known is not None and known[0] is schema:
            return known[1]
        self._minimal.put(id(schema), (schema, None))  # recursion guard
        text = self._build_minimal(schema, depth)
        self._minimal.put(id(schema), (schema, text))
        return text

    def _build_minimal(self, schema: Any, depth: int) -> str | None:
        candidates: list[str] = []
        for branch in self.branches(schema):
            candidates += self._candidates(branch, depth)
        for text in sorted(set(candidates), key=lambda t: (len(self.encode(t)), len(t), t)):
            if self.is_valid(schema, json.loads(text)):
                return text
        return None

    def _candidates(self, s: dict[str, Any], depth: int) -> list[str]:
        if "const" in s:
            return [self.dumps(s["const"])]
        if "enum" in s and isinstance(s["enum"], list):
            return [self.dumps(v) for v in s["enum"]]
        out: list[str] = []
        types = candidate_types(s)
        if "null" in types:
            out.append("null")
        if "boolean" in types:
            out += ["true", "false"]
        if "integer" in types or "number" in types:
            out += bounded_numbers(s, integer="number" not in types)
        if "string" in types:
            out += self._strings(s)
        if "array" in types:
            text = self._array(s, depth)
            out += [text] if text is not None else []
        if "object" in types:
            text = self._object(s, depth)
            out += [text] if text is not None else []
        return out

    def _strings(self, s: dict[str, Any]) -> list[str]:
        """Whole strings: a known format's example, else what closes an empty open string."""
        if isinstance(s.get("format"), str) and s["format"] in FORMATS:
            return [_dumps(FORMATS[s["format"]])]
        return [_dumps(rest) for rest in self._string_rests(s, "")]

    def _array(self, s: dict[str, Any], depth: int) -> str | None:
        items = []
        for i in range(int(s.get("minItems", 0))):
            text = self.minimal(self.item_schema(s, i), depth + 1)
            if text is None:
                return None
            items.append(text)
        return "[" + self.item_sep.join(items) + "]"

    def _object(self, s: dict[str, Any], depth: int) -> str | None:
        parts = []
        for key in self._fewest_keys(s):
            text = self.minimal(self.property_schema(s, key), depth + 1)
            if text is None:
                return None
            parts.append(f"{_dumps(key)}{self.key_sep}{text}")
        return "{" + self.item_sep.join(parts) + "}"

    def _fewest_keys(self, s: dict[str, Any]) -> list[str]:
        """The required keys and, short of `minProperties`, declared then fresh ones: in declared order
        (as backends emit them), then the undeclared."""
        keys, least = self.required_order(s), s.get("minProperties", 0)
        optional = [k for k in s.get("properties", {}) if k not in keys]
        while isinstance(least, int) and len(keys) < least:
            key = optional.pop(0) if optional else self._fresh_key(s, tuple(keys))
            if key is None:
                break
            keys.append(key)
        declared = list(s.get("properties", {}))
        return sorted(keys, key=lambda k: declared.index(k) if k in declared else len(declared))

    def required_order(self, s: dict[str, Any]) -> list[str]:
        """Required keys in declared order (llguidance emits properties in that order)."""
        required = [k for k in s.get("required", []) if isinstance(k, str)]
        declared = [k for k in s.get("properties", {}) if k in required]
        return declared + [k for k in required if k not in declared]

    def declared_after(self, s: dict[str, Any], seen: tuple[str, ...]) -> list[str]:
        """Declared properties that may still come: backends emit them in declared order, and
        none after an additional (undeclared) one."""
        declared = list(s.get("properties", {}))
        if any(k not in declared for k in seen):
            return []
        last = max((declared.index(k) for k in seen), default=-1)
        return declared[last + 1:]

    def property_schema(self, s: dict[str, Any], key: str) -> Any:
        properties = s.get("properties", {})
        if key in properties:
            return properties[key]
        for pattern, sub in s.get("patternProperties", {}).items():
            if regex_search(pattern, key, PATTERN_TIMEOUT_S):
                return sub
        extra = s.get("additionalProperties", True)
        return {} if extra is True else extra

    def item_schema(self, s: dict[str, Any], index: int) -> Any:
        prefix = s.get("prefixItems")
        items = s.get("items", True)
        if isinstance(items, list):  # draft-07 tuple form
            prefix, items = items, s.get("additionalItems", True)
        if isinstance(prefix, list) and index < len(prefix):
            return prefix[index]
        return {} if items is True else items

    # -- following the text (the scanner's hooks) --------------------------------------------------

    def feed(self, stack: Stack | None, text: str) -> Stack | None:
        """The state after `text`; None when the text cannot continue as JSON."""
        if stack is None:
            return None
        try:
            return self.scan(stack, text)
        except NotJson:
            return None

    def begin(self, parent: Frame | None, kind: str, ch: str, at: int) -> tuple[dict[str, Any], ...]:
        schema = self.root if parent is None else self._child_schema(parent)
        json_type = _JSON_TYPES.get(kind) or _json_type(ch)
        return tuple(self.branches(schema, json_type)) or ({},)

    def _child_schema(self, parent: Frame) -> Any:
        if parent.kind == "obj":
            schemas = [self.property_schema(b, parent.key or "") for b in parent.data]
        else:
            schemas = [self.item_schema(b, parent.items - 1) for b in parent.data]
        return {"anyOf": schemas} if len(schemas) > 1 else schemas[0]

    def key_closed(self, frame: Frame, key: str, at: int) -> Frame:
        allowed = tuple(b for b in frame.data if self.property_schema(b, key) is not False)
        return frame._replace(data=allowed or frame.data)

    def value_closed(self, parent: Frame | None, value: Frame | Scalar, end: int, at: int) -> Frame | None:
        """A string member value drops the object's alternatives it rules out, so that in
        ``anyOf: [{kind: const a, ...}, {kind: const b, ...}]`` the completion follows the branch
        the output chose (tool calls: the function's name picks its arguments)."""
        if parent is None or parent.kind != "obj" or not isinstance(value, Scalar) or value.kind != "str" \
                or len(parent.data) < 2:
            return parent
        kept = tuple(b for b in parent.data if not self._rules_out(self.property_schema(b, parent.key or ""),
                                                                   value.text))
        return parent._replace(data=kept or parent.data)

    def _rules_out(self, schema: Any, value: str) -> bool:
        """Whether `schema` certainly rejects `value` (a check that cannot finish rules nothing out)."""
        try:
            return not self._validator.evolve(schema=self.resolve(schema)).is_valid(value)
        except Exception:  # noqa: BLE001
            return False

    # -- completion ------------------------------------------------------------------------------

    def completion(self, stack: Stack | None) -> str | None:
        """The text that closes `stack` into a complete value, or None if we cannot build one."""
        suffix = ""
        for _ in range(4096):
            if stack is None:
                return None
            if stack.done:
                return suffix
            if stack.scalar is not None and stack.scalar.kind == "num":
                rest = self._close_number(stack.scalar)
                if rest is None:
                    return None
                suffix += rest
                stack = self.feed(stack, rest)
                stack = self.close_number(stack) if stack is not None else None
                continue
            piece = self._next_piece(stack)
            if piece is None:
                return None
            stack = self.feed(stack, piece)
            suffix += piece
        return None

    def _next_piece(self, stack: Stack) -> str | None:
        scalar = stack.scalar
        if scalar is not None:
            if scalar.kind == "lit":
                return LITERALS[scalar.text[0]][len(scalar.text):]
            return self._close_string(stack, scalar)
        if not stack.frames:
            return self.minimal(self.root)
        top = stack.frames[-1]
        if top.kind == "arr":
            need = max(int(b.get("minItems", 0)) for b in top.data)
            if top.phase == "value" or top.items < need:
                item = self._cheapest([self.item_schema(b, top.items) for b in top.data])
                return None if item is None else (self.item_sep if top.phase == "after" else "") + item
            return "]"
        if top.phase in ("colon", "value"):
            value = self._cheapest([self.property_schema(b, top.key or "") for b in top.data])
            return None if value is None else (self.key_sep if top.phase == "colon" else "") + value
        return self._next_member(top.data, top.keys, top.phase)

    def _next_member(self, branches: tuple[dict[str, Any], ...], seen: tuple[str, ...], phase: str) -> str | None:
        best: str | None = None
        for branch in branches:
            missing = [k for k in self.required_order(branch) if k not in seen]
            fresh = self._fresh_key(branch, seen)
            if not missing and len(seen) < int(branch.get("minProperties", 0)):  # a declared one, else a fresh one
                missing = [k for k in [*branch.get("properties", {}), fresh] if k is not None and k not in seen][:1]
            if not missing:
                piece = None if phase == "key" else "}"
                if piece is None:  # after a comma a member must follow: the cheapest declared one
                    options = self.declared_after(branch, seen) + ([fresh] if fresh is not None else [])
                    members = [self._member(branch, k) for k in options]
                    piece = min((m for m in members if m), key=len, default=None)
            else:
                piece = self._member(branch, missing[0])
                if piece is not None and phase == "after":
                    piece = self.item_sep + piece
            if piece is not None and (best is None or len(piece) < len(best)):
                best = piece
        return best

    def _fresh_key(self, branch: dict[str, Any], seen: tuple[str, ...]) -> str | None:
        """A short name the object has not used and does not declare, where it allows one."""
        used = {*seen, *_declared((branch,))}
        fresh = next(k for k in ("", *map(str, range(len(used) + 1))) if k not in used)
        return fresh if self.property_schema(branch, fresh) is not False else None

    def _member(self, branch: dict[str, Any], key: str) -> str | None:
        value = self.minimal(self.property_schema(branch, key))
        return None if value is None else f"{_dumps(key)}{self.key_sep}{value}"

    def _cheapest(self, schemas: list[Any]) -> str | None:
        texts = [t for t in (self.minimal(s) for s in schemas) if t is not None]
        return min(texts, key=len, default=None)

    def _close_number(self, scalar: Scalar) -> str | None:
        """Digits that finish a started number within the schema's bounds ("-", "1.", "1e" need one).
        A fraction ending in 0 gets a last nonzero digit where that stays valid: llguidance's grammar
        for a bounded number writes fractions without trailing zeros, so it refuses to end there."""
        fraction = "." in scalar.text and not {"e", "E"} & set(scalar.text)
        rests = ("1", "") if fraction and scalar.text.endswith("0") else ()
        for rest in (*rests, "", "0", "00", "000", "0000"):
            text = scalar.text + rest
            if complete_number(text) and any(self.is_valid(b, json.loads(text)) for b in scalar.data):
                return rest
        return None

    def _close_string(self, stack: Stack, scalar: Scalar) -> str | None:
        chars, escape = scalar.text, scalar.escape
        fix = ""
        if escape == "\\":
            fix = "n"  # a newline: the shortest way to finish a started escape
            chars += "\n"
        elif escape:
            fix = "0" * (5 - len(escape))
            chars += chr(int((escape[1:] + fix)[:4], 16))
        if scalar.kind == "key":
            return self._close_key(stack.frames[-1], chars, fix)
        best: str | None = None
        for branch in scalar.data:
            for rest in self._string_rests(branch, chars):
                text = chars + rest
                if self.is_valid(branch, text) and (best is None or len(rest) < len(best)):
                    best = rest
        return None if best is None else fix + _dumps(best)[1:]

    def _close_key(self, obj: Frame, chars: str, fix: str) -> str | None:
        """The rest of a key being written: a declared name it begins (backends keep their order),
        else an additional property under a name not used yet, else a patternProperties example."""
        names = [k for b in obj.data for k in self.declared_after(b, obj.keys) if k.startswith(chars)]
        options = [k[len(chars):] for k in names]
        for rest in ("", "0", "1"):
            if not options and chars + rest not in obj.keys and chars + rest not in _declared(obj.data) and any(
                    self.property_schema(b, chars + rest) is not False for b in obj.data):
                options.append(rest)
        if not options:
            options = [rest for rest in self._pattern_key_rests(obj.data, chars) if chars + rest not in obj.keys]
        if not options or fix and "" not in options:
            return None
        return fix + min(options, key=len) + '"'

    def _pattern_key_rests(self, branches: tuple[dict[str, Any], ...], chars: str) -> list[str]:
        rests = []
        for branch in branches:
            for pattern in branch.get("patternProperties", {}):
                example = regex_example(pattern)
                for rest in ([example[len(chars):], example] if example else []) + ["", "a", "/a"]:
                    if regex_search(pattern, chars + rest, PATTERN_TIMEOUT_S):
                        rests.append(rest)
        return rests

    def _string_rests(self, s: dict[str, Any], chars: str) -> list[str]:
        values = [s["const"]] if "const" in s else s.get("enum") if isinstance(s.get("enum"), list) else None
        if values is not None:
            return [v[len(chars):] for v in values if isinstance(v, str) and v.startswith(chars)]
        example = FORMATS.get(s.get("format", ""))
        if example is not None:  # fixed layouts (dates, uuids) line up with the example's tail
            return [example[len(chars):], "", "a", ".aa", "a.aa", "@a.aa", "0", ".0",
                    *FORMAT_TAILS.get(s["format"], ())]
        need = max(0, int(s.get("minLength", 0)) - len(chars))
        rests = [c * need for c in "a0A"]
        if isinstance(s.get("pattern"), str):
            rests += [c * max(need, 1) for c in "a0A-_."]
            example = regex_example(s["pattern"])
            if example is not None:  # the example's tail: fits when the output followed its layout
                rests += [example[len(chars):], example] if len(example) > len(chars) else [example]
        return rests


# What finishes a value of a format written its own way (an offset, a fraction, an address cut
# between groups, a duration's next unit), where the example's tail does not line up.
_CLOCK = ("Z", "0Z", "00Z", ":00Z", "0:00Z", "00:00", "0:00", ":00", "00")
FORMAT_TAILS: dict[str, tuple[str, ...]] = {
    "time": _CLOCK, "date-time": _CLOCK, "duration": ("D", "Y", "M", "W", "H", "S", "0S", "T0S", "0D"),
    "ipv4": (".0.0.0", ".0.0", ".0", "0.0.0", "0.0"), "ipv6": ("::", "::1", ":1", "1", ":"), "uri": (":a", ":"),
}


def _declared(branches: tuple[dict[str, Any], ...]) -> set[str]:
    return {k for b in branches for k in b.get("properties", {})}


def _merge(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    """Shallow merge for building candidates (the result is validated against the real schema)."""
    if not isinstance(extra, dict):
        return base
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **{name: _both(merged[key].get(name), sub) for name, sub in value.items()}}
        elif key == "required" and isinstance(merged.get(key), list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        elif key not in merged:
            merged[key] = value
    return merged


def _both(a: Any, b: Any) -> Any:
    """A property's subschemas from two merged schemas: both apply."""
    if a is None or a == {} or a is True:
        return b
    return a if b == {} or b is True else {"allOf": [a, b]}


def _allows_type(s: dict[str, Any], json_type: str) -> bool:
    if "const" in s or "enum" in s:
        values = [s["const"]] if "const" in s else s["enum"]
        return any(_json_type(_dumps(v)[:1]) == json_type for v in values if _dumps(v))
    declared = s.get("type")
    if declared is None:
        return True
    types = [declared] if isinstance(declared, str) else declared
    return json_type in types or (json_type == "number" and "integer" in types)


