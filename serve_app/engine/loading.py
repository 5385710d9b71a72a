"""Loading a model where its placement plan says, with a CPU fallback on out-of-memory."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.config import ModelConfig
from serve_app.engine.placement import PlacementPlan, available_cpu_memory, plan_placement
from serve_app.errors import ModelLoadError
from serve_app.models import BUILTIN_PREFIX, prepare

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    path: str  # a local directory or a hub id
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    plan: PlacementPlan
    source: ModelSource
    fell_back: bool = False
    fallback_reason: str | None = None
    load_seconds: float = 0.0
    device_map: dict[str, Any] = field(default_factory=dict)
    gpu_plan: PlacementPlan | None = None  # the GPU plan that was given up for the CPU fallback


def resolve_source(model: ModelConfig) -> ModelSource:
    """`builtin:<name>` -> its prepared directory; `x.gguf` -> its folder + file name."""
    if model.source.startswith(BUILTIN_PREFIX):
        return ModelSource(str(prepare(model.source.removeprefix(BUILTIN_PREFIX))))
    path = Path(model.source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(str(path.parent), path.name)
    return ModelSource(str(path) if path.exists() else model.source, model.gguf_file)


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Fallback chain, as TGI does: eos, then unk, then bos; left padding is masked anyway.
        for candidate in ("eos_token", "unk_token", "bos_token"):
            if getattr(tokenizer, candidate) is not None:
                tokenizer.pad_token = getattr(tokenizer, candidate)
                break
    if tokenizer.pad_token_id is None:
        raise ModelLoadError("the tokenizer has no pad, eos, unk or bos token to pad with")
    return tokenizer


def apply_torch_threads(setting: int | str) -> int:
    """Size torch's intra-op thread pool for this replica: "auto" keeps what Ray gave the process
    (OMP_NUM_THREADS = its whole num_cpus), "all" takes every core this process may run on, a
    number is taken as is. Returns the thread count in effect."""
    import torch

    if setting == "all":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    elif isinstance(setting, int):
        torch.set_num_threads(setting)
    return int(torch.get_num_threads())


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _from_pretrained(source: ModelSource, plan: PlacementPlan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if plan.device == "cuda" and plan.memory_fraction is not None:
        index = next(iter(plan.max_memory or {0: 0}))
        torch.cuda.set_per_process_memory_fraction(plan.memory_fraction, int(index))
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        gguf_file=source.gguf_file,
        dtype=getattr(torch, plan.dtype),
        device_map=plan.device_map,
        max_memory=plan.max_memory,
    )
    return model.eval()


def move_to_cpu(loaded: LoadedModel, model_cfg: ModelConfig, reason: str) -> bool:
    """The CPU fallback after loading: strip accelerate's dispatch hooks, move the weights to CPU
    in the CPU plan's dtype, and record why. False when not allowed or already on CPU."""
    import torch

    if loaded.plan.device != "cuda" or not model_cfg.placement.cpu_fallback:
        return False
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(loaded.model, recurse=True)
    plan = _cpu_fallback_plan(model_cfg, loaded.model.config, reason)
    loaded.model.to(device="cpu", dtype=getattr(torch, plan.dtype))
    loaded.gpu_plan, loaded.plan = loaded.plan, plan
    loaded.fell_back, loaded.fallback_reason = True, reason
    loaded.device_map = {"": "cpu"}
    release_gpu_memory()
    logger.warning("%s moved to CPU: %s", model_cfg.name, reason)
    return True


def _cpu_fallback_plan(model_cfg: ModelConfig, hf_config: Any, reason: str) -> PlacementPlan:
    plan = plan_placement(model_cfg.model_copy(update={"placement": model_cfg.placement.model_copy(
        update={"gpus_per_replica": 0})}), [], hf_config, cpu_memory=available_cpu_memory())
    return plan.model_copy(update={"reason": f"CPU fallback: {reason}"})


def _gpu_unusable_reason(plan: PlacementPlan) -> str | None:
    import torch

    if plan.device != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"GPU ids {plan.gpu_ids} assigned but CUDA is not available in this process"
    if not plan.fits:
        return plan.reason
    return None


def load_model(model_cfg: ModelConfig, plan: PlacementPlan, source: ModelSource | None = None,
               hf_config: Any = None) -> LoadedModel:
    """Load per the plan. If the GPU plan cannot work (no CUDA, does not fit, OOM while loading)
    and `cpu_fallback` is on, load on CPU and record why."""
    source = source or resolve_source(model_cfg)
    started, planned = time.perf_counter(), plan
    tokenizer = load_tokenizer(source)
    fell_back, reason = False, _gpu_unusable_reason(plan)
    if reason is not None:
        if not model_cfg.placement.cpu_fallback:
            raise ModelLoadError(f"cannot load {model_cfg.name} on GPU: {reason}")
        plan, fell_back = _cpu_fallback_plan(model_cfg, hf_config, reason), True
    try:
        model = _from_pretrained(source, plan)
    except Exception as error:
        if plan.device != "cuda" or not is_out_of_memory(error) or not model_cfg.placement.cpu_fallback:
            raise
        reason = f"out of memory while loading on GPU: {error}"
        plan, fell_back = _cpu_fallback_plan(model_cfg, hf_config, reason), True
        release_gpu_memory()
        model = _from_pretrained(source, plan)
    device_map = dict(getattr(model, "hf_device_map", None) or {"": str(model.device)})
    loaded = LoadedModel(model, tokenizer, plan, source, fell_back, reason if fell_back else None,
                         time.perf_counter() - started, device_map, planned if fell_back else None)
    logger.info("loaded %s (%s) device_map=%s fell_back=%s", model_cfg.name, plan.dtype, device_map, fell_back)
    return loaded


def release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
