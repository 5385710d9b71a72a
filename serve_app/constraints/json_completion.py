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
import math
import re
from collections.abc import Callable
from typing import Any

from serve_app.cache import BoundedCache
from serve_app.constraints.keywords import FORMATS, resolve_pointer
from serve_app.constraints.validation import regex_search, safe_validator

logger = logging.getLogger(__name__)

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = "0123456789+-.eE"
_LITERALS = {"t": "true", "f": "false", "n": "null"}
# Subschema nesting the closer builds minimal values through; deeper, it knows no completion and
# the row ends honestly (the router's max_schema_depth is 32 by default).
_MAX_DEPTH = 24
# Minimal values remembered per schema: bounded memory per compiled constraint.
_MEMO_LIMIT = 4096
# $ref-to-$ref hops followed when resolving one subschema (the router's max_schema_depth is 32).
_MAX_REF_HOPS = 32
# Closing runs in the decode loop on every token: a pattern gets 10 ms here, against the 0.5 s
# of the output check after generation.
PATTERN_TIMEOUT_S = 0.01

# A parser state is a tuple of frames, innermost last; frames are tuples, so copies are free.
#   ("root", schema, done)
#   ("obj", branches, seen_keys, phase, key)   phase: open | key | colon | value | after
#   ("arr", branches, count, phase)            phase: open | value | after
#   ("str", branches, chars, escape, is_key)
#   ("num", branches, text)
#   ("lit", branches, text)
Stack = tuple[tuple[Any, ...], ...]


def _json_type(first: str) -> str:
    return {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(
        first, "number")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class JsonCloser:
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
        self.start: Stack = (("root", schema, False),)
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
        types = _types(s)
        if "null" in types:
            out.append("null")
        if "boolean" in types:
            out += ["true", "false"]
        if "integer" in types or "number" in types:
            out += _numbers(s, integer="number" not in types)
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
        for key in self.required_order(s):
            text = self.minimal(self.property_schema(s, key), depth + 1)
            if text is None:
                return None
            parts.append(f"{_dumps(key)}{self.key_sep}{text}")
        return "{" + self.item_sep.join(parts) + "}"

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

    # -- parsing ---------------------------------------------------------------------------------

    def feed(self, stack: Stack | None, text: str) -> Stack | None:
        for ch in text:
            if stack is None:
                return None
            stack = self._feed_char(stack, ch)
        return stack

    def _feed_char(self, stack: Stack, ch: str) -> Stack | None:
        top = stack[-1]
        kind = top[0]
        if kind == "str":
            return self._feed_string(stack, top, ch)
        if kind in ("num", "lit"):
            return self._feed_scalar(stack, top, ch)
        if ch in _WHITESPACE:
            return stack
        if kind == "root":
            return None if top[2] else self._start_value(stack, top[1], ch)
        if kind == "obj":
            return self._feed_object(stack, top, ch)
        if kind == "arr":
            return self._feed_array(stack, top, ch)
        return None

    def _feed_scalar(self, stack: Stack, top: tuple[Any, ...], ch: str) -> Stack | None:
        if top[0] == "num":
            if ch in _NUMBER_CHARS:
                return stack[:-1] + (("num", top[1], top[2] + ch),)
            done = self._value_done(stack[:-1], None)
            return self._feed_char(done, ch) if done is not None else None
        text = top[2] + ch
        word = _LITERALS[text[0]]
        if not word.startswith(text):
            return None
        return self._value_done(stack[:-1], None) if text == word else stack[:-1] + (("lit", top[1], text),)

    def _feed_object(self, stack: Stack, top: tuple[Any, ...], ch: str) -> Stack | None:
        _, branches, seen, phase, key = top
        if phase in ("open", "after") and ch == "}":
            return self._value_done(stack[:-1], None)
        if phase in ("open", "key") and ch == '"':
            return stack + (("str", branches, "", "", True),)
        if phase == "after" and ch == ",":
            return stack[:-1] + (("obj", branches, seen, "key", None),)
        if phase == "colon" and ch == ":":
            return stack[:-1] + (("obj", branches, seen, "value", key),)
        if phase == "value":
            schemas = [self.property_schema(b, key) for b in branches]
            return self._start_value(stack, {"anyOf": schemas} if len(schemas) > 1 else schemas[0], ch)
        return None

    def _feed_array(self, stack: Stack, top: tuple[Any, ...], ch: str) -> Stack | None:
        _, branches, count, phase = top
        if phase in ("open", "after") and ch == "]":
            return self._value_done(stack[:-1], None)
        if phase == "after":
            return stack[:-1] + (("arr", branches, count, "value"),) if ch == "," else None
        schemas = [self.item_schema(b, count) for b in branches]
        return self._start_value(stack, {"anyOf": schemas} if len(schemas) > 1 else schemas[0], ch)

    def _feed_string(self, stack: Stack, top: tuple[Any, ...], ch: str) -> Stack | None:
        _, branches, chars, escape, is_key = top
        if escape == "\\":
            if ch == "u":
                return stack[:-1] + (("str", branches, chars, "u", is_key),)
            if ch not in _ESCAPES:
                return None
            return stack[:-1] + (("str", branches, chars + _ESCAPES[ch], "", is_key),)
        if escape:
            if ch not in "0123456789abcdefABCDEF":
                return None
            escape += ch
            if len(escape) == 5:
                return stack[:-1] + (("str", branches, chars + chr(int(escape[1:], 16)), "", is_key),)
            return stack[:-1] + (("str", branches, chars, escape, is_key),)
        if ch == "\\":
            return stack[:-1] + (("str", branches, chars, "\\", is_key),)
        if ch == '"':
            if is_key:
                return self._value_done(stack[:-1], chars)
            return self._value_done(stack[:-1], None, chars)
        return stack[:-1] + (("str", branches, chars + ch, "", is_key),)

    def _start_value(self, stack: Stack, schema: Any, ch: str) -> Stack | None:
        json_type = _json_type(ch)
        if json_type == "number" and ch not in "-0123456789":
            return None
        branches = tuple(self.branches(schema, json_type)) or ({},)
        if ch == "{":
            return stack + (("obj", branches, (), "open", None),)
        if ch == "[":
            return stack + (("arr", branches, 0, "open"),)
        if ch == '"':
            return stack + (("str", branches, "", "", False),)
        if ch in _LITERALS:
            return stack + (("lit", branches, ch),)
        return stack + (("num", branches, ch),)

    def _value_done(self, stack: Stack, key: str | None, string: str | None = None) -> Stack | None:
        """The innermost value just ended (`key`: it was an object key; `string`: it was a
        string value). A string member value drops the object's alternatives it rules out, so
        that in ``anyOf: [{kind: const a, ...}, {kind: const b, ...}]`` the completion follows
        the branch the output chose (tool calls: the function's name picks its arguments)."""
        top = stack[-1]
        if top[0] == "root":
            return stack[:-1] + (("root", top[1], True),)
        if top[0] == "arr":
            return stack[:-1] + (("arr", top[1], top[2] + 1, "after"),)
        _, branches, seen, phase, current = top
        if key is not None:
            allowed = tuple(b for b in branches if self.property_schema(b, key) is not False)
            return stack[:-1] + (("obj", allowed or branches, seen, "colon", key),)
        if string is not None and len(branches) > 1:
            kept = tuple(b for b in branches if not self._rules_out(self.property_schema(b, current), string))
            branches = kept or branches
        return stack[:-1] + (("obj", branches, seen + (current,), "after", None),)

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
            top = stack[-1]
            if top[0] == "root" and top[2]:
                return suffix
            if top[0] == "num":
                rest = self._close_number(top)
                if rest is None:
                    return None
                suffix += rest
                stack = self._value_done(stack[:-1], None)
                continue
            piece = self._next_piece(stack)
            if piece is None:
                return None
            stack = self.feed(stack, piece)
            suffix += piece
        return None

    def _next_piece(self, stack: Stack) -> str | None:
        top = stack[-1]
        kind = top[0]
        if kind == "root":
            return self.minimal(top[1])
        if kind == "lit":
            return _LITERALS[top[2][0]][len(top[2]):]
        if kind == "str":
            return self._close_string(stack, top)
        if kind == "arr":
            _, branches, count, phase = top
            need = max(int(b.get("minItems", 0)) for b in branches)
            if phase == "value" or count < need:
                item = self._cheapest([self.item_schema(b, count) for b in branches])
                return None if item is None else (self.item_sep if phase == "after" else "") + item
            return "]"
        _, branches, seen, phase, key = top
        if phase == "colon":
            value = self._cheapest([self.property_schema(b, key) for b in branches])
            return None if value is None else self.key_sep + value
        if phase == "value":
            return self._cheapest([self.property_schema(b, key) for b in branches])
        return self._next_member(branches, seen, phase)

    def _next_member(self, branches: tuple[dict[str, Any], ...], seen: tuple[str, ...], phase: str) -> str | None:
        best: str | None = None
        for branch in branches:
            missing = [k for k in self.required_order(branch) if k not in seen]
            if not missing and len(seen) < int(branch.get("minProperties", 0)):
                missing = [k for k in branch.get("properties", {}) if k not in seen][:1]
            if not missing:
                piece = None if phase == "key" else "}"
                if piece is None:  # after a comma a member must follow: the cheapest declared one
                    options = self.declared_after(branch, seen)
                    fresh = next((k for k in ("", "0", "1") if k not in seen and k not in _declared((branch,))), None)
                    if fresh is not None and self.property_schema(branch, fresh) is not False:
                        options.append(fresh)  # or an additional property
                    members = [self._member(branch, k) for k in options]
                    piece = min((m for m in members if m), key=len, default=None)
            else:
                piece = self._member(branch, missing[0])
                if piece is not None and phase == "after":
                    piece = self.item_sep + piece
            if piece is not None and (best is None or len(piece) < len(best)):
                best = piece
        return best

    def _member(self, branch: dict[str, Any], key: str) -> str | None:
        value = self.minimal(self.property_schema(branch, key))
        return None if value is None else f"{_dumps(key)}{self.key_sep}{value}"

    def _cheapest(self, schemas: list[Any]) -> str | None:
        texts = [t for t in (self.minimal(s) for s in schemas) if t is not None]
        return min(texts, key=len, default=None)

    def _close_number(self, top: tuple[Any, ...]) -> str | None:
        """Digits that finish a started number within the schema's bounds ("-", "1.", "1e" need one)."""
        for rest in ("", "0", "00", "000", "0000"):
            text = top[2] + rest
            if _complete_number(text) and any(self.is_valid(b, json.loads(text)) for b in top[1]):
                return rest
        return None

    def _close_string(self, stack: Stack, top: tuple[Any, ...]) -> str | None:
        _, branches, chars, escape, is_key = top
        fix = ""
        if escape == "\\":
            fix = "n"  # a newline: the shortest way to finish a started escape
            chars += "\n"
        elif escape:
            fix = "0" * (5 - len(escape))
            chars += chr(int((escape[1:] + fix)[:4], 16))
        if is_key:
            obj = stack[-2]
            names = [k for b in obj[1] for k in self.declared_after(b, obj[2]) if k.startswith(chars)]
            options = [k[len(chars):] for k in names]  # declared names first: backends keep their order
            for rest in ("", "0", "1"):  # else an additional property, under a name not used yet
                if not options and chars + rest not in obj[2] and chars + rest not in _declared(obj[1]) and any(
                        self.property_schema(b, chars + rest) is not False for b in obj[1]):
                    options.append(rest)
            if not options:  # a key that must match a patternProperties pattern: follow its example
                options = [rest for rest in self._pattern_key_rests(obj[1], chars) if chars + rest not in obj[2]]
            if not options or fix and "" not in options:
                return None
            return fix + min(options, key=len) + '"'
        best: str | None = None
        for branch in branches:
            for rest in self._string_rests(branch, chars):
                text = chars + rest
                if self.is_valid(branch, text) and (best is None or len(rest) < len(best)):
                    best = rest
        return None if best is None else fix + _dumps(best)[1:]

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
            return [example[len(chars):], "", "a", ".aa", "a.aa", "@a.aa", "0", ".0"]
        need = max(0, int(s.get("minLength", 0)) - len(chars))
        rests = [c * need for c in "a0A"]
        if isinstance(s.get("pattern"), str):
            rests += [c * max(need, 1) for c in "a0A-_."]
            example = regex_example(s["pattern"])
            if example is not None:  # the example's tail: fits when the output followed its layout
                rests += [example[len(chars):], example] if len(example) > len(chars) else [example]
        return rests


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


def _declared(branches: tuple[dict[str, Any], ...]) -> set[str]:
    return {k for b in branches for k in b.get("properties", {})}


def _merge(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    """Shallow merge for building candidates (the result is validated against the real schema)."""
    if not isinstance(extra, dict):
        return base
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        elif key not in merged:
            merged[key] = value
    return merged


_ALL_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
_IMPLIED = {"properties": "object", "required": "object", "additionalProperties": "object", "items": "array",
            "prefixItems": "array", "minItems": "array", "minLength": "string", "pattern": "string",
            "format": "string", "minimum": "number", "maximum": "number"}


def _types(s: dict[str, Any]) -> tuple[str, ...]:
    declared = s.get("type")
    if isinstance(declared, str):
        return (declared,)
    if isinstance(declared, list):
        return tuple(declared)
    implied = {t for k, t in _IMPLIED.items() if k in s}
    return tuple(sorted(implied)) if implied else _ALL_TYPES


def _allows_type(s: dict[str, Any], json_type: str) -> bool:
    if "const" in s or "enum" in s:
        values = [s["const"]] if "const" in s else s["enum"]
        return any(_json_type(_dumps(v)[:1]) == json_type for v in values if _dumps(v))
    declared = s.get("type")
    if declared is None:
        return True
    types = [declared] if isinstance(declared, str) else declared
    return json_type in types or (json_type == "number" and "integer" in types)


def _numbers(s: dict[str, Any], integer: bool) -> list[str]:
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


def _complete_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", text))
