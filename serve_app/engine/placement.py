"""Placement plans: what is loaded where, decided before anything is loaded.

`plan_placement` is a pure function of the model's config and the GPUs a replica can see, so it
is tested without any GPU. `infer_device_map` runs accelerate's own device-map inference on a
meta-initialised model, the way `from_pretrained(device_map="auto")` will, so plan and reality
agree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from serve_app.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BF16_MIN_CAPABILITY = (8, 0)  # Ampere and newer compute bf16 natively; T4 (7.5) does not.
# CPU features (as /proc/cpuinfo names them) with native bf16 matrix math: AVX-512 BF16 (Intel
# Cooper Lake and newer, AMD Zen 4 and newer), AMX (Intel Sapphire Rapids), Arm's BF16 extension.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
GIB = 1024**3
# Share of the machine's available memory a CPU replica plans its batch against.
CPU_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class GpuInfo:
    """A GPU as this process sees it."""

    id: str  # the id Ray assigned (an entry of CUDA_VISIBLE_DEVICES)
    index: int  # the local CUDA ordinal inside this process
    total_bytes: int
    compute_capability: tuple[int, int]
    name: str = ""


class PlacementPlan(BaseModel):
    device: Literal["cpu", "cuda"]
    gpu_ids: list[str]
    dtype: Literal["float32", "float16", "bfloat16"]
    device_map: str | dict[str, int | str] | None
    max_memory: dict[int | str, int] | None
    memory_fraction: float | None  # torch.cuda.set_per_process_memory_fraction for a GPU share
    budget_bytes: int  # usable bytes over all the replica's GPUs (on CPU: the memory planned for, 0 = unplanned)
    weight_bytes: int | None
    kv_bytes_per_token: int | None
    max_batch_size: int
    fits: bool
    reason: str

    def summary(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: `flags` on x86, `Features` on Arm); empty
    where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_dtype(requested: str, gpus: Sequence[GpuInfo],
                 cpu_features: frozenset[str] | None = None) -> Literal["float32", "float16", "bfloat16"]:
    """bf16 where every card computes it natively, fp16 on older cards; on CPU, bf16 where the
    CPU has native bf16 math (measured 1.7x fp32's tokens/s on an AVX-512 BF16 CPU), else fp32."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if not gpus:
        features = cpu_flags() if cpu_features is None else cpu_features
        return "bfloat16" if features & CPU_BF16_FLAGS else "float32"
    if all(gpu.compute_capability >= BF16_MIN_CAPABILITY for gpu in gpus):
        return "bfloat16"
    return "float16"


def count_parameters(hf_config: PretrainedConfig) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory)."""
    return sum(p.numel() for p in meta_model(hf_config).parameters())


def meta_model(hf_config: PretrainedConfig) -> Any:
    """The model a config describes on the meta device: its shapes and config, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # A config with an auto_map came from the checkpoint's own code, which loading trusted already.
    remote = {"trust_remote_code": True} if getattr(hf_config, "auto_map", None) else {}
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(hf_config, **remote)


def quantized_bits(hf_config: PretrainedConfig) -> float | None:
    """Bits per weight of a pre-quantised checkpoint (GPTQ, AWQ, bitsandbytes, FP8, ...), read
    from its config's quantization_config; None when it is not quantised."""
    found: Any = getattr(hf_config, "quantization_config", None)
    if callable(getattr(found, "to_dict", None)):
        found = found.to_dict()
    if not isinstance(found, dict):
        return None
    if found.get("load_in_4bit"):
        return 4.0
    if found.get("load_in_8bit"):
        return 8.0
    for key in ("bits", "w_bit", "weight_bits", "nbits"):
        if isinstance(found.get(key), int | float) and not isinstance(found.get(key), bool):
            return float(found[key])
    if "fp8" in str(found.get("quant_method", "")).lower():
        return 8.0
    return None


def weight_bytes(hf_config: PretrainedConfig, dtype: str) -> int:
    """Bytes of the weights in memory: parameters x the dtype's size, or for a pre-quantised
    checkpoint its bits per weight (embeddings and the output head stay in `dtype`)."""
    params = count_parameters(hf_config)
    bits = quantized_bits(hf_config)
    if bits is None:
        return params * DTYPE_BYTES[dtype]
    vocab, hidden = int(getattr(hf_config, "vocab_size", 0) or 0), int(getattr(hf_config, "hidden_size", 0) or 0)
    embeddings = min(params, vocab * hidden * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2))
    return embeddings * DTYPE_BYTES[dtype] + math.ceil((params - embeddings) * bits / 8)


def kv_bytes_per_token(hf_config: PretrainedConfig, dtype: str) -> int:
    """Key + value cache bytes one token costs across all layers."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def _gpu_budgets(model: ModelConfig, gpus: Sequence[GpuInfo]) -> dict[int | str, int]:
    share = model.placement.gpus_per_replica
    keep = 1.0 - model.placement.memory_headroom
    per_gpu = min(share, 1.0) * keep
    return {gpu.index: int(gpu.total_bytes * per_gpu) for gpu in gpus}


def _batch_cap(model: ModelConfig, free_bytes: int | None, kv_per_token: int | None, vocab: int) -> int:
    limit = model.limits.max_batch_size
    if free_bytes is None or kv_per_token is None:
        return limit
    tokens = model.limits.max_prompt_tokens + model.limits.max_new_tokens
    # Per row: its KV cache at full length plus float32 logits for the last position. The prefix
    # cache of recent prompts (our decode loop's) lives beside the rows, on the same device.
    per_row = kv_per_token * tokens + vocab * 4
    prefixes = model.prefix_cache_bytes if model.engine == "transformers" else 0
    return max(0, min(limit, (free_bytes - prefixes) // per_row))


def available_cpu_memory() -> int | None:
    """Bytes of memory the machine has available now (psutil), None where unknown."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cpu_plan(model: ModelConfig, hf_config: PretrainedConfig | None, reason: str,
              cpu_memory: int | None = None, cpu_features: frozenset[str] | None = None) -> PlacementPlan:
    dtype = choose_dtype(model.dtype, [], cpu_features)
    weights = weight_bytes(hf_config, dtype) if hf_config is not None else None
    kv = kv_bytes_per_token(hf_config, dtype) if hf_config is not None else None
    vocab = getattr(hf_config, "vocab_size", 0) or 0
    budget = int(cpu_memory * CPU_MEMORY_SHARE) if cpu_memory is not None else 0
    free = budget - weights if cpu_memory is not None and weights is not None else None
    cap = max(1, _batch_cap(model, free, kv, vocab))  # on CPU the model is loaded anyway: at least 1 row
    memory = f", {budget / GIB:.1f} GiB of memory planned for (batch cap {cap})" if free is not None else ""
    return PlacementPlan(
        device="cpu", gpu_ids=[], dtype=dtype, device_map=None, max_memory=None,
        memory_fraction=None, budget_bytes=budget, weight_bytes=weights, kv_bytes_per_token=kv,
        max_batch_size=cap, fits=True, reason=f"{reason} ({dtype}{memory})",
    )


def plan_placement(
    model: ModelConfig, gpus: Sequence[GpuInfo], hf_config: PretrainedConfig | None = None,
    cpu_memory: int | None = None, cpu_features: frozenset[str] | None = None,
) -> PlacementPlan:
    """Decide dtype, device map, memory budgets and the batch-size cap for one replica.

    `gpus` are the GPUs the replica was given (empty = CPU). A fraction of a GPU becomes a
    single-device map with a per-process memory fraction; N GPUs become ``device_map="auto"``
    balanced over exactly those N. On CPU, `cpu_memory` (bytes available; None = not planned)
    caps the batch and `cpu_features` (None = read this CPU's) decides the dtype.
    """
    share = model.placement.gpus_per_replica
    if share == 0 or not gpus:
        reason = "configured for CPU" if share == 0 else "no GPU visible to this replica"
        return _cpu_plan(model, hf_config, reason, cpu_memory, cpu_features)
    used = list(gpus)[: max(1, int(share))]
    dtype = choose_dtype(model.dtype, used)
    budgets = _gpu_budgets(model, used)
    budget = sum(budgets.values())
    weights = weight_bytes(hf_config, dtype) if hf_config is not None else None
    kv = kv_bytes_per_token(hf_config, dtype) if hf_config is not None else None
    vocab = getattr(hf_config, "vocab_size", 0) or 0
    free = budget - weights if weights is not None else None
    cap = _batch_cap(model, free, kv, vocab)
    fits = (free is None or free > 0) and cap >= 1
    device_map: str | dict[str, int | str] = "auto" if len(used) > 1 else {"": used[0].index}
    portion = f"{share:g} of GPU {used[0].id}" if share < 1 else f"GPUs {','.join(g.id for g in used)}"
    verdict = "fits" if fits else "does not fit"
    return PlacementPlan(
        device="cuda", gpu_ids=[g.id for g in used], dtype=dtype, device_map=device_map,
        max_memory=budgets, memory_fraction=share if share < 1 else None, budget_bytes=budget,
        weight_bytes=weights, kv_bytes_per_token=kv, max_batch_size=cap, fits=fits,
        reason=f"{portion}, {budget / GIB:.1f} GiB budget: {verdict}",
    )


def infer_device_map(hf_config: PretrainedConfig, plan: PlacementPlan) -> dict[str, int | str]:
    """The module -> device map `from_pretrained(device_map=plan.device_map)` will produce."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoModelForCausalLM

    if not isinstance(plan.device_map, str):
        return dict(plan.device_map or {"": "cpu"})
    dtype = getattr(torch, plan.dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    no_split = model._no_split_modules or []
    assert plan.max_memory is not None
    # Like from_pretrained with several GPUs: balance first, or everything lands on GPU 0.
    balanced = get_balanced_memory(model, max_memory=dict(plan.max_memory),
                                   no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)


def visible_gpu_ids() -> list[str]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [part.strip() for part in value.split(",") if part.strip()]


def detect_gpus(assigned_ids: Sequence[str] | None = None, assumed_bytes: int = 0) -> list[GpuInfo]:
    """The GPUs this process can use. With CUDA, read each card; without it, the ids Ray
    assigned become logical GPUs of `assumed_bytes` (loading them will fall back to CPU)."""
    import torch

    ids = list(assigned_ids) if assigned_ids is not None else visible_gpu_ids()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = ids if len(ids) == count else [str(i) for i in range(count)]
        return [_read_gpu(i, names[i]) for i in range(count)]
    return [GpuInfo(id=str(gid), index=i, total_bytes=assumed_bytes, compute_capability=(0, 0), name="logical")
            for i, gid in enumerate(ids)]


def _read_gpu(index: int, gpu_id: str) -> GpuInfo:
    import torch

    props = torch.cuda.get_device_properties(index)
    return GpuInfo(id=gpu_id, index=index, total_bytes=props.total_memory,
                   compute_capability=(props.major, props.minor), name=props.name)

