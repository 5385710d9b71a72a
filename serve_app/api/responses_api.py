"""`POST /v1/responses`, OpenAI's Responses API, on the chat path: a request becomes the chat
request it means (input items as messages, `instructions` as the system message, `text.format`
as `response_format`, flat function tools as chat tools), so the same limits, constraint layer,
closing, `valid` and errors apply; the answer is shaped as a Response object or its event stream.
Responses are not stored: `store: true` and `previous_response_id` are a 400.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.request_models import ChatCompletionRequest
from serve_app.api.responses import chat_message, new_id
from serve_app.api.tools import MAX_TOOLS
from serve_app.constraints import Constraint
from serve_app.errors import InvalidRequestError
from serve_app.fields import LogitBias, MaxTokens, Seed, Temperature, TopP
from serve_app.generation import GenerationRequest, GenerationResult, TokenLogprobs


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    id: str | None = Field(None, max_length=256)
    status: str | None = Field(None, max_length=32)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str
    id: str | None = Field(None, max_length=256)
    status: str | None = Field(None, max_length=32)


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str | list[dict[str, Any]]
    id: str | None = Field(None, max_length=256)
    status: str | None = Field(None, max_length=32)


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted: a hint our models have no use for


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str = Field(max_length=64)


class ResponsesRequest(_Request):
    model: str
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None  # accepted; an answer makes at most one call
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None  # an extension, as on the chat route: a sampled answer made repeatable
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["disabled"] | None = None
    # What to add to the answer: a reasoning section is always in clear text, so there is no
    # encrypted content to add; other includables are a 400 naming them.
    include: list[Literal["reasoning.encrypted_content"]] | None = Field(None, max_length=8)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)
    undeclared_properties: bool | None = None  # an extension, as on the chat route
    max_reasoning_tokens: Annotated[int, Field(ge=0)] | None = None  # an extension, as on the chat route
    logit_bias: LogitBias | None = None  # an extension, as on the chat route

    # The fields an engine's error names, as this route calls them (api/intake.py's as_sent).
    SENT_AS: ClassVar[dict[str, str]] = {"max_tokens": "max_output_tokens", "messages": "input", "prompt": "input"}

    @cached_property
    def chat(self) -> ChatCompletionRequest:
        """The chat request this one means (validated as one: its limits and errors)."""
        if self.store:
            raise InvalidRequestError("store: responses are not stored here; leave store out or send false",
                                      param="store", code="unsupported_parameter")
        if self.previous_response_id is not None:
            raise InvalidRequestError("previous_response_id: responses are not stored here; send the conversation "
                                      "as input items", param="previous_response_id", code="unsupported_parameter")
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": self._messages(), "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                      for t in self.tools or []] or None,
            "tool_choice": self._tool_choice(), "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self._response_format(), "undeclared_properties": self.undeclared_properties,
            "max_reasoning_tokens": self.max_reasoning_tokens, "logit_bias": self.logit_bias})

    def _messages(self) -> list[dict[str, Any]]:
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] \
            if self.instructions is not None else []
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": _text(item.content)})
            elif isinstance(item, FunctionCallItem):
                messages.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        return messages

    def _tool_choice(self) -> Any:
        choice = self.tool_choice
        return {"type": "function", "function": {"name": choice.name}} if isinstance(choice, NamedFunction) else choice

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type != "json_schema":
            return None if fmt is None else {"type": fmt.type}
        if fmt.schema_ is None:
            raise InvalidRequestError("text.format.schema is required when type is json_schema",
                                      param="text.format.schema")
        spec = {"name": fmt.name or "response", "description": fmt.description, "schema": fmt.schema_,
                "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}

    # -- what the intake and the answer shapes ask of a body ---------------------------------------

    def generation_requests(self, strict_default: bool = True) -> list[GenerationRequest]:
        return self.chat.generation_requests(strict_default)

    def tool_parameter_constraints(self, strict_default: bool = True,
                                   constrained_auto: bool = True) -> list[tuple[Constraint, str]]:
        return [(c, source.replace(".function.", ".")) for c, source in
                self.chat.tool_parameter_constraints(strict_default, constrained_auto)]

    def constraint_source(self) -> str | None:
        source = self.chat.constraint_source()
        return "text.format" if source == "response_format.json_schema" else source


def _text(content: str | list[dict[str, Any]]) -> str:
    """Input parts (input_text, output_text, text) joined with newlines, as chat content parts are."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part.get("text"), str) or part.get("type") not in ("input_text", "output_text", "text"):
            raise InvalidRequestError(f"input: part {i} is {part.get('type')!r}: this service serves text models; "
                                      "send input_text parts", param="input", code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)


# -- the answer -----------------------------------------------------------------------------------

def response_object(model: str, result: GenerationResult, body: ResponsesRequest,
                    ids: dict[str, str] | None = None) -> dict[str, Any]:
    """The Response for one answer: a reasoning item where the model reasoned, then a message
    item, a function_call item (a call forced by tool_choice, or under "auto" a call the answer
    started, generated under the tools' schema, or text that is a valid call), or both (text the
    answer wrote before its call)."""
    ids = ids or new_ids()
    message, _, valid = chat_message(result, body.chat)
    incomplete = result.finish_reason == "length"
    usage = result.usage
    return {
        **_settings(model, body, ids), "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output_items(message, ids),
        "usage": {"input_tokens": usage.prompt_tokens,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": usage.completion_tokens,
                  "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                  "total_tokens": usage.total_tokens},
        "valid": valid, "closed_early": result.closed_early}


def new_ids() -> dict[str, str]:
    return {"response": new_id("resp"), "message": new_id("msg"), "call": new_id("fc"), "reasoning": new_id("rs"),
            "created_at": str(int(time.time()))}


def _settings(model: str, body: ResponsesRequest, ids: dict[str, str]) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {"id": ids["response"], "object": "response", "created_at": int(ids["created_at"]), "model": model,
            "error": None, "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
            "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction)
            else body.tool_choice or "auto",
            "tools": [t.model_dump(by_alias=True) for t in body.tools or []],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "store": False, "previous_response_id": None, "truncation": "disabled", "user": body.user,
            "reasoning": {"effort": None, "summary": None}}


def output_items(message: dict[str, Any], ids: dict[str, str]) -> list[dict[str, Any]]:
    items = []
    if message.get("reasoning_content") is not None:
        items.append(_reasoning_item(message["reasoning_content"], ids))
    if message.get("content") is not None or not message.get("tool_calls"):
        items.append(_message_item(message.get("content") or "", ids))
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        items.append({"type": "function_call", "id": ids["call"], "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _reasoning_item(text: str, ids: dict[str, str], status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": ids["reasoning"], "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _message_item(text: str, ids: dict[str, str], status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": ids["message"], "role": "assistant", "status": status,
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """The Responses event stream (relay.StreamFormat): response.created; a reasoning item's text as
    reasoning_text deltas; the message's text as output_text deltas (held back and sent at the end
    where the answer may be a tool call, which is sent whole, validated, as function_call_arguments
    events); then response.completed (or response.incomplete) with the whole Response."""

    def __init__(self, model: str, body: ResponsesRequest) -> None:
        self.model, self.body, self.ids, self.seq = model, body, new_ids(), 0
        self.hold = bool(body.chat.forced_tools() or (body.chat.auto_tools() and not body.chat.constrained()))
        self.opened: list[str] = []  # the item types opened so far, in output order
        self.reasoning_text, self.closed_reasoning = "", False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": f"response.{kind}", "sequence_number": self.seq - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        pending = {**_settings(self.model, self.body, self.ids), "status": "in_progress", "output": [],
                   "incomplete_details": None, "usage": None}
        return [self._event("created", response=pending), self._event("in_progress", response=pending)]

    def reasoning(self, index: int, text: str) -> list[dict[str, Any]]:
        self.reasoning_text += text
        events = []
        if "reasoning" not in self.opened:
            self.opened.append("reasoning")
            events.append(self._event("output_item.added", output_index=0,
                                      item=_reasoning_item("", self.ids, "in_progress")))
        return [*events, self._event("reasoning_text.delta", item_id=self.ids["reasoning"], output_index=0,
                                     content_index=0, delta=text)]

    def delta(self, index: int, text: str, logprobs: list[TokenLogprobs] | None = None) -> list[dict[str, Any]]:
        if self.hold or not text:
            return []
        events = [*self._close_reasoning(), *self._open_message()]
        return [*events, self._event("output_text.delta", item_id=self.ids["message"], output_index=self._at("message"),
                                     content_index=0, delta=text, logprobs=[])]

    def _at(self, kind: str) -> int:
        return self.opened.index(kind)

    def _close_reasoning(self) -> list[dict[str, Any]]:
        if "reasoning" not in self.opened or self.closed_reasoning:
            return []
        self.closed_reasoning = True
        text, item = self.reasoning_text, _reasoning_item(self.reasoning_text, self.ids)
        return [self._event("reasoning_text.done", item_id=item["id"], output_index=0, content_index=0, text=text),
                self._event("output_item.done", output_index=0, item=item)]

    def _open_message(self) -> list[dict[str, Any]]:
        if "message" in self.opened:
            return []
        self.opened.append("message")
        item = _message_item("", self.ids, "in_progress") | {"content": []}
        return [self._event("output_item.added", output_index=self._at("message"), item=item),
                self._event("content_part.added", item_id=self.ids["message"], output_index=self._at("message"),
                            content_index=0, part=_text_part(""))]

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> list[dict[str, Any]]:
        final = response_object(self.model, result, self.body, self.ids)
        events = self._close_reasoning()
        for item in final["output"]:
            if item["type"] == "message":
                events += self._message(item)
            elif item["type"] == "function_call":
                events += self._call(item)
        return [*events, self._event("completed" if final["status"] == "completed" else "incomplete", response=final)]

    def _message(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._open_message()
        text, where = item["content"][0]["text"], {"item_id": item["id"], "output_index": self._at("message")}
        if self.hold and text:
            events.append(self._event("output_text.delta", **where, content_index=0, delta=text, logprobs=[]))
        return [*events, self._event("output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self._event("content_part.done", **where, content_index=0, part=_text_part(text)),
                self._event("output_item.done", output_index=where["output_index"], item=item)]

    def _call(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.opened.append("function_call")
        at = self._at("function_call")
        where, started = {"item_id": item["id"], "output_index": at}, {**item, "arguments": "", "status": "in_progress"}
        return [self._event("output_item.added", output_index=at, item=started),
                self._event("function_call_arguments.delta", **where, delta=item["arguments"]),
                self._event("function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]),
                self._event("output_item.done", output_index=at, item=item)]
