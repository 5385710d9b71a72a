"""Typed configuration: one root (`AppConfig`) validated by pydantic with ``extra="forbid"``,
so a typo in YAML is an error that names the field, never a silent default.

This module must stay light: the router imports it, and the router never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.engine.constraints import Constraint, check_constraint
from serve_app.errors import ServeAppError

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
BackendName = Literal["llguidance", "outlines_core", "xgrammar"]


class ConfigError(ValueError):
    """A configuration file or object is invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlacementConfig(_Strict):
    """Where one replica of a model runs."""

    gpus_per_replica: float = Field(
        0, ge=0, description="0 = CPU; 0 < x < 1 = a fraction of one GPU; an integer >= 1 = that many GPUs"
    )
    cpu_fallback: bool = Field(True, description="load on CPU when the GPU plan does not fit or OOMs")
    memory_headroom: float = Field(
        0.05, ge=0, lt=0.9, description="share of the replica's GPU memory kept free (allocator, spikes)"
    )
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves for the replica")

    @field_validator("gpus_per_replica")
    @classmethod
    def _fraction_or_whole(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError("must be 0, a fraction below 1, or a whole number of GPUs")
        return value


class LimitsConfig(_Strict):
    max_new_tokens: int = Field(512, ge=1, description="upper bound a request may ask for")
    max_prompt_tokens: int = Field(4096, ge=1)
    max_batch_size: int = Field(8, ge=1, description="rows generated together (also capped by memory)")
    # Real-world schemas (Kubernetes CRDs, SchemaStore files) reach 72-157 KB; the router checks
    # sizes before anything parses a schema, off its event loop.
    max_schema_bytes: int = Field(512 * 1024, ge=16)
    max_schema_depth: int = Field(32, ge=1, description="nesting of subschemas")
    max_ref_expansion: int = Field(
        10_000, ge=1, description="subschemas after inlining local $refs (recursion counted once)")
    max_regex_length: int = Field(4096, ge=1)
    max_grammar_bytes: int = Field(64 * 1024, ge=16)
    max_group_depth: int = Field(
        64, ge=1, description="nesting of groups in a regex or schema pattern, of brackets in a grammar "
        "(their parsers recurse; deeper input would exhaust the stack)")
    max_choices: int = Field(1024, ge=1)
    max_choice_bytes: int = Field(64 * 1024, ge=1, description="all choices together, in UTF-8 bytes")
    compile_timeout_s: float = Field(30.0, gt=0)
    max_pending_requests: int = Field(
        256, ge=1, description="requests accepted and not finished per model; more get 429 + Retry-After")


class SamplingDefaults(_Strict):
    """Applied when a request leaves a parameter out."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    no_repeat_ngram_size: int = Field(0, ge=0, le=32)
    # Close JSON-Schema output before max_tokens runs out (the last values may come out shorter).
    close_json: bool = True


_CASCADE: tuple[BackendName, ...] = ("llguidance", "xgrammar", "outlines_core")


class BackendDefaults(_Strict):
    """Which Outlines backend compiles each constraint kind. llguidance is the default for every
    kind: on SmolLM2's 49k vocab it prepares a JSON schema in ~2 ms against outlines_core's
    ~170 ms, and it errors on keywords it cannot enforce instead of ignoring them."""

    # "cascade": the first backend of `cascade` that enforces the schema exactly (README,
    # "JSON Schema coverage"); or one backend for every schema.
    json_schema: BackendName | Literal["cascade"] = "cascade"
    cascade: list[BackendName] = Field(default_factory=lambda: list(_CASCADE), min_length=1)
    regex: BackendName = "llguidance"
    choice: BackendName = "llguidance"
    grammar: BackendName = "llguidance"


class CacheConfig(_Strict):
    max_entries: int = Field(512, ge=1)
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)


class AutoscalingConfig(_Strict):
    """Queue-depth autoscaling (see serve_app/autoscaling.py for the formula). min == max gives a
    fixed replica count and no autoscaler."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_queue_depth: float = Field(
        4.0, gt=0, description="rows waiting or running per replica to aim for (about max_batch_size / 2)")
    upscale_delay_s: float = Field(5.0, ge=0, description="how long the signal must ask for more")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long it must ask for fewer")
    smoothing: float = Field(0.5, gt=0, le=1, description="EMA weight of the newest queue-depth sample")
    look_back_period_s: float = Field(10.0, gt=0, description="window Serve averages replica metrics over")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report their queue")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    source: str = Field(
        description="local directory, hub id, a .gguf file, or builtin:<name> "
        "(builtin:smollm2-135m-instruct, builtin:tiny-random-llama)"
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `source`")
    dtype: Dtype = "auto"
    placement: PlacementConfig = PlacementConfig()
    limits: LimitsConfig = LimitsConfig()
    sampling: SamplingDefaults = SamplingDefaults()
    backends: BackendDefaults = BackendDefaults()
    compile_cache: CacheConfig = CacheConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    constraints: dict[str, Constraint] = Field(
        default_factory=dict, description="named constraints compiled before the replica is ready"
    )
    version: str = Field("1", description="bump to roll replicas (code or model changes) gradually")
    graceful_shutdown_timeout_s: float = Field(
        60.0, gt=0, description="how long a replica being replaced may finish in-flight requests")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelConfig:
        limit = self.limits.max_new_tokens
        if "max_new_tokens" not in self.sampling.model_fields_set and self.sampling.max_new_tokens > limit:
            # Lowering the limit alone lowers the default with it.
            object.__setattr__(self, "sampling", self.sampling.model_copy(update={"max_new_tokens": limit}))
        if self.sampling.max_new_tokens > limit:
            raise ValueError(
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) exceeds "
                f"limits.max_new_tokens ({self.limits.max_new_tokens})"
            )
        return self

    @model_validator(mode="after")
    def _named_constraints_valid(self) -> ModelConfig:
        """The registry passes the same checks, against this model's limits, as a request's."""
        for name, constraint in self.constraints.items():
            try:
                check_constraint(constraint, self.limits)
            except ServeAppError as error:
                raise ValueError(f"constraints.{name}: {error.message}") from None
        return self


class ServerConfig(_Strict):
    """The router's HTTP guard rails."""

    api_keys: list[str] = Field(default_factory=list, description="accepted bearer tokens (prefer the env var)")
    api_keys_env: str = Field("SERVE_APP_API_KEYS", description="env var with comma-separated keys")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="larger request bodies get 413 (counted as they arrive, chunked too)")
    max_json_depth: int = Field(
        128, ge=8, description="nesting of arrays and objects in a request body (and in guided_json as a string)")


class AppConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    server: ServerConfig = ServerConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return models

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``models.0.dtype: Input should be 'auto', ... (got 'fp8')``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = "" if item["type"] == "missing" else f" (got {item.get('input')!r})"
        lines.append(f"{where}: {item['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_config(data: Any) -> AppConfig:
    """Validate a mapping; a Ray Serve config file is accepted too (its first application's args)."""
    if isinstance(data, dict) and "applications" in data:
        data = data["applications"][0].get("args", {})
    try:
        return AppConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: str | Path) -> AppConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    return parse_config(data)
