"""Messages (and tools) to prompt text through the model's chat template.

Templates that know tool calling get `tools` and the history's `tool_calls` as they are. For a
template that does not (SmolLM2's, the tiny test model's ChatML), the tools are described in the system
message and earlier tool calls are written as the JSON a call is generated as,
``{"name": ..., "arguments": {...}}`` (api/tools.py), so the model sees the shape it is asked for.
"""

from __future__ import annotations

import json
from typing import Any

from serve_app.errors import InvalidRequestError
from serve_app.generation import ChatMessage

TOOLS_PROMPT = (
    "You can call these functions. Each is given as JSON: its name, what it does, and the JSON Schema of its "
    "arguments.\n<tools>\n{tools}\n</tools>\nTo call a function, reply with only a JSON object: "
    '{{"name": <the function\'s name>, "arguments": <its arguments as a JSON object>}}.'
)


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """`template_kwargs`: a request's chat_template_kwargs (e.g. Qwen3's enable_thinking)."""
    template = tokenizer.chat_template
    if not template:
        raise InvalidRequestError(
            "messages: this model has no chat template; send a prompt (/v1/completions) or set the model's "
            "loading.chat_template", param="messages", code="no_chat_template")
    dumped = [m.model_dump(exclude_none=True) for m in messages]
    extra: dict[str, Any] = dict(template_kwargs or {})
    if "tool_calls" not in template:
        dumped = [_plain(m) for m in dumped]
    if tools:
        if "tools" in template:
            extra["tools"] = tools
        else:
            dumped = _with_tools_prompt(dumped, tools)
    try:
        return str(tokenizer.apply_chat_template(dumped, add_generation_prompt=True, tokenize=False,
                                                 chat_template=template, **extra))
    except Exception as error:  # jinja's TemplateError (e.g. roles out of the order it wants), or a bad value
        message = str(error).strip()[:300] or type(error).__name__
        raise InvalidRequestError(f"messages: the model's chat template refused them: {message}",
                                  param="messages", code="chat_template") from None


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a template without tool support can render it: text content only."""
    calls = message.pop("tool_calls", None)
    message.pop("tool_call_id", None)
    message.pop("name", None)
    if calls:
        written = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                              ensure_ascii=False) for c in calls]
        message["content"] = "\n".join([message["content"], *written] if message.get("content") else written)
    message.setdefault("content", "")
    return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text  # a client's own malformed arguments: shown as they came


def _with_tools_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    described = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    prompt = TOOLS_PROMPT.format(tools=described)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
