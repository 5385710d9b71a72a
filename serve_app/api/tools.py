"""OpenAI tool calling on the schema path. No torch here.

With ``tool_choice`` ``"required"`` or a named function, the answer is generated under one JSON
Schema, ``{"name": <const>, "arguments": <the function's parameters>}`` (an ``anyOf`` over the
tools for ``"required"``), through the same limits, normalisation, backend cascade, closing and
validation as any schema; the reply carries it as ``message.tool_calls``. ``"auto"`` (the
default when tools are given) generates freely and turns the text into a tool call only when it
is such a JSON object naming a tool whose arguments validate; ``"none"`` generates text.
One call per answer: ``parallel_tool_calls`` is accepted, and at most one call is made.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.constraints import JsonSchemaConstraint

MAX_TOOLS = 128  # OpenAI's bound
# Keywords whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str = Field(max_length=64)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def forced_tools(tools: list[Tool], choice: ToolChoice | None) -> list[Tool] | None:
    """The tools an answer must call one of; None when it need not call any."""
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        return tools
    assert isinstance(choice, NamedToolChoice)
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        known = ", ".join(t.function.name for t in tools)
        raise ValueError(f"no tool named {choice.function.name!r} in tools (they are: {known})")
    return named[:1]


def parameters_of(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """One JSON Schema for a call of any of `tools`: ``{"name": const, "arguments": parameters}``.
    Each tool's local ``$ref``s are rewritten to point where its parameters now sit."""
    branches = []
    for i, tool in enumerate(tools):
        at = "#/properties/arguments" if len(tools) == 1 else f"#/anyOf/{i}/properties/arguments"
        parameters = {k: v for k, v in parameters_of(tool).items() if k != "$schema"}
        branches.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                         "properties": {"name": {"const": tool.function.name},
                                        "arguments": relocate(parameters, at)}})
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    dialect = next((parameters_of(t).get("$schema") for t in tools if "$schema" in parameters_of(t)), None)
    return {"$schema": dialect, **schema} if isinstance(dialect, str) else schema


def relocate(schema: Any, at: str) -> Any:
    """`schema` with every local ``$ref`` ("#...") made relative to the pointer `at`."""
    if isinstance(schema, list):
        return [relocate(item, at) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = at + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = relocate(value, at)
    return out


def tool_constraint(tools: list[Tool], strict: bool) -> JsonSchemaConstraint:
    return JsonSchemaConstraint.model_validate({"schema": call_schema(tools), "strict": strict})


def new_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def forced_call(text: str) -> dict[str, Any] | None:
    """The tool call in a forced answer (validated already); None if the text is not one."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
        return None
    return new_call(data["name"], _raw_arguments(text, data["arguments"]))


_ARGUMENTS_KEY = re.compile(r'"arguments"\s*:\s*')


def _raw_arguments(text: str, parsed: Any) -> str:
    """The arguments exactly as generated (a number such as 1e999 survives; re-serialising the
    parsed value would not), else re-serialised."""
    decoder = json.JSONDecoder()
    for match in _ARGUMENTS_KEY.finditer(text):
        try:
            value, end = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        if value == parsed:
            return text[match.end():end]
    return json.dumps(parsed, ensure_ascii=False)


_WRAPPERS = (("<tool_call>", "</tool_call>"), ("```json", "```"), ("```", "```"))


def detect_call(text: str, tools: list[Tool]) -> tuple[dict[str, Any] | None, bool | None]:
    """For tool_choice "auto": (the call, whether its arguments validate) when `text` is one JSON
    object ``{"name": <a tool>, "arguments": {...}}`` (also ``"parameters"``, and inside
    ``<tool_call>`` tags or a code fence); (None, None) when it is plain text."""
    body = text.strip()
    for start, end in _WRAPPERS:
        if body.startswith(start) and body.endswith(end) and len(body) >= len(start) + len(end):
            body = body[len(start):len(body) - len(end)].strip()
            break
    if not body.startswith("{"):
        return None, None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # nested past the parser's stack: not a call we can read
        return None, None
    by_name = {t.function.name: t for t in tools}
    if not isinstance(data, dict) or data.get("name") not in by_name:
        return None, None
    key = "arguments" if "arguments" in data else "parameters"
    arguments = data.get(key, {})
    raw = _raw_arguments(body, arguments)
    checker = JsonSchemaConstraint.model_validate({"schema": parameters_of(by_name[data["name"]])})
    return new_call(data["name"], raw), checker.is_satisfied_by(raw)


def could_become_call(text: str) -> bool:
    """For streaming "auto" answers: whether text so far may still turn out to be a tool call (it
    is held back until the answer ends) rather than plain text (streamed as it comes)."""
    body = text.lstrip()
    return not body or body.startswith(("{", "<tool_call>", "```")) or "<tool_call>".startswith(body) \
        or "```".startswith(body)
