"""Hostile request shapes, as hypothesis strategies: a valid request with one field (at any depth,
schemas included) replaced by deep nesting, lone surrogates and control characters, extreme and
non-finite numbers, empty strings and lists, or huge sizes. Used by the derandomized test in
tests/integration/test_reliability.py and by the larger randomized run in bench/hostile.py."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
                                           "b": {"type": "integer", "maximum": 9}}, "required": ["a"]}
# (route, a valid body) pairs; each is answered 200 or a deliberate 4xx as is.
BASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "tiny-small", "messages": USER, "max_tokens": 4}),
    ("/v1/chat/completions", {"model": "tiny-small", "messages": USER, "max_tokens": 32,
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "r", "schema": SCHEMA}}}),
    ("/v1/chat/completions", {"model": "tiny-small", "messages": USER, "max_tokens": 32, "logprobs": True,
                              "top_logprobs": 2, "tool_choice": "required", "tools": [
                                  {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]}),
    ("/v1/completions", {"model": "tiny-small", "prompt": "hi", "max_tokens": 4, "guided_regex": "[a-z]{2,5}"}),
    ("/v1/completions", {"model": "tiny-small", "prompt": "hi", "max_tokens": 4, "guided_choice": ["yes", "no"]}),
    ("/v1/generate", {"model": "tiny-small", "prompt": "hi", "max_tokens": 8,
                      "constraint": {"type": "grammar", "grammar": 'start: "a" "b"?'}}),
    ("/v1/generate", {"model": "tiny-small", "prompt": "hi", "max_tokens": 32,
                      "constraint": {"type": "json_schema", "schema": SCHEMA}}),
]
# Where a hostile value goes: dotted paths (numbers index lists); missing parents are created.
COMMON = ["model", "max_tokens", "temperature", "top_p", "seed", "stop", "stop.0", "n", "stream",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "no_repeat_ngram_size", "close_json", "zzz"]
PATHS: dict[str, list[str]] = {
    "/v1/chat/completions": COMMON + [
        "messages", "messages.0", "messages.0.content", "messages.0.role", "messages.1",
        "response_format", "response_format.type", "response_format.json_schema.schema",
        "response_format.json_schema.schema.properties", "response_format.json_schema.schema.properties.a",
        "response_format.json_schema.schema.properties.a.pattern",
        "response_format.json_schema.schema.properties.b.maximum", "response_format.json_schema.schema.required",
        "response_format.json_schema.name", "guided_json", "guided_grammar", "stream_options.include_usage",
        "messages.0.content.0", "messages.0.content.0.type", "messages.0.tool_calls", "messages.0.name",
        "tools", "tools.0", "tools.0.function.name", "tools.0.function.parameters",
        "tools.0.function.parameters.properties.a", "tools.0.function.parameters.$defs", "tool_choice",
        "tool_choice.function.name", "parallel_tool_calls", "logprobs", "top_logprobs", "top_k", "min_p",
        "structured_outputs", "structured_outputs.json", "structured_outputs.regex", "metadata",
        "chat_template_kwargs", "chat_template_kwargs.enable_thinking"],
    "/v1/completions": COMMON + ["prompt", "prompt.0", "logprobs", "top_k", "min_p",
                                 "guided_regex", "guided_choice", "guided_choice.0",
                                 "guided_json", "guided_json.properties.x.minimum", "guided_grammar", "max_tokens"],
    "/v1/generate": COMMON + [
        "prompt", "messages", "constraint", "constraint.type", "constraint.schema", "constraint.schema.$defs",
        "constraint.schema.properties.a", "constraint.schema.properties.a.pattern",
        "constraint.schema.properties.b.maximum", "constraint.schema.properties.b.multipleOf",
        "constraint.schema.patternProperties", "constraint.schema.$ref", "constraint.schema.$id",
        "constraint.grammar", "constraint.pattern", "constraint.choices", "constraint.choices.0",
        "constraint.backend", "constraint.strict"],
}


@dataclass(frozen=True)
class Deep:
    """Nesting written as text (the client's json.dumps would recurse as deep as the value)."""

    depth: int
    kind: str  # "list", "dict" or "schema"

    def text(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "1" + "]" * self.depth
        if self.kind == "dict":
            return '{"a":' * self.depth + "1" + "}" * self.depth
        return '{"type":"object","properties":{"a":' * self.depth + '{"type":"string"}' + "}}" * self.depth


NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0, 1, -1, 0.5,
                           2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30)]) \
    | st.integers() | st.floats()
TEXTS = st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\udbff", "\u202e\u200b", "\x1b[2J\r\n",
                         "\n" * 64, "é" * 1000, "x" * 100_000, "(" * 3000, "[" * 3000, "{" * 3000,
                         "(" * 60 + "a" + ")" * 60, "^(a+)+$", "(a|a)*b", "\\", "%import os.path",
                         'start: X\n%import nosuchmod.X', "#/$defs/nowhere", "http://example.com/s.json",
                         "NaN", "tiny", "tiny-small", "\ud83d\ude00"]) | st.text(max_size=24)
EMPTY = st.sampled_from([[], {}, "", None, [""], [[]], {"": ""}])
HUGE = st.sampled_from([["x"] * 5000, [{"role": "user", "content": "hi"}] * 2000, {f"k{i}": i for i in range(3000)},
                        list(range(20_000))])
DEEP = st.builds(Deep, depth=st.sampled_from([40, 129, 300, 1200, 20_000]),
                 kind=st.sampled_from(["list", "dict", "schema"]))
VALUES = (NUMBERS | TEXTS | EMPTY | HUGE | DEEP | st.lists(TEXTS, max_size=4)
          | st.dictionaries(TEXTS, NUMBERS, max_size=3))


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    node: Any = body
    parts = path.split(".")
    for part, after in zip(parts, parts[1:], strict=False):
        child = _get(node, part)
        if not isinstance(child, dict | list):
            child = [] if after.isdigit() else {}
            _put(node, part, child)
        node = child
    _put(node, parts[-1], value)


def _get(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _put(node: Any, part: str, value: Any) -> None:
    if isinstance(node, list):
        index = int(part) if part.isdigit() else len(node)
        node.extend([None] * (index + 1 - len(node)))
        node[index] = value
    else:
        node[part] = value


def encode(body: dict[str, Any]) -> bytes:
    """JSON text with NaN/Infinity literals and surrogate escapes kept, Deep values spliced in."""
    deep: dict[str, str] = {}

    def default(value: Any) -> Any:
        if isinstance(value, Deep):
            marker = f"__deep_{len(deep)}__"
            deep[marker] = value.text()
            return marker
        raise TypeError(type(value).__name__)

    text = json.dumps(body, default=default)  # ensure_ascii: lone surrogates become \ud800 escapes
    for marker, value in deep.items():
        text = text.replace(json.dumps(marker), value)
    return text.encode()


@st.composite
def hostile_requests(draw: Any) -> tuple[str, bytes]:
    route, base = draw(st.sampled_from(BASES))
    body = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 2))):
        # A copy: sampled values are shared objects, and a later path may write into this one.
        set_path(body, draw(st.sampled_from(PATHS[route])), copy.deepcopy(draw(VALUES)))
    return route, encode(body)
