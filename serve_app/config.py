"""Typed configuration: one root (`AppConfig`) validated by pydantic with ``extra="forbid"``,
so a typo in YAML is an error that names the field, never a silent default.

This module must stay light: the router imports it, and the router never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.constraints import BackendDefaults, Constraint, LimitsConfig, check_constraint
from serve_app.errors import ServeAppError
from serve_app.fields import (
    SAMPLING_FIELDS,
    FrequencyPenalty,
    MaxTokens,
    MinP,
    NgramSize,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
# Model config sections a `user_config` change applies in place (replicas take them in
# `reconfigure`: no restart, no reload). `limits` also travel in `args`, because the router
# checks requests against them; the others travel only in `user_config`.
RECONFIGURABLE = ("sampling", "limits", "constraints")
IN_PLACE_ONLY = frozenset(RECONFIGURABLE) - {"limits"}


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
    torch_threads: int | Literal["auto", "all"] = Field(
        "auto", description="torch threads in the replica: auto = num_cpus (as Ray sets OMP_NUM_THREADS), "
        "all = every core of the machine (one replica alone on it), or a number")

    @field_validator("torch_threads")
    @classmethod
    def _positive_threads(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, auto or all")
        return value

    @field_validator("gpus_per_replica")
    @classmethod
    def _fraction_or_whole(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError("must be 0, a fraction below 1, or a whole number of GPUs")
        return value


class SamplingDefaults(_Strict):
    """Applied when a request leaves a parameter out."""

    max_new_tokens: MaxTokens = Field(256, description="lowered with limits.max_new_tokens when not set")
    temperature: Temperature = Field(1.0, description="0 = greedy")
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="sample among the k most likely tokens; 0 or -1 = all")
    min_p: MinP = Field(0.0, description="drop tokens below min_p x the most likely token's probability")
    repetition_penalty: RepetitionPenalty = Field(1.0, description=">1 discourages tokens of the prompt and output")
    frequency_penalty: FrequencyPenalty = Field(0.0, description="OpenAI's: minus count x penalty, over the output")
    presence_penalty: PresencePenalty = Field(0.0, description="OpenAI's: minus penalty once a token appeared")
    no_repeat_ngram_size: NgramSize = Field(0, description=">0 forbids repeating an n-gram of the output")
    close_json: bool = Field(True, description="close JSON-Schema output before max_tokens runs out (the last "
                             "values may come out shorter)")

    def merged(self, request: Any) -> dict[str, Any]:
        """Each sampling field: the request's value where it gives one, else this default."""
        return {name: getattr(self, name) if getattr(request, name) is None else getattr(request, name)
                for name in SAMPLING_FIELDS}


# from_pretrained arguments the loading section or the placement plan sets: not to be passed twice.
RESERVED_LOAD_KWARGS = frozenset({"dtype", "torch_dtype", "device_map", "max_memory", "gguf_file", "revision",
                                  "trust_remote_code", "attn_implementation", "pretrained_model_name_or_path"})


class LoadingConfig(_Strict):
    """How the checkpoint and tokenizer are read (transformers' from_pretrained options)."""

    revision: str | None = Field(None, description="a branch, tag or commit of a hub source (or of its local cache)")
    trust_remote_code: bool = Field(False, description="run the checkpoint's own Python code (custom architectures); "
                                    "only for sources you trust")
    tokenizer: str | None = Field(None, description="load the tokenizer from here (hub id or directory) instead of "
                                  "the source")
    chat_template: str | None = Field(None, description="a Jinja chat template, or the path of a file holding one; "
                                      "replaces the tokenizer's. Without any, chat requests are a 400 (prompt works)")
    control_tokens_in_messages: bool = Field(
        False, description="false: a control token written in a message, a tool or a template kwarg "
        "(`<|im_start|>` in a user's text) is read as plain text, so no client can forge a turn; true: as the "
        "control token (what transformers' apply_chat_template and vLLM do)")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ... (default: "
                                            "transformers' choice)")
    prepack_weights: bool = Field(
        True, description="on CPU, reorder linear weights for oneDNN once at load (faster decode steps; the packed "
        "copies are anonymous memory the size of the weights); false keeps transformers' own layers")
    from_pretrained_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to the model's from_pretrained as they are (e.g. low_cpu_mem_usage, "
        "quantization_config); the keys above and those the placement plan sets are refused")

    @field_validator("from_pretrained_kwargs")
    @classmethod
    def _not_reserved(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(RESERVED_LOAD_KWARGS & kwargs.keys())
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the loading section or the placement plan, not here")
        return kwargs


class HealthConfig(_Strict):
    """What Serve's periodic health check tests besides a loaded model."""

    stuck_after_s: float = Field(
        300.0, gt=0, description="unhealthy (and replaced by Serve) when the decode loop has rows to run but has "
        "not finished a step for this long")


class VllmConfig(_Strict):
    """`engine: vllm` only: how vLLM's engine runs inside the replica (docs/engines.md)."""

    enforce_eager: bool = Field(True, description="no CUDA graphs / torch.compile: start-up in seconds, not "
                                "minutes; false for the last few percent of GPU throughput")
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + output vLLM plans its KV cache "
                                      "for (default: the model's context length)")
    cpu_kv_cache_gib: float = Field(2.0, gt=0, description="on CPU: memory for vLLM's KV cache "
                                    "(VLLM_CPU_KVCACHE_SPACE); vLLM's own default takes most of the RAM")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="on GPU: the share of each card vLLM may use (default: the replica's "
        "`gpus_per_replica` share when fractional, else 0.9)")


class ReasoningConfig(_Strict):
    """A reasoning section the model writes before its answer (`<think>...</think>`): its text is
    returned as reasoning_content, and a request's constraint applies only after the end marker."""

    enabled: Literal["auto"] | bool = Field(
        "auto", description="auto: on when the chat template names both markers (a chat request whose prompt "
        "already closed the section, e.g. enable_thinking: false, has none); true / false: always / never")
    start: str = Field("<think>", min_length=1, max_length=64, description="the marker that opens it (removed "
                       "from reasoning_content)")
    end: str = Field("</think>", min_length=1, max_length=64, description="the marker that ends it")
    max_tokens: int | None = Field(
        None, ge=0, description="the thinking budget: after this many tokens the end marker is forced (a request's "
        "max_reasoning_tokens overrides it); left out: as many as max_tokens leaves beside the answer's shortest "
        "valid output, so a constrained answer always fits")


class ToolCallConfig(_Strict):
    """How an answer under tool_choice "auto" starts a call (docs/api.md, tool calls)."""

    marker: str | None = Field(
        "auto", max_length=64, description="the text that starts a call (e.g. <tool_call>); the call after it is "
        "generated under the tools' schema. auto: <tool_call> when the chat template names it; null: a call is an "
        "answer that starts with `{`")
    constrained_auto: bool = Field(True, description="false: under tool_choice auto the model writes freely and a "
                                   "call is only validated afterwards")


class CacheConfig(_Strict):
    """Compiled constraints kept per replica (least recently used evicted first)."""

    max_entries: int = Field(512, ge=1, description="compiled constraints kept")
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="their estimated memory, at most")


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
        "(builtin:smollm2-135m-instruct, builtin:tiny-random-llama, builtin:tiny-thinking-llama)"
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `source`")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="what generates: the project's transformers decode loop (any HF causal LM, "
        "accelerate sharding, CPU; keywords checked while generating, closing) or vllm (its scheduler and kernels, "
        "tensor parallel over the replica's GPUs; needs the vllm extra)")
    vllm: VllmConfig = VllmConfig()
    dtype: Dtype = Field("auto", description="auto: bfloat16 on GPUs that compute it natively, float16 on older "
                         "ones; on CPU bfloat16 where it has native bf16 math (AVX-512 BF16, AMX, Arm BF16), else "
                         "float32")
    loading: LoadingConfig = LoadingConfig()
    placement: PlacementConfig = PlacementConfig()
    limits: LimitsConfig = LimitsConfig()
    sampling: SamplingDefaults = SamplingDefaults()
    backends: BackendDefaults = BackendDefaults()
    compile_cache: CacheConfig = CacheConfig()
    prefix_cache_bytes: int = Field(
        128 * 1024 * 1024, ge=0, description="KV cache of recent prompts kept on the model's device, so a prompt "
        "that starts like one of them is prefilled from where they differ (0 = off)")
    jump_forward: int = Field(
        8, ge=0, le=64, description="engine: transformers: tokens the grammar forces (keys, punctuation, enum "
        "tails) and the rest of closing's completion are appended without sampling, and up to this many of a "
        "row's tokens go through one forward pass (with compile_decode only where few rows are left, eagerly: "
        "a fuller batch takes the compiled one-token step; 0 = off: every token sampled)")
    compile_decode: bool = Field(
        False, description="engine: transformers, Llama-family models on CPU: the one-token decode step compiled "
        "with torch.compile (inductor, freezing) during warm-up, before the replica is ready (SmolLM2: about 1.5 "
        "minutes on 2 cores); eager where that fails. configs/local.yaml turns it on (docs/benchmarks.md)")
    health: HealthConfig = HealthConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    tool_calls: ToolCallConfig = ToolCallConfig()
    strict_by_default: bool = Field(
        True, description="a json_schema (or a tool) that leaves `strict` out is enforced exactly; false follows "
        "OpenAI's default (strict: false), where keywords no backend enforces are approximated and the output checked")
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


class LogConfig(_Strict):
    """Ray Serve's logging_config for the router and every model deployment: where replicas'
    log lines (ours included, under Serve's logger) go and how they look."""

    encoding: Literal["TEXT", "JSON"] = Field("TEXT", description="JSON: one object per line, with request ids")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    enable_access_log: bool = Field(True, description="Serve's per-request access lines")
    logs_dir: str | None = Field(None, description="default: the Ray session's logs/serve")

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ServerConfig(_Strict):
    """The router's HTTP guard rails, and logging for the whole app."""

    api_keys: list[str] = Field(default_factory=list, description="accepted bearer tokens (prefer the env var)")
    api_keys_env: str = Field("SERVE_APP_API_KEYS", description="env var with comma-separated keys")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="larger request bodies get 413 (counted as they arrive, chunked too)")
    max_json_depth: int = Field(
        128, ge=8, description="nesting of arrays and objects in a request body (and in guided_json as a string)")
    router_num_cpus: float = Field(0.25, gt=0, description="CPUs Ray reserves for the router (the HTTP ingress)")
    router_replicas: int = Field(1, ge=1, le=64, description="router replicas (Serve's proxy spreads requests over "
                                 "them); every model's queue bound applies per router")
    router_max_ongoing_requests: int = Field(
        1000, ge=1, description="requests one router handles at once (each model's queue bounds its own share)")
    replica_attempts: int = Field(
        2, ge=1, le=5, description="tries of a request whose replica dies under it, each on another replica")
    logging: LogConfig = LogConfig()


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
    if isinstance(data, dict):
        data = first_application(data).get("args", {})
    try:
        return AppConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: a Ray Serve config (`applications:`) or our `models:` file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping (a Ray Serve config or `models:`)")
    return data


def first_application(data: dict[str, Any]) -> dict[str, Any]:
    """A Ray Serve config's first application, or a bare `models:` file as one (its `args`)."""
    if "applications" in data:
        return dict(data["applications"][0])
    return {"args": data}


def load_config(path: str | Path) -> AppConfig:
    return parse_config(read_yaml(path))


def config_reference() -> str:
    """Every config field with its default and description, as commented YAML: the reference in
    docs/operations.md is this text (a test keeps them equal)."""
    lines = ["server:", *_fields(ServerConfig, 1), "models:"]
    model_lines = _fields(ModelConfig, 2)
    model_lines[0] = "  - " + model_lines[0].lstrip()
    return "\n".join(lines + model_lines) + "\n"


def _fields(model: type[BaseModel], depth: int) -> list[str]:
    indent, lines = "  " * depth, []
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{indent}{key}:" + (f"  # {field.description}" if field.description else ""))
            lines += _fields(annotation, depth + 1)
            continue
        value = "<required>" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"{indent}{key}: {value}{note}")
    return lines
