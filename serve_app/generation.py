"""Requests and results of the engine (pydantic, picklable, no torch)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.constraints import Constraint
from serve_app.fields import (
    FrequencyPenalty,
    LogitBias,
    MaxTokens,
    MinP,
    NgramSize,
    PresencePenalty,
    RepetitionPenalty,
    Seed,
    StopList,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    stops_validator,
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallFunction(_Model):
    name: str = Field(max_length=64)
    arguments: str


class ToolCall(_Model):
    """An assistant's earlier tool call, as OpenAI clients send it back in the history."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


# Content part type -> its text field. Media parts get a 400 that says so.
_TEXT_PARTS = {"text": "text", "input_text": "text", "refusal": "refusal"}
_MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file",
                          "video_url"})


class ChatMessage(_Model):
    """A message; `content` may be a list of text parts (joined with newlines, as vLLM does). An
    assistant message that made tool calls may have no content."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            kind = kind if isinstance(kind, str) else None
            key = _TEXT_PARTS.get(kind) if kind is not None else None
            if key is not None and isinstance(part.get(key), str):
                texts.append(part[key])
            elif kind in _MEDIA_PARTS:
                raise ValueError(f"part {i} is {kind}: this service serves text models; send text parts only")
            else:
                raise ValueError(f"part {i}: give {{\"type\": \"text\", \"text\": ...}}")
        return "\n".join(texts)

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobs(TokenLogprob):
    """One generated token, its log-probability and the most likely alternatives, as the
    constrained decode saw them (after penalties and the constraint's mask)."""

    top_logprobs: list[TokenLogprob] = Field(default_factory=list)


# Names the chat template call sets itself: a request's chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "chat_template", "return_dict",
                                      "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs"})
TemplateValue = str | bool | int | float | None


def _check_template_kwargs(kwargs: dict[str, TemplateValue]) -> dict[str, TemplateValue]:
    taken = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if taken:
        raise ValueError(f"{', '.join(taken)}: set by the service, not by chat_template_kwargs")
    if any(isinstance(v, str) and len(v) > 4096 for v in kwargs.values()):
        raise ValueError("values are at most 4096 characters")
    return kwargs


ChatTemplateKwargs = Annotated[dict[str, TemplateValue], Field(max_length=16), AfterValidator(_check_template_kwargs)]


class SamplingParams(_Model):
    """Left out = the model's configured default."""

    max_new_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    logprobs: TopLogprobs | None = None  # None: none; k: the chosen token's and the k most likely
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    presence_penalty: PresencePenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None
    close_json: bool | None = None
    # A reasoning model's thinking budget (the model's reasoning.max_tokens when left out).
    max_reasoning_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: LogitBias | None = None  # added to the logits before the constraint's mask

    _stops = stops_validator()


class GenerationRequest(_Model):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    constraint: Constraint | None = None
    sampling: SamplingParams = SamplingParams()
    # Function definitions for the chat template (tool calling); the constraint, if any, is built
    # from them by the API layer.
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # The constraint is a tool call the answer may start (tool_choice "auto"): text before the
    # call is free, the call is generated under the constraint (engine/prelude.py).
    tool_call_auto: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int  # reasoning tokens included, as OpenAI counts them
    total_tokens: int
    reasoning_tokens: int = 0


class GenerationResult(_Model):
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    # None without a constraint; otherwise whether the text satisfies it (checked after
    # generation with jsonschema / re.fullmatch / membership / a Lark parse).
    valid: bool | None
    closed_early: bool = False  # JSON closed with its shortest completion as max_tokens neared
    backend: str | None = None
    approximated: list[str] = Field(default_factory=list)  # not enforced (strict: false only); output checked
    rewrites: list[str] = Field(default_factory=list)  # meaning-preserving schema rewrites before compiling
    # Keywords checked while generating: {"keywords": [...], "evaluated", "violations", "rollbacks", "exhausted"}.
    checks: dict[str, Any] | None = None
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    reasoning: str | None = None  # a reasoning model's section before the answer (reasoning_content)
    # tool_call_auto: the text before the call when the answer started one (None: it made no call;
    # `text` is then the whole answer, unconstrained, and `valid` is None).
    preamble: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    served_by: dict[str, str] = Field(default_factory=dict)  # replica id, version, config hash

    def parsed(self) -> Any:
        import json

        return json.loads(self.text)
