"""Messages (and tools) to prompt text through the model's chat template.

Templates that know tool calling get `tools` and the history's `tool_calls` as they are. For a
template that does not (SmolLM2's, the tiny test model's ChatML), the tools are described in the system
message and earlier tool calls are written as the JSON a call is generated as,
``{"name": ..., "arguments": {...}}`` (api/tools.py), so the model sees the shape it is asked for.
"""

from __future__ import annotations

import functools
import json
import re
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
    return _render(tokenizer, [m.model_dump(exclude_none=True) for m in messages], tools, template_kwargs)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None, control_tokens: bool = False) -> list[int]:
    """The rendered prompt's tokens. Without `control_tokens`, a control token written in the
    client's text (`<|im_start|>` in a message, a tool's description, a template kwarg) is read as
    plain text: only the template's own markers are control tokens, so no client can forge a turn."""
    text = render_chat(tokenizer, messages, tools, template_kwargs)
    markers = _markers(tokenizer)
    sent = [m.model_dump(exclude_none=True) for m in messages], tools, template_kwargs
    if control_tokens or markers is None or not _mentions(markers, sent):
        return _ids(tokenizer, text)
    neutral = _render(tokenizer, *_blanked(markers, sent))  # the same text with the client's markers blanked
    if len(neutral) != len(text):
        raise InvalidRequestError("messages: a message holds one of the model's control tokens, and the chat "
                                  "template changes message text, so it cannot be kept plain text",
                                  param="messages", code="control_token")
    theirs = [m.span() for m in markers.finditer(text) if neutral[m.start():m.end()] != m.group()]
    return _with_plain_spans(tokenizer, text, theirs)


def _with_plain_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """`text`'s tokens as the tokenizer gives them, except that each marker at `spans` becomes the
    tokens of its text (first character apart, so it cannot match again). With offsets (a fast
    tokenizer) everything else is tokenized exactly as before; else piecewise around the spans."""
    def plain(start: int, end: int) -> list[int]:
        return _ids(tokenizer, text[start], plain=True) + _ids(tokenizer, text[start + 1:end], plain=True)

    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        wanted, out = set(spans), list[int]()
        for token, where in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            out += plain(*where) if tuple(where) in wanted else [token]
            wanted.discard(tuple(where))
        if not wanted:
            return out
    out, done = list[int](), 0
    for start, end in spans:
        out += _ids(tokenizer, text[done:start]) + plain(start, end)
        done = end
    return out + _ids(tokenizer, text[done:])


def _ids(tokenizer: Any, text: str, plain: bool = False) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])


@functools.lru_cache(maxsize=16)
def _markers(tokenizer: Any) -> re.Pattern[str] | None:
    """The tokenizer's control tokens: its special added tokens, and added tokens written as markup
    (`<tool_call>`, `[INST]`); longest first."""
    found = {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
             if len(str(t.content)) > 1 and (t.special or _MARKUP.fullmatch(str(t.content)))}
    return re.compile("|".join(re.escape(m) for m in sorted(found, key=len, reverse=True))) if found else None


_MARKUP = re.compile(r"<[^\s<>]+>|\[[^\s\[\]]+\]")


def _mentions(markers: re.Pattern[str], value: Any) -> bool:
    if isinstance(value, str):
        return markers.search(value) is not None
    if isinstance(value, list | tuple):
        return any(_mentions(markers, v) for v in value)
    if isinstance(value, dict):
        return any(_mentions(markers, v) for v in value.values())
    return False


def _blanked(markers: re.Pattern[str], value: Any) -> Any:
    """`value` with every marker in its strings replaced by as many `~` (same length, no marker,
    nothing JSON or a template escapes)."""
    if isinstance(value, str):
        return markers.sub(lambda m: "~" * len(m.group()), value)
    if isinstance(value, list | tuple):
        return type(value)(_blanked(markers, v) for v in value)
    if isinstance(value, dict):
        return {k: _blanked(markers, v) for k, v in value.items()}
    return value


def _render(tokenizer: Any, dumped: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            template_kwargs: dict[str, Any] | None) -> str:
    template = tokenizer.chat_template
    if not template:
        raise InvalidRequestError(
            "messages: this model has no chat template; send a prompt (/v1/completions) or set the model's "
            "loading.chat_template", param="messages", code="no_chat_template")
    extra: dict[str, Any] = dict(template_kwargs or {})
    if "tool_calls" not in template:
        dumped = [_plain(dict(m)) for m in dumped]
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
