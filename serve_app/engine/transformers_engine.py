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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.config import ModelConfig
from serve_app.constraints import (
    AnyConstraint,
    ChoiceConstraint,
    Plan,
    check_max_new_tokens,
    installed_backends,
    plan_constraint,
)
from serve_app.constraints.checks import RowChecker
from serve_app.constraints.plan import backend_order
from serve_app.engine.cache import CompileCache
from serve_app.engine.chat import render_chat
from serve_app.engine.closing import RowCloser
from serve_app.engine.compiler import CompiledConstraint, ConstraintCompiler
from serve_app.engine.decode import DecodeLoop, Row, RowOutput, Stream
from serve_app.engine.loading import (
    LoadedModel,
    apply_torch_threads,
    load_hf_config,
    load_model,
    move_to_cpu,
    resolve_source,
)
from serve_app.engine.memory import gpu_memory
from serve_app.engine.placement import GpuInfo, available_cpu_memory, plan_placement
from serve_app.errors import ConstraintError, InvalidRequestError, LimitExceededError, ServeAppError
from serve_app.generation import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenLogprob,
    TokenLogprobs,
    Usage,
)

logger = logging.getLogger(__name__)
MAX_CACHED_FAILURES = 1024
# Failures that say how long compiling took, not what the constraint is (a busy machine, or a
# compile that finishes in the background): never cached, or one slow moment would refuse a
# popular schema until restart.
TRANSIENT_FAILURES = frozenset({"compile_timeout_s"})
# A logprob of -inf (a token the constraint forbade) is not JSON; OpenAI reports -9999.0.
MIN_LOGPROB = -9999.0


@dataclass
class Submission:
    request: GenerationRequest
    stream: Stream
    backend: str | None
    approximated: tuple[str, ...] = ()
    rewrites: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()  # keywords checked while generating ("keyword at #pointer")


class TransformersEngine:
    def __init__(self, config: ModelConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.installed = installed_backends()
        self.compiler = ConstraintCompiler(self.model, self.tokenizer, config.limits)
        self.cache = CompileCache(config.compile_cache.max_entries, config.compile_cache.max_bytes)
        self.failures: OrderedDict[str, ServeAppError] = OrderedDict()  # constraints that did not compile
        self.failed_hits = 0
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.loop = DecodeLoop(self.model, self._decode, self.tokenizer.pad_token_id, self.eos_ids,
                               self.compiler.vocab_size, lambda: max(1, self.loaded.plan.max_batch_size),
                               prefix_cache_bytes=config.prefix_cache_bytes)
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
        """Stop the decode thread; rows not finished get a 503 error. Idempotent."""
        self.loop.close()

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- constraints ---------------------------------------------------------------------------

    def plan(self, constraint: AnyConstraint) -> Plan:
        """The same plan the router made (serve_app/constraints/plan.py), for this model."""
        return plan_constraint(constraint, self.config.limits, self.config.backends, self.installed)

    def compile(self, constraint: AnyConstraint) -> CompiledConstraint:
        """Cached, failures included: a repeated bad schema is rejected without compiling again.
        The key is the plan's, known before planning (planning a large schema is not free)."""
        key = f"{'|'.join(backend_order(constraint, self.config.backends, self.installed))}|{constraint.cache_key()}"
        failed = self.failures.get(key)
        if failed is not None:
            self.failures.move_to_end(key)
            self.failed_hits += 1
            raise failed
        try:
            return self.cache.get_or_compile(key, lambda: self.compiler.compile(self.plan(constraint)))
        except (ConstraintError, LimitExceededError) as error:
            if error.code not in TRANSIENT_FAILURES:
                self.failures[key] = error
                if len(self.failures) > MAX_CACHED_FAILURES:
                    self.failures.popitem(last=False)
            raise

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        for constraint in constraints:
            self.compile(constraint)

    def warmup(self) -> None:
        """Pay one-off costs (tokenizer conversion for the backend, first forward) at load."""
        started = time.perf_counter()
        probe = GenerationRequest(prompt="ok", constraint=ChoiceConstraint(choices=["yes", "no"]),
                                  sampling=SamplingParams(max_new_tokens=8))
        self.generate([probe])
        logger.info("warmup took %.2f s", time.perf_counter() - started)

    # -- generation ----------------------------------------------------------------------------

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            text = render_chat(self.tokenizer, request.messages, request.tools, request.chat_template_kwargs)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.prompt)["input_ids"])

    def _row(self, request: GenerationRequest) -> tuple[Row, CompiledConstraint | None]:
        """Checks (max_tokens, prompt, the constraint's minimum budget), then the row to decode."""
        max_new = request.sampling.max_new_tokens or self.config.sampling.max_new_tokens
        check_max_new_tokens(max_new, self.config.limits, self.config.name)
        ids = self.prompt_ids(request)
        self._check_prompt(len(ids), max_new)
        compiled = self.compile(request.constraint) if request.constraint is not None else None
        if compiled is not None and compiled.min_tokens is not None and max_new < compiled.min_tokens:
            raise InvalidRequestError(
                f"max_tokens {max_new} is too small for this {compiled.kind} constraint: its shortest valid "
                f"output takes {compiled.min_tokens} tokens", param="max_tokens", code="max_tokens_too_small")
        return self._new_row(request, ids, max_new, compiled), compiled

    def _new_row(self, request: GenerationRequest, ids: list[int], max_new: int,
                 compiled: CompiledConstraint | None) -> Row:
        pick = self.config.sampling.merged(request.sampling)  # the request's values, else the defaults
        closer = compiled.closer if compiled is not None and pick["close_json"] else None
        return Row(ids, max_new, pick["temperature"], pick["top_p"], request.sampling.seed, list(request.sampling.stop),
                   compiled.new_matcher() if compiled else None,
                   closer=RowCloser(closer) if closer is not None else None,
                   repetition_penalty=pick["repetition_penalty"], frequency_penalty=pick["frequency_penalty"],
                   presence_penalty=pick["presence_penalty"], no_repeat_ngram_size=pick["no_repeat_ngram_size"],
                   top_k=max(0, pick["top_k"]), min_p=pick["min_p"], logprobs=request.sampling.logprobs,
                   checker=RowChecker(compiled.checks) if compiled is not None and compiled.checks else None)

    def _check_prompt(self, prompt_tokens: int, max_new: int) -> None:
        if prompt_tokens == 0:  # found by fuzzing: a model cannot continue from nothing
            raise InvalidRequestError("prompt is empty (it has no tokens)", param="prompt", code="empty_prompt")
        limit = self.config.limits.max_prompt_tokens
        if prompt_tokens > limit:
            raise LimitExceededError(f"prompt has {prompt_tokens} tokens; the limit is {limit}",
                                     param="messages", code="max_prompt_tokens")
        if self.context_length and prompt_tokens + max_new > self.context_length:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new}) exceeds the model's "
                f"context length of {self.context_length}", param="max_tokens", code="context_length")

    def reconfigure(self, config: ModelConfig) -> None:
        """Swap sampling defaults, limits and the registry; the model and cache stay."""
        if config.name != self.config.name or config.source != self.config.source:
            raise ValueError("a different model or source needs new replicas, not a reconfigure")
        self.config = config
        self.compiler.limits = config.limits
        self.failures.clear()  # a rejection may have come from a limit that just changed

    def prepare(self, request: GenerationRequest) -> tuple[Row, CompiledConstraint | None]:
        """Check a request's limits and compile its constraint, raising what `generate` would."""
        return self._row(request)

    def submit_prepared(self, request: GenerationRequest, prepared: tuple[Row, CompiledConstraint | None],
                        notify: Callable[[tuple[str, Any]], None] | None = None, deltas: bool = True) -> Submission:
        return self._submit(request, *prepared, notify, deltas)

    def submit(self, request: GenerationRequest,
               notify: Callable[[tuple[str, Any]], None] | None = None) -> Submission:
        """Queue one request for the decode loop; it joins the running batch between steps."""
        row, compiled = self._row(request)
        return self._submit(request, row, compiled, notify)

    def _submit(self, request: GenerationRequest, row: Row, compiled: CompiledConstraint | None,
                notify: Callable[[tuple[str, Any]], None] | None = None, deltas: bool = True) -> Submission:
        stream = self.loop.submit(Stream(row, notify, deltas))
        return Submission(request, stream, compiled.backend if compiled else None,
                          compiled.approximated if compiled else (), compiled.rewrites if compiled else (),
                          compiled.checks.sites if compiled is not None and compiled.checks else ())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for all requests together (validated first: one bad request fails the call)."""
        prepared = [self._row(request) for request in requests]
        submissions = [self._submit(request, row, compiled, deltas=False)
                       for request, (row, compiled) in zip(requests, prepared, strict=True)]
        return [self.result(s, s.stream.result()) for s in submissions]

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) requests in the decode loop."""
        return self.loop.queue_depth()

    def logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[TokenLogprobs]:
        """The decode loop's (token, logprob, alternatives) entries, with each token's text."""
        return [TokenLogprobs(**self._token(token, logprob),
                              top_logprobs=[TokenLogprob(**self._token(t, lp)) for t, lp in top])
                for token, logprob, top in entries]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = str(self.tokenizer.decode([token]))
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}

    def _decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def result(self, submission: Submission, out: RowOutput) -> GenerationResult:
        request, row = submission.request, submission.stream.row
        valid = None if request.constraint is None else request.constraint.is_satisfied_by(out.text)
        if valid is None and request.constraint is not None:  # the checker timed out: trust the matcher
            valid = out.accepted
        if valid and out.finish_reason != "stop":  # cut off: never presented as valid, even if it parses
            valid = False
        prompt_tokens, completion_tokens = len(row.prompt_ids), len(out.token_ids)
        return GenerationResult(
            text=out.text, finish_reason=out.finish_reason,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
            valid=valid, closed_early=out.closed_early, backend=submission.backend,
            approximated=list(submission.approximated), rewrites=list(submission.rewrites),
            checks=({"keywords": _listed(submission.checks), **row.checker.stats.as_dict()}
                    if row.checker is not None else None),
            token_ids=out.token_ids,
            logprobs=self.logprobs(out.logprobs) if row.logprobs is not None else None,
            timings={"total_s": out.total_s, "first_token_s": out.first_token_s or 0.0,
                     **({"queue_s": out.queue_s} if out.queue_s is not None else {})},
        )

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "model": self.config.name,
            "plan": loaded.plan.summary(),
            "gpu_plan": loaded.gpu_plan.summary() if loaded.gpu_plan else None,
            "device_map": {k: str(v) for k, v in loaded.device_map.items()},
            "dtype": loaded.plan.dtype,
            "torch_threads": torch_threads(),
            "max_batch_size": self.loop.capacity(),
            "fell_back_to_cpu": loaded.fell_back,
            "fallback_reason": loaded.fallback_reason,
            "load_seconds": round(loaded.load_seconds, 3),
            "compile_cache": {**self.cache.stats.as_dict(), "failures_cached": len(self.failures),
                              "failure_hits": self.failed_hits},
            "queue": dict(zip(("waiting", "running"), self.queue_depth(), strict=True)),
            "finished": dict(self.loop.finished),
            "closed_early": self.loop.closed_early,
            "checks": {k: self.loop.checks[k] for k in ("evaluated", "violations", "rollbacks", "exhausted")},
            "decode_steps": self.loop.steps,
            "mean_batch_size": round(self.loop.rows_stepped / self.loop.steps, 2) if self.loop.steps else None,
            "prefills": self.loop.prefills,
            "prefix_cache": self.loop.prefixes.stats() if self.loop.prefixes is not None else None,
            "out_of_memory": dict(self.loop.oom_events),
            "gpu_memory": gpu_memory(),
        }


# Checked keywords listed in a response; a large schema can have hundreds.
MAX_LISTED_CHECKS = 16


def _listed(sites: tuple[str, ...]) -> list[str]:
    shown = list(sites[:MAX_LISTED_CHECKS])
    return shown + [f"... and {len(sites) - len(shown)} more"] if len(sites) > len(shown) else shown


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
