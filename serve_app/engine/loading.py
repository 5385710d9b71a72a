"""Loading a model where its placement plan says, with a CPU fallback on out-of-memory."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from serve_app.config import ModelConfig
from serve_app.engine.attention import use_packed_decode_attention
from serve_app.engine.placement import PlacementPlan, available_cpu_memory, plan_placement
from serve_app.engine.prepack import prepack_linears
from serve_app.errors import ModelLoadError
from serve_app.models import BUILTIN_PREFIX, prepare

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
# load_model runs in a thread of this name, and only there (its docstring says why).
LOADER_THREAD = "load-model"


@dataclass(frozen=True)
class ModelSource:
    path: str  # a local directory or a hub id
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None  # where the tokenizer comes from, if not `path`

    def options(self) -> dict[str, Any]:
        """What every from_pretrained of this source gets."""
        out: dict[str, Any] = {"gguf_file": self.gguf_file}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.trust_remote_code:
            out["trust_remote_code"] = True
        return out


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
    """`builtin:<name>` -> its prepared directory; `x.gguf` -> its folder + file name; with the
    loading section's revision, remote-code and tokenizer settings."""
    loading = model.loading
    if model.source.startswith(BUILTIN_PREFIX):
        path, gguf = str(prepare(model.source.removeprefix(BUILTIN_PREFIX))), None
    else:
        local = Path(model.source).expanduser()
        if local.suffix == ".gguf" and local.is_file():
            path, gguf = str(local.parent), local.name
        else:
            path, gguf = str(local) if local.exists() else model.source, model.gguf_file
    return ModelSource(path, gguf, loading.revision, loading.trust_remote_code, loading.tokenizer)


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.path, **source.options())


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Any:
    """The tokenizer, left-padded, with a pad token, and `chat_template` (a template or the path
    of a file holding one) in place of its own."""
    from transformers import AutoTokenizer

    if source.tokenizer is not None:
        options = {k: v for k, v in source.options().items() if k == "trust_remote_code"}
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer, **options)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.options())
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
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


def read_chat_template(value: str) -> str:
    """A template given inline, or the path of a file holding one (a value with no Jinja tag in
    it is taken for a path)."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"loading.chat_template: {value!r} is neither a Jinja template nor a file")
    return path.read_text()


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


def _from_pretrained(source: ModelSource, plan: PlacementPlan, model_cfg: ModelConfig | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if plan.device == "cuda" and plan.memory_fraction is not None:
        index = next(iter(plan.max_memory or {0: 0}))
        torch.cuda.set_per_process_memory_fraction(plan.memory_fraction, int(index))
    extra: dict[str, Any] = {}
    if model_cfg is not None:
        extra.update(model_cfg.loading.from_pretrained_kwargs)
        if model_cfg.loading.attn_implementation is not None:
            extra["attn_implementation"] = model_cfg.loading.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        **source.options(),
        dtype=getattr(torch, plan.dtype),
        device_map=plan.device_map,
        max_memory=plan.max_memory,
        **extra,
    )
    use_packed_decode_attention(model)  # the decode step without repeat_kv (engine/attention.py)
    if plan.device == "cpu" and (model_cfg is None or model_cfg.loading.prepack_weights):
        prepack_linears(model)  # oneDNN's layout once, not at every matmul (engine/prepack.py)
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
    and `cpu_fallback` is on, load on CPU and record why.

    Always in a thread of its own that ends with the load: a thread that has run torch's CPU
    kernels keeps an OpenMP thread team while it lives, and with more team threads than cores
    libgomp's threads stop spinning between parallel regions, so the decode loop's own team sleeps
    and wakes at every op. The main thread (in-process, 16 x 128 free tokens: 235 against 340
    tok/s) and a Ray replica's user-code thread (served: 243 against ~300) both outlive the load."""
    if threading.current_thread().name != LOADER_THREAD:
        return in_own_thread(load_model, model_cfg, plan, source, hf_config)
    source = source or resolve_source(model_cfg)
    started, planned = time.perf_counter(), plan
    tokenizer = load_tokenizer(source, model_cfg.loading.chat_template)
    fell_back, reason = False, _gpu_unusable_reason(plan)
    if reason is not None:
        if not model_cfg.placement.cpu_fallback:
            raise ModelLoadError(f"cannot load {model_cfg.name} on GPU: {reason}")
        plan, fell_back = _cpu_fallback_plan(model_cfg, hf_config, reason), True
    try:
        model = _from_pretrained(source, plan, model_cfg)
    except Exception as error:
        if plan.device != "cuda" or not is_out_of_memory(error) or not model_cfg.placement.cpu_fallback:
            raise
        reason = f"out of memory while loading on GPU: {error}"
        plan, fell_back = _cpu_fallback_plan(model_cfg, hf_config, reason), True
        release_gpu_memory()
        model = _from_pretrained(source, plan, model_cfg)
    device_map = dict(getattr(model, "hf_device_map", None) or {"": str(model.device)})
    loaded = LoadedModel(model, tokenizer, plan, source, fell_back, reason if fell_back else None,
                         time.perf_counter() - started, device_map, planned if fell_back else None)
    logger.info("loaded %s (%s) device_map=%s fell_back=%s", model_cfg.name, plan.dtype, device_map, fell_back)
    return loaded


def in_own_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` run in a thread of its own (named LOADER_THREAD) that ends with it, waited for;
    its exception raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    thread = threading.Thread(target=run, name=LOADER_THREAD, daemon=True)  # Ctrl-C while loading still exits
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a sequence: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
