"""The transformers engine (the default): any Hugging Face causal LM, loaded where the
placement plan puts it (CPU, a GPU share, or sharded with accelerate), a compile cache, and the
project's own continuous-batching decode loop.

    with create_engine(model_config) as engine:   # serve_app.engine.factory
        [result] = engine.generate([GenerationRequest(messages=[...], constraint=...)])

It knows nothing about Ray; replicas and benchmarks use it the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from serve_app.config import ModelConfig
from serve_app.constraints import ChoiceConstraint, installed_backends
from serve_app.engine.compiled_step import CompiledStep, unsupported_reason
from serve_app.engine.compiler import CompilingFront, ConstraintCompiler
from serve_app.engine.decode import DecodeLoop
from serve_app.engine.loading import (
    LoadedModel,
    apply_torch_threads,
    eos_ids,
    in_own_thread,
    load_hf_config,
    load_model,
    move_to_cpu,
    resolve_source,
)
from serve_app.engine.memory import gpu_memory
from serve_app.engine.placement import GpuInfo, available_cpu_memory, plan_placement
from serve_app.engine.requests import Notify, PreparedRow
from serve_app.engine.stream import Stream
from serve_app.generation import GenerationRequest, SamplingParams
from serve_app.status import CheckTotals, GpuMemory, QueueStatus, ReplicaStatus

logger = logging.getLogger(__name__)


class TransformersEngine(CompilingFront):
    def __init__(self, config: ModelConfig, loaded: LoadedModel) -> None:
        super().__init__(config)
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.installed = installed_backends()
        self.compiler = ConstraintCompiler(self.model, self.tokenizer, config.limits)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.loop = DecodeLoop(self.model, self._decode, self.tokenizer.pad_token_id, self.eos_ids,
                               self.compiler.vocab_size, lambda: max(1, self.loaded.plan.max_batch_size),
                               prefix_cache_bytes=config.prefix_cache_bytes, jump_forward=config.jump_forward,
                               compiled=compiled_step(config, self.model))
        self.loop.on_oom = lambda: move_to_cpu(self.loaded, self.config, "out of memory during generation")

    @classmethod
    def from_config(cls, config: ModelConfig, gpus: Sequence[GpuInfo] = ()) -> TransformersEngine:
        """Plan for `gpus` (none = CPU), load, warm up and precompile the named constraints."""
        apply_torch_threads(config.placement.torch_threads)
        source = resolve_source(config)
        hf_config = load_hf_config(source)
        plan = plan_placement(config, gpus, hf_config, cpu_memory=available_cpu_memory())
        engine = cls(config, load_model(config, plan, source, hf_config))
        engine.warmup()
        engine.precompile(config.constraints.values())
        return engine

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        if self.model is None:
            raise RuntimeError("model is not loaded")
        stalled, limit = self.loop.stalled_for(), self.config.health.stuck_after_s
        if stalled > limit:
            waiting, running = self.loop.queue_depth()
            message = (f"the decode loop is stuck: {waiting} rows waiting and {running} running, no step for "
                       f"{stalled:.0f} s (health.stuck_after_s {limit:g})")
            logger.error(message)
            raise RuntimeError(message)

    def close(self) -> None:
        """Stop the decode thread (rows not finished get a 503 error) and the compile threads. Idempotent."""
        self.loop.close()
        self.compiler.close()

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def reconfigure(self, config: ModelConfig) -> None:
        """Swap sampling defaults, limits and the registry; the model and cache stay."""
        if config.name != self.config.name or config.source != self.config.source:
            raise ValueError("a different model or source needs new replicas, not a reconfigure")
        self.config = config
        self.compiler.limits = config.limits
        self.forget_refusals()

    # -- constraints ---------------------------------------------------------------------------

    def warmup(self) -> None:
        """Pay one-off costs (tokenizer conversion for the backend, first forward) at load."""
        started = time.perf_counter()
        self._compile_decode_step()
        probe = GenerationRequest(prompt="ok", constraint=ChoiceConstraint(choices=["yes", "no"]),
                                  sampling=SamplingParams(max_new_tokens=8))
        self.generate([probe])
        logger.info("warmup took %.2f s", time.perf_counter() - started)

    def _compile_decode_step(self) -> None:
        """Compile the decode step's graphs now (compile_decode), in a thread that ends with it (no
        OpenMP team left beside the decode loop's, loading.py); where that fails, decode eagerly."""
        compiled = self.loop.compiled
        if compiled is None:
            return
        try:
            in_own_thread(compiled.warm_up)
        except Exception:  # noqa: BLE001 - eager decoding is as exact, only slower
            logger.warning("compile_decode: compiling the decode step failed; it stays eager", exc_info=True)
            self.loop.compiled = None

    # -- generation ----------------------------------------------------------------------------

    def run(self, prepared: PreparedRow, notify: Notify | None, deltas: bool) -> Stream:
        """Queue a row for the decode loop; it joins the running batch between steps."""
        return self.loop.submit(Stream(prepared.row, notify, deltas))

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) requests in the decode loop."""
        return self.loop.queue_depth()

    def _decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # -- status --------------------------------------------------------------------------------

    def status(self) -> ReplicaStatus:
        loaded, loop = self.loaded, self.loop
        waiting, running = self.queue_depth()
        return ReplicaStatus(
            model=self.config.name, engine="transformers", plan=loaded.plan.summary(),
            gpu_plan=loaded.gpu_plan.summary() if loaded.gpu_plan else None,
            device_map={k: str(v) for k, v in loaded.device_map.items()}, dtype=loaded.plan.dtype,
            torch_threads=torch_threads(), max_batch_size=loop.capacity(), fell_back_to_cpu=loaded.fell_back,
            fallback_reason=loaded.fallback_reason, load_seconds=round(loaded.load_seconds, 3),
            compile_cache=self.cache_status(), queue=QueueStatus(waiting=waiting, running=running),
            finished=dict(loop.finished), closed_early=loop.closed_early, forced_tokens=loop.forced_tokens,
            checks=CheckTotals(**loop.checks),
            decode_steps=loop.steps, prefills=loop.prefills, admitted_without_prefill=loop.folded,
            decode_compiles=loop.compiled.compiles if loop.compiled else None,
            decode_compile_seconds=round(loop.compiled.compile_seconds, 3) if loop.compiled else None,
            mean_batch_size=round(loop.rows_stepped / loop.steps, 2) if loop.steps else None,
            prefix_cache=loop.prefixes.stats() if loop.prefixes is not None else None,
            out_of_memory=dict(loop.oom_events), gpu_memory=GpuMemory.model_validate(gpu_memory()))


def compiled_step(config: ModelConfig, model: object) -> CompiledStep | None:
    """The compiled decode step where `compile_decode` asks for it and the model has Llama's layers."""
    if not config.compile_decode:
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        logger.warning("compile_decode: the decode step stays eager: %s", reason)
        return None
    return CompiledStep(model)


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
