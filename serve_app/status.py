"""What a replica reports about itself: its engine's `status()`, stamped by the replica with who
it is, sent with each heartbeat to the registry, and read back typed by `/v1/replicas`,
`/metrics` and `serve-app status`. Pydantic, no torch: both sides import it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class _Status(BaseModel):
    # Unknown keys are ignored: during a rollout, replicas of two versions report side by side.
    model_config = {"extra": "ignore"}


class QueueStatus(_Status):
    waiting: int = 0
    running: int = 0


class CacheStatus(_Status):
    """The compile cache (or, for engine: vllm, the plan cache): counters from serve_app.cache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    compile_seconds: float = 0.0
    failures_cached: int = 0
    failure_hits: int = 0


class CheckTotals(_Status):
    """Keywords checked while generating, summed over the replica's rows."""

    evaluated: int = 0
    violations: int = 0
    rollbacks: int = 0
    exhausted: int = 0


class GpuDevice(_Status):
    device: int
    allocated_bytes: int
    reserved_bytes: int
    max_allocated_bytes: int = 0
    total_bytes: int


class GpuMemory(_Status):
    devices: list[GpuDevice] = Field(default_factory=list)
    reason: str | None = None  # why there are no readings (no CUDA device in this process)


class ReplicaStatus(_Status):
    model: str
    engine: Literal["transformers", "vllm"] = "transformers"
    plan: dict[str, Any] = Field(default_factory=dict)  # the placement plan (device, dtype, reason, ...)
    gpu_plan: dict[str, Any] | None = None  # the GPU plan a CPU fallback replaced
    device_map: dict[str, str] = Field(default_factory=dict)
    dtype: str = ""
    torch_threads: int | None = None
    max_batch_size: int | None = None
    fell_back_to_cpu: bool = False
    fallback_reason: str | None = None
    load_seconds: float = 0.0
    compile_cache: CacheStatus = CacheStatus()
    queue: QueueStatus = QueueStatus()
    finished: dict[str, int] = Field(default_factory=dict)  # rows by finish reason
    closed_early: int = 0
    forced_tokens: int = 0  # appended by jump-forward (engine: transformers), not sampled
    checks: CheckTotals = CheckTotals()
    decode_steps: int = 0
    # compile_decode: graphs compiled (the same after warm-up unless a step recompiled) and their seconds
    decode_compiles: int | None = None
    decode_compile_seconds: float | None = None
    mean_batch_size: float | None = None
    prefills: int = 0
    admitted_without_prefill: int = 0  # rows whose prompt the prefix cache held all but a few tokens of
    prefix_cache: dict[str, int] | None = None
    out_of_memory: dict[str, int] = Field(default_factory=dict)
    gpu_memory: GpuMemory = GpuMemory()
    tensor_parallel: int | None = None  # engine: vllm
    max_model_len: int | None = None  # engine: vllm
    vllm: dict[str, float] | None = None  # vLLM's own gauges (queue, KV cache, prefix cache)
    # Stamped by the replica (serve_app/replica.py) and the registry.
    replica_id: str = ""
    app: str = ""
    assigned_gpu_ids: list[str] = Field(default_factory=list)
    rss_bytes: int = 0  # the replica process's resident memory
    version: str = ""
    config_hash: str = ""
    last_seen: float | None = None


def read_statuses(reported: list[dict[str, Any]]) -> list[ReplicaStatus]:
    """The registry's heartbeats, typed."""
    return [ReplicaStatus.model_validate(entry) for entry in reported]
