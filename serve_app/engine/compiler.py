"""Compiling a planned constraint for one model's tokenizer: the plan's backends in order,
each within `compile_timeout_s`, falling through on an explicit error, a detected approximation
or a timeout; then the closer and the minimum budget, which need the tokenizer.

The compiler checks nothing the plan has checked (serve_app/constraints/plan.py): limits,
semantics, normalisation and backend order are decided there, by the same function the router
runs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from serve_app.cache import BoundedCache
from serve_app.config import ModelConfig
from serve_app.constraints import AnyConstraint, JsonSchemaConstraint, LimitsConfig, Plan
from serve_app.constraints.budget import minimum_budget
from serve_app.constraints.checks import ValueChecks
from serve_app.constraints.json_completion import JsonCloser
from serve_app.constraints.keywords import VALIDATION_KEYWORDS, iter_subschemas
from serve_app.constraints.plan import LENIENT_BACKEND, backend_order
from serve_app.engine.backends import Backend, BackendContext, Matcher, backend_class
from serve_app.engine.requests import TRANSIENT_FAILURES, Enforcement, EngineFront
from serve_app.engine.row_closing import ShortestEncoder
from serve_app.errors import ConstraintError, LimitExceededError, OverloadedError, ServeAppError
from serve_app.status import CacheStatus

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Compiles that run at once: a few, so a burst of new schemas cannot starve the replica.
COMPILE_THREADS = 4
MAX_INFLIGHT_COMPILES = 64
# A compile holds its slot this long; a slower one runs on beside the slots (a thread cannot be
# stopped), at most MAX_SLOW_COMPILES of them; past that, a new compile is a 503 until some finish.
QUICK_COMPILE_S = 0.25
MAX_SLOW_COMPILES = 16
# A compile waits for a slot at most this many compile_timeout_s.
SLOT_WAIT_ROUNDS = 2
# Constraints that did not compile, remembered per replica.
MAX_CACHED_FAILURES = 1024


@dataclass
class CompiledConstraint:
    key: str
    plan: Plan
    backend: str
    new_matcher: Callable[[], Matcher]
    size_bytes: int
    compile_seconds: float
    rewrites: tuple[str, ...] = ()  # meaning-preserving rewrites applied before compiling
    attempts: tuple[str, ...] = ()  # backends tried first, and why each fell through
    approximated: tuple[str, ...] = ()  # what is not enforced (only with strict: false)
    closer: JsonCloser | None = None  # shortest completions, for closing JSON within max_tokens
    min_tokens: int | None = None  # fewest tokens of a complete output we can construct
    checks: ValueChecks | None = None  # keywords checked while generating (the grammar lacks them)


class ConstraintCompiler:
    """Compiles plans for one model's tokenizer, with every installed backend."""

    def __init__(self, hf_model: Any, tokenizer: Any, limits: LimitsConfig) -> None:
        import outlines

        self.limits = limits
        self.vocab_size = int(hf_model.config.get_text_config().vocab_size)
        self.context = BackendContext(outlines.from_transformers(hf_model, tokenizer), self.vocab_size)
        self.tokenizer = tokenizer
        self._backends: dict[str, Backend] = {}
        self._encoder: ShortestEncoder | None = None
        # Compiles that outlived their caller's timeout, kept (bounded) so a retry waits for the same work.
        self._inflight: BoundedCache[str, CompileJob] = BoundedCache(MAX_INFLIGHT_COMPILES)
        self._inflight_lock = threading.Lock()
        self._workers = CompileWorkers(COMPILE_THREADS, QUICK_COMPILE_S, MAX_SLOW_COMPILES)

    def close(self) -> None:
        """Stop taking compiles; those running finish in the background (a thread cannot be stopped)."""
        self._workers.close()

    def encode(self, text: str) -> list[int]:
        """The fewest tokens that spell `text` (what closing spends and the minimum budget)."""
        return self.encoder()(text)

    def encoder(self) -> ShortestEncoder:
        if self._encoder is None:
            self._encoder = ShortestEncoder(self.tokenizer, self.vocab_size)
        return self._encoder

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = backend_class(name)(self.context)
        return self._backends[name]

    def compile(self, plan: Plan) -> CompiledConstraint:
        started = time.perf_counter()
        failures: list[tuple[str, ServeAppError]] = []
        compiled = self._first_that_compiles(plan, failures)
        if compiled is None:
            raise failures[0][1] if len(failures) == 1 and plan.target.type != "json_schema" else \
                _no_exact_backend(failures, plan.target.json_schema)  # type: ignore[union-attr]
        compiled.compile_seconds = time.perf_counter() - started
        self._add_budget(compiled, plan)
        return compiled

    def _first_that_compiles(self, plan: Plan, failures: list[tuple[str, ServeAppError]]) -> CompiledConstraint | None:
        target, timeout = plan.target, self.limits.compile_timeout_s
        for name in plan.backends:
            compile_fn = partial(self.backend(name).compile, target, timeout)
            try:
                done = self._within_timeout(name, target.type, compile_fn, key=f"{name}|{target.cache_key()}")
            except (ConstraintError, LimitExceededError) as error:
                failures.append((name, error))
                continue
            return self._compiled(plan, name, done, failures)
        if plan.lenient and isinstance(target, JsonSchemaConstraint):
            backend = self.backend(LENIENT_BACKEND)
            done = self._within_timeout(LENIENT_BACKEND, target.type,
                                        lambda: backend.compile_lenient(target, timeout),
                                        key=f"{LENIENT_BACKEND}-lenient|{target.cache_key()}")
            return self._compiled(plan, LENIENT_BACKEND, done, failures)
        return None

    @staticmethod
    def _compiled(plan: Plan, name: str, done: Any, failures: list[tuple[str, ServeAppError]]) -> CompiledConstraint:
        checks = ValueChecks(plan.check_schema, plan.checks) if plan.check_schema is not None else None
        return CompiledConstraint(plan.constraint.cache_key(), plan, name, done.new_matcher,
                                  done.size_bytes, 0.0, rewrites=plan.rewrites, attempts=_attempts(failures),
                                  approximated=done.approximated, checks=checks)

    def _within_timeout(self, backend: str, kind: str, compile_fn: Callable[[], _T], key: str) -> _T:
        """Compile off the caller's thread, giving up at `limits.compile_timeout_s`. A compile
        that times out cannot be stopped (a thread), so it is kept: a retry of the same
        constraint waits for that work instead of starting it again, and gets its result."""
        job, asked = self._inflight_job(key, compile_fn), time.monotonic()
        timeout = self.limits.compile_timeout_s
        try:  # the timeout counts from when the compile got a slot (queued behind slow ones is not slow)
            if not job.started.wait(timeout * SLOT_WAIT_ROUNDS):
                self._workers.give_up(job)
                raise LimitExceededError(f"no compile slot came free within {SLOT_WAIT_ROUNDS} x limits."
                                         "compile_timeout_s; retry shortly", param=kind, code="compile_timeout_s")
            deadline = max(job.started_at, asked) + timeout
            return job.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            self._workers.give_up(job)  # queued: dropped; running: its slot goes to the next compile
            raise LimitExceededError(
                f"compiling the {kind} constraint with {backend} took longer than "
                f"limits.compile_timeout_s ({timeout:g} s); it goes on in the background, "
                f"and a retry uses its result", param=kind, code="compile_timeout_s") from None
        finally:
            if job.future.done():
                with self._inflight_lock:
                    if self._inflight.peek(key) is job:
                        self._inflight.pop(key)

    def _inflight_job(self, key: str, compile_fn: Callable[[], Any]) -> CompileJob:
        with self._inflight_lock:
            job = self._inflight.peek(key)
            if job is None:
                job = self._workers.submit(compile_fn)
                self._inflight.put(key, job)
            return job

    def _add_budget(self, compiled: CompiledConstraint, plan: Plan) -> None:
        """The minimum budget (and, for JSON Schema, the closer that keeps output within it)."""
        budget = minimum_budget(plan, self.encode, self.backend(compiled.backend).json_separators)
        compiled.closer, compiled.min_tokens = budget.closer, budget.min_tokens


class CompileJob:
    """One compile: its result, and when it got a slot (a caller's timeout counts from then)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.started = threading.Event()
        self.started_at = 0.0


class CompileWorkers:
    """Each compile in a thread of its own, `slots` starting at once. A compile holds its slot for
    its first `quick_s` only, or until its caller stops waiting: then it runs on beside the slots
    (it cannot be stopped), and a queued compile starts. A few slow schemas cannot hold every slot
    and time out everyone else's compiles; those running beside the slots are bounded too."""

    def __init__(self, slots: int, quick_s: float, max_beside: int) -> None:
        self._free = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self._beside: set[CompileJob] = set()  # running without a slot
        self.quick_s, self.max_beside = quick_s, max_beside
        self.closed = False

    def submit(self, fn: Callable[[], Any]) -> CompileJob:
        with self._lock:
            if self.closed or len(self._beside) >= self.max_beside:
                raise OverloadedError(f"{len(self._beside)} slow compiles are running; retry shortly",
                                      code="compiles_running")
        job = CompileJob(fn)
        threading.Thread(target=self._run, args=(job,), name="compile", daemon=True).start()
        return job

    def _run(self, job: CompileJob) -> None:
        self._free.acquire()
        if self.closed or not job.future.set_running_or_notify_cancel():  # given up while it waited
            job.future.cancel()
            self._free.release()
            return
        job.started_at = time.monotonic()
        job.started.set()
        slow = threading.Timer(self.quick_s, self.step_aside, (job,))
        slow.daemon = True
        slow.start()
        try:
            job.future.set_result(job.fn())
        except BaseException as error:  # noqa: BLE001 - the caller gets it from the future
            job.future.set_exception(error)
        finally:
            slow.cancel()
            with self._lock:
                if job in self._beside:
                    self._beside.discard(job)  # its slot was given back when it stepped aside
                else:
                    self._free.release()

    def step_aside(self, job: CompileJob) -> None:
        """A running compile gives its slot to the next (room permitting) and runs on."""
        with self._lock:
            if not job.future.done() and job not in self._beside and len(self._beside) < self.max_beside:
                self._beside.add(job)
                self._free.release()

    def give_up(self, job: CompileJob) -> None:
        """The caller stopped waiting: a compile still queued is dropped; a running one steps aside
        (a retry of the same constraint waits for its result)."""
        if not job.future.cancel():
            self.step_aside(job)

    def close(self) -> None:
        self.closed = True


# Keywords that appear in most schemas and in prose: they do not locate an error.
_COMMON_WORDS = {"type", "items", "properties", "required", "enum", "const", "not", "if", "then", "else"}
# Words in backends' errors that stand for a keyword ("regex parse error" is about a `pattern`).
_ERROR_WORDS = {"regex": "pattern", "lookarounds": "pattern", "circular": "$ref", "references": "$ref"}


def _attempts(failures: list[tuple[str, ServeAppError]]) -> tuple[str, ...]:
    return tuple(f"{backend}: {error.message}" for backend, error in failures)


def _no_exact_backend(failures: list[tuple[str, ServeAppError]], schema: dict[str, Any]) -> ServeAppError:
    """Every candidate failed to compile: name the keyword the first error mentions and where it
    first occurs, and what each backend said."""
    first = failures[0][1]
    if all(error.code == "compile_timeout_s" for _, error in failures):
        return first
    where = ""
    present = {k for _, sub in iter_subschemas(schema) for k in sub if k in VALIDATION_KEYWORDS}
    words = [_ERROR_WORDS.get(w, w) for w in re.findall(r"[A-Za-z$]+", first.message)]
    keyword = next((w for w in words if w in present and w not in _COMMON_WORDS), None)  # the first one named
    if keyword is not None:
        pointer = next(p for p, sub in iter_subschemas(schema) if keyword in sub)
        where = f"'{keyword}' at #{pointer or '/'}: "
    return ConstraintError(
        f"no backend enforces this JSON Schema exactly: {where}" + "; ".join(_attempts(failures))
        + "; set strict: false to accept an approximation checked after generation",
        param="json_schema", code=first.code if first.code != "compile_timeout_s" else "unsupported")


class CompilingFront(EngineFront):
    """An engine front half whose constraints are compiled here (our matcher masks the tokens):
    a bounded cache of compiled constraints, and of the constraints that failed to compile (a
    repeated bad schema is refused without compiling again). Subclasses set `compiler`."""

    compiler: ConstraintCompiler

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.cache: BoundedCache[str, CompiledConstraint] = BoundedCache(
            config.compile_cache.max_entries, config.compile_cache.max_bytes, lambda c: c.size_bytes)
        self.failures: BoundedCache[str, ServeAppError] = BoundedCache(MAX_CACHED_FAILURES)
        self.failed_hits = 0

    def compile(self, constraint: AnyConstraint) -> CompiledConstraint:
        """Cached, failures included. The key is the plan's, known before planning (planning a
        large schema is not free)."""
        key = f"{'|'.join(backend_order(constraint, self.config.backends, self.installed))}|{constraint.cache_key()}"
        failed = self.failures.get(key)
        if failed is not None:
            self.failed_hits += 1
            raise failed
        try:
            return self.cache.get_or_build(key, lambda: self.compiler.compile(self.plan(constraint)))
        except (ConstraintError, LimitExceededError) as error:
            if error.code not in TRANSIENT_FAILURES:
                self.failures.put(key, error)
            raise

    def shortest_encoder(self) -> ShortestEncoder:
        return self.compiler.encoder()

    def enforce(self, constraint: AnyConstraint) -> Enforcement:
        compiled = self.compile(constraint)
        return Enforcement(compiled.plan, compiled.backend, compiled.approximated, compiled.new_matcher,
                           compiled.closer, compiled.checks, compiled.min_tokens)

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        for constraint in constraints:
            self.enforce(constraint)

    def forget_refusals(self) -> None:
        """After a reconfigure: a refusal may have come from a limit that just changed."""
        self.failures.clear()
        self.plans.clear()

    def cache_status(self) -> CacheStatus:
        stats = self.cache.stats
        return CacheStatus(hits=stats.hits, misses=stats.misses, evictions=stats.evictions, entries=stats.entries,
                           bytes=stats.bytes, compile_seconds=stats.build_seconds,
                           failures_cached=len(self.failures), failure_hits=self.failed_hits)
