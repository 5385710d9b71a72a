"""The HTTP request bodies, OpenAI-compatible (chat, completions) and native (/v1/generate), and
how each becomes generation rows and a constraint. No torch here.

Requests use ``extra="forbid"``: a parameter we do not implement is a 400 naming it, never
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.api import tools as tooling
from serve_app.api.tools import MAX_TOOLS, Tool, ToolChoice
from serve_app.constraints import SOURCE_FIELD, Constraint, JsonSchemaConstraint, build_constraint
from serve_app.errors import ConstraintError, InvalidRequestError
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
    seed_for_choice,
    stops_validator,
)
from serve_app.generation import (
    ChatMessage,
    ChatTemplateKwargs,
    GenerationRequest,
    SamplingParams,
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
    include_usage: bool = False  # true: a last chunk with `usage` and no choices, before [DONE]


class StructuredOutputs(_Request):
    """vLLM's current field; the older guided_* fields mean the same."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


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
    top_k: TopK | None = None
    min_p: MinP | None = None
    # Accepted and not acted on, as their meaning asks: who the end user is, and the client's labels.
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # An extension: true lets objects whose schema leaves additionalProperties out get undeclared properties.
    undeclared_properties: bool | None = None
    # An extension: a reasoning model's thinking budget, after which its end marker is forced.
    max_reasoning_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: LogitBias | None = None

    _stops = stops_validator()

    def constraint(self, strict_default: bool = True) -> Constraint | None:
        """The one constraint this request asks for: response_format, tools with a forced
        tool_choice, structured_outputs or a guided_* field. `strict_default`: for a json_schema or
        a tool that leaves `strict` out (the model's `strict_by_default`)."""
        found = [c for c in (self._from_response_format(strict_default), self._from_tools(strict_default),
                             *self._from_guided()) if c is not None]
        if len(found) > 1:
            raise ConstraintError("give one constraint: response_format, a forced tool_choice, structured_outputs "
                                  "or one guided_* field, not several", param="response_format")
        if found and isinstance(found[0], JsonSchemaConstraint) and self.undeclared_properties is not None:
            return found[0].model_copy(update={"undeclared_properties": self.undeclared_properties})
        return found[0] if found else None

    def _guided(self) -> dict[str, Any]:
        """The guided_* and structured_outputs.* fields that are set, by their request name."""
        out = {f: getattr(self, f) for f in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")}
        so = self.structured_outputs
        if so is not None:
            out.update({"structured_outputs.json": so.json_, "structured_outputs.regex": so.regex,
                        "structured_outputs.choice": so.choice, "structured_outputs.grammar": so.grammar})
        return {k: v for k, v in out.items() if v is not None}

    def constraint_source(self) -> str | None:
        """The request field the constraint came from, for errors that name it."""
        if self.response_format is not None and self.response_format.type == "json_schema":
            return "response_format.json_schema"
        if self.forced_tools() or self.enforced_auto_tools():
            return "tools"
        return next((f for f, v in self._guided().items() if v != ""), None)

    def forced_tools(self) -> list[Tool] | None:
        return None

    def enforced_auto_tools(self) -> list[Tool] | None:
        return None

    def constrained(self) -> bool:
        """Whether the request asks for a constraint (without building it)."""
        fmt = self.response_format
        return (fmt is not None and fmt.type != "text") or bool(self.forced_tools()) or any(
            v != "" for v in self._guided().values())

    def _from_tools(self, strict_default: bool) -> Constraint | None:
        return None

    def _from_response_format(self, strict_default: bool) -> Constraint | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JsonSchemaConstraint.model_validate({"schema": {"type": "object"}})
        if fmt.json_schema is None:
            raise ConstraintError("response_format.json_schema is required when type is json_schema",
                                  param="response_format.json_schema")
        strict = strict_default if fmt.json_schema.strict is None else fmt.json_schema.strict
        return _parse({"type": "json_schema", "schema": fmt.json_schema.schema_, "strict": strict},
                      "response_format.json_schema")

    def _from_guided(self) -> list[Constraint | None]:
        import json

        kinds = {"json": ("json_schema", "schema"), "regex": ("regex", "pattern"), "choice": ("choice", "choices"),
                 "grammar": ("grammar", "grammar")}
        out: list[Constraint | None] = []
        for field, value in self._guided().items():
            kind, key = kinds[field.rsplit("_", 1)[-1].rsplit(".", 1)[-1]]
            if kind in ("regex", "grammar") and not value:
                continue  # an empty guided_regex has always meant no constraint
            if kind == "json_schema" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise ConstraintError(f"{field} is not valid JSON", param=field) from None
            out.append(_parse({"type": kind, key: value}, field))
        return out

    def top_logprobs_asked(self) -> int | None:
        return None

    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_new_tokens=self.max_completion_tokens or self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              seed=self.seed, stop=stops, logprobs=self.top_logprobs_asked(),
                              max_reasoning_tokens=self.max_reasoning_tokens, logit_bias=self.logit_bias,
                              **self.penalties())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _parse(data: dict[str, Any], param: str) -> Constraint:
    try:
        return build_constraint(data)
    except ConstraintError as error:
        detail = error.message.split(": ", 1)[-1]
        raise ConstraintError(f"{param}: {detail}", param=param, code=error.code) from None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; an answer makes at most one call
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's: e.g. {"enable_thinking": false}

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice needs tools")
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tools: two tools have the same function name")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def forced_tools(self) -> list[Tool] | None:
        if not self.tools:
            return None
        try:
            return tooling.forced_tools(self.tools, self.tool_choice)
        except ValueError as error:
            raise InvalidRequestError(f"tool_choice.function.name: {error}", param="tool_choice.function.name",
                                      code="unknown_tool") from None

    def auto_tools(self) -> list[Tool] | None:
        """The tools an answer may call (tool_choice "auto", the default with tools)."""
        return self.tools if self.tools and self.tool_choice in (None, "auto") else None

    def offered_tools(self) -> list[Tool]:
        """The tools the model is told about (none with tool_choice "none")."""
        return list(self.tools or []) if self.tool_choice != "none" else []

    def _tools_strict(self, forced: list[Tool], strict_default: bool) -> bool:
        """Exact unless every forced tool says strict: false (or leaves it out where the model's
        default is false)."""
        return any(strict_default if t.function.strict is None else t.function.strict for t in forced)

    def _from_tools(self, strict_default: bool) -> Constraint | None:
        forced = self.forced_tools()
        if not forced:
            return None
        return tooling.tool_constraint(forced, self._tools_strict(forced, strict_default))

    def tool_parameter_constraints(self, strict_default: bool = True,
                                   constrained_auto: bool = True) -> list[tuple[Constraint, str]]:
        """Each offered tool's parameters as a schema, with the field that names it: checked on
        their own first, so a refusal points into the tool, not into the combined schema. Under
        "auto" beside another constraint (response_format), or where the model's
        `tool_calls.constrained_auto` is false, no call is generated under them (the arguments are
        only validated): limits and meta-validation apply, a keyword no backend enforces does not."""
        forced = self.forced_tools() or (self.enforced_auto_tools() if constrained_auto else None)
        strict = self._tools_strict(forced, strict_default) if forced else False
        names = {t.function.name for t in forced} if forced else None
        out: list[tuple[Constraint, str]] = []
        for i, tool in enumerate(self.offered_tools()):
            if names is None or tool.function.name in names:
                field = f"tools.{i}.function.parameters"
                out.append((_parse({"type": "json_schema", "schema": tooling.parameters_of(tool), "strict": strict},
                                   field), field))
        return out

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def enforced_auto_tools(self) -> list[Tool] | None:
        """Under tool_choice "auto" with no other constraint: the tools a call the answer starts is
        generated under (engine/prelude.py)."""
        return self.auto_tools() if not self.constrained() else None

    def generation_requests(self, strict_default: bool = True) -> list[GenerationRequest]:
        offered = [t.model_dump(exclude_none=True) for t in self.offered_tools()]
        rows = _n_requests(self, {"messages": self.messages, "tools": offered or None,
                                  "chat_template_kwargs": self.chat_template_kwargs}, strict_default)
        auto = self.enforced_auto_tools()
        if not auto:
            return rows
        call: Constraint = tooling.tool_constraint(auto, self._tools_strict(auto, strict_default))
        if self.undeclared_properties is not None:
            call = call.model_copy(update={"undeclared_properties": self.undeclared_properties})
        return [row.model_copy(update={"constraint": call, "tool_call_auto": True}) for row in rows]


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # the legacy API's: top alternatives per token

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def generation_requests(self, strict_default: bool = True) -> list[GenerationRequest]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequestError("prompt: give one prompt (a string or a list of one)", param="prompt")
            prompt = prompt[0]
        return _n_requests(self, {"prompt": prompt}, strict_default)


def _n_requests(request: _OpenAIBase, inputs: dict[str, Any], strict_default: bool) -> list[GenerationRequest]:
    """n choices = n rows; with a seed, choice i uses seed + i (wrapping within the signed 64-bit
    range) so the choices differ."""
    constraint, sampling = request.constraint(strict_default), request.sampling()
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
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    stream: bool = False
    max_reasoning_tokens: Annotated[int, Field(ge=0)] | None = None
    logit_bias: LogitBias | None = None

    _stops = stops_validator()

    @model_validator(mode="after")
    def _one_input(self) -> NativeGenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def generation_requests(self, strict_default: bool = True) -> list[GenerationRequest]:
        return [self.generation_request()]

    def constraint_source(self) -> str | None:
        return None if self.constraint is None else f"constraint.{SOURCE_FIELD[self.constraint.type]}"

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt, messages=self.messages, constraint=self.constraint,
            sampling=SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                    top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                                    stop=self.stop, max_reasoning_tokens=self.max_reasoning_tokens,
                                    logit_bias=self.logit_bias, **self.penalties()))
