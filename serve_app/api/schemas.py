"""HTTP request/response schemas: OpenAI-compatible and native. No torch here.

Requests use ``extra="forbid"``: a parameter we do not implement is a 400 naming it, never
silently ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.constraints import SOURCE_FIELD, Constraint, JsonSchemaConstraint, build_constraint
from serve_app.engine.types import ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from serve_app.errors import ConstraintError, InvalidRequestError
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
    seed_for_choice,
    stops_validator,
)

MAX_N = 8


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonSchemaSpec(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Request):
    include_usage: bool = True


class _Penalties(_Request):
    """Loop control, applied inside the constrained decode (they never allow an invalid token),
    and closing JSON before the budget runs out. Left out = the model's configured default."""

    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    presence_penalty: PresencePenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None
    close_json: bool | None = None

    def penalties(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _Penalties.model_fields}


class _OpenAIBase(_Penalties):
    model: str
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    _stops = stops_validator()

    def constraint(self) -> Constraint | None:
        """The one constraint this request asks for, from response_format or a guided_* field."""
        found = [c for c in (self._from_response_format(), *self._from_guided()) if c is not None]
        if len(found) > 1:
            raise ConstraintError("give one constraint: response_format or one guided_* field, not several",
                                  param="response_format")
        return found[0] if found else None

    def constraint_source(self) -> str | None:
        """The request field the constraint came from, for errors that name it."""
        fields = ["guided_json", "guided_regex", "guided_choice", "guided_grammar"]
        if self.response_format is not None and self.response_format.type == "json_schema":
            return "response_format.json_schema"
        return next((f for f in fields if getattr(self, f) not in (None, "")), None)

    def _from_response_format(self) -> Constraint | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JsonSchemaConstraint.model_validate({"schema": {"type": "object"}})
        if fmt.json_schema is None:
            raise ConstraintError("response_format.json_schema is required when type is json_schema",
                                  param="response_format.json_schema")
        strict = fmt.json_schema.strict is not False  # OpenAI's strict: only an explicit false relaxes it
        return _parse({"type": "json_schema", "schema": fmt.json_schema.schema_, "strict": strict},
                      "response_format.json_schema")

    def _from_guided(self) -> list[Constraint | None]:
        import json

        guided_json = self.guided_json
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except ValueError:
                raise ConstraintError("guided_json is not valid JSON", param="guided_json") from None
        return [
            _parse({"type": "json_schema", "schema": guided_json}, "guided_json") if guided_json is not None else None,
            _parse({"type": "regex", "pattern": self.guided_regex}, "guided_regex") if self.guided_regex else None,
            _parse({"type": "choice", "choices": self.guided_choice}, "guided_choice")
            if self.guided_choice is not None else None,
            _parse({"type": "grammar", "grammar": self.guided_grammar}, "guided_grammar")
            if self.guided_grammar else None,
        ]

    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_new_tokens=self.max_completion_tokens or self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stops,
                              **self.penalties())


def _parse(data: dict[str, Any], param: str) -> Constraint:
    try:
        return build_constraint(data)
    except ConstraintError as error:
        detail = error.message.split(": ", 1)[-1]
        raise ConstraintError(f"{param}: {detail}", param=param, code=error.code) from None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)

    def generation_requests(self) -> list[GenerationRequest]:
        return _n_requests(self, {"messages": self.messages})


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]

    def generation_requests(self) -> list[GenerationRequest]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequestError("prompt: give one prompt (a string or a list of one)", param="prompt")
            prompt = prompt[0]
        return _n_requests(self, {"prompt": prompt})


def _n_requests(request: _OpenAIBase, inputs: dict[str, Any]) -> list[GenerationRequest]:
    """n choices = n rows; with a seed, choice i uses seed + i (wrapping within the signed 64-bit
    range) so the choices differ."""
    constraint, sampling = request.constraint(), request.sampling()
    rows = []
    for i in range(request.n):
        seed = None if sampling.seed is None else seed_for_choice(sampling.seed, i)
        rows.append(GenerationRequest(**inputs, constraint=constraint,
                                      sampling=sampling.model_copy(update={"seed": seed})))
    return rows


class NativeGenerateRequest(_Penalties):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    constraint: Constraint | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    stream: bool = False

    _stops = stops_validator()

    @model_validator(mode="after")
    def _one_input(self) -> NativeGenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def generation_requests(self) -> list[GenerationRequest]:
        return [self.generation_request()]

    def constraint_source(self) -> str | None:
        return None if self.constraint is None else f"constraint.{SOURCE_FIELD[self.constraint.type]}"

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt, messages=self.messages, constraint=self.constraint,
            sampling=SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                    top_p=self.top_p, seed=self.seed, stop=self.stop, **self.penalties()))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(results: list[GenerationResult]) -> dict[str, int]:
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion_response(model: str, results: list[GenerationResult]) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason, "logprobs": None, "valid": r.valid,
                     "closed_early": r.closed_early} for i, r in enumerate(results)],
        "usage": usage_of(results),
    }


def completion_response(model: str, results: list[GenerationResult]) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None,
                     "valid": r.valid, "closed_early": r.closed_early} for i, r in enumerate(results)],
        "usage": usage_of(results),
    }


def native_response(model: str, result: GenerationResult, constraint: Constraint | None,
                    router_s: float) -> dict[str, Any]:
    parsed = None
    if isinstance(constraint, JsonSchemaConstraint) and result.valid:
        parsed = result.parsed()
        if not _finite(parsed):  # e.g. 1e999: valid JSON, but no float holds it (`text` has it exactly)
            parsed = None
    return {
        "id": new_id("gen"), "model": model, "text": result.text, "parsed": parsed,
        "finish_reason": result.finish_reason, "valid": result.valid,
        # Honest truncation: output cut by max_tokens is never presented as valid or parsed.
        "truncated": result.finish_reason == "length", "closed_early": result.closed_early,
        "constraint_type": constraint.type if constraint else None, "backend": result.backend,
        "approximated": result.approximated,
        "usage": result.usage.model_dump(), "timings": {**result.timings, "router_total_s": router_s},
        "served_by": result.served_by,
    }



def _finite(value: Any) -> bool:
    """Whether a parsed JSON value can be written back as JSON (no number overflowed to inf)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


class ChunkFormatter:
    """OpenAI streaming chunks for chat (``chat.completion.chunk``) or completions."""

    def __init__(self, model: str, chat: bool, n: int) -> None:
        self.model, self.chat, self.n = model, chat, n
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def start(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(self.n)])]

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(index, text, None)])

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> dict[str, Any]:
        """A row's last chunk; the usage of every row rides on the last row's."""
        choice = {**self._choice(index, None, result.finish_reason), "valid": result.valid,
                  "closed_early": result.closed_early}
        usage = usage_of(done) if len(done) == self.n else None
        return self._chunk([choice], **({"usage": usage} if usage is not None else {}))


class NativeEvents:
    """The native stream: ``{"delta": text}`` events, then ``{"done": <native response>}``."""

    def __init__(self, model: str, constraint: Constraint | None, started: float) -> None:
        self.model, self.constraint, self.started = model, constraint, started

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return {"delta": text}

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> dict[str, Any]:
        return {"done": native_response(self.model, result, self.constraint, time.perf_counter() - self.started)}
