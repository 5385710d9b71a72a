"""Requests and results of the engine (pydantic, picklable, no torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.constraints import Constraint
from serve_app.fields import (
    FrequencyPenalty,
    MaxTokens,
    NgramSize,
    PresencePenalty,
    RepetitionPenalty,
    Seed,
    StopList,
    Temperature,
    TopP,
    stops_validator,
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class SamplingParams(_Model):
    """Left out = the model's configured default."""

    max_new_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    presence_penalty: PresencePenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None
    close_json: bool | None = None

    _stops = stops_validator()


class GenerationRequest(_Model):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    constraint: Constraint | None = None
    sampling: SamplingParams = SamplingParams()

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    token_ids: list[int] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    served_by: dict[str, str] = Field(default_factory=dict)  # replica id, version, config hash

    def parsed(self) -> Any:
        import json

        return json.loads(self.text)
