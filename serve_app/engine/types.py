"""Requests and results of the engine (pydantic, picklable, no torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.engine.constraints import Constraint

MAX_STOPS = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class SamplingParams(_Model):
    """Left out = the model's configured default."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=32)
    close_json: bool | None = None

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, stop: list[str]) -> list[str]:
        if "" in stop:  # it would match before the first character: nothing could be generated
            raise ValueError("stop sequences must not be empty")
        return stop


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
