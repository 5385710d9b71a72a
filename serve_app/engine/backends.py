"""Compiling constraints with Outlines' backends, and one fresh matcher per request.

Outlines compiles per Generator and its processors keep per-row state, so a server cannot share
them. Here the compiled artifact (llguidance matcher, outlines_core `Index`, xgrammar
`CompiledGrammar`) is cached, and every request gets a cheap matcher built from it. Matchers
write their allowed tokens into one row of a shared int32 bitmask (the format all three
backends use), so the decode loop masks the whole batch with one tensor op.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from serve_app.config import BackendDefaults, LimitsConfig
from serve_app.engine.cascade import plan_schema
from serve_app.engine.closing import JsonCloser, ShortestEncoder
from serve_app.engine.constraints import (
    ENFORCED_FORMATS,
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    check_constraint,
)
from serve_app.engine.schema_support import VALIDATION_KEYWORDS, iter_subschemas
from serve_app.errors import ConstraintError, LimitExceededError, ServeAppError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

AnyConstraint = JsonSchemaConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint

# Compact JSON: weak models otherwise fill their budget with whitespace.
OUTLINES_CORE_WHITESPACE = r"[ ]?"
_COMPILE_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="compile")
# Compiles that outlived their caller's timeout, kept (bounded) so a retry waits for the same work.
MAX_INFLIGHT_COMPILES = 64


class RowMatcher:
    """One request's position in its constraint: fills its bitmask row, advances by tokens."""

    width: int  # int32 words in this backend's bitmask row

    def fill(self, bitmask: Any, row: int) -> None:
        raise NotImplementedError

    def advance(self, token: int) -> bool:
        """Consume a generated token; False if the constraint rejects it."""
        raise NotImplementedError

    def accepts(self, tokens: list[int]) -> bool:
        """Whether these tokens, from the current state, end in an accepting state (no change)."""
        raise NotImplementedError


class _LLGuidanceMatcher(RowMatcher):
    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.width = (vocab_size + 31) // 32

    def fill(self, bitmask: Any, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def accepts(self, tokens: list[int]) -> bool:
        if self.matcher.validate_tokens(tokens) != len(tokens):
            return False
        trial = self.matcher.deep_copy()
        return all(trial.consume_token(t) for t in tokens) and bool(trial.is_accepting())


class _OutlinesCoreMatcher(RowMatcher):
    def __init__(self, index: Any, vocab_size: int) -> None:
        from outlines_core import Guide

        self.guide = Guide(index)
        self.width = (vocab_size + 31) // 32

    def fill(self, bitmask: Any, row: int) -> None:
        from outlines_core.kernels.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.guide, bitmask[row:row + 1])

    def advance(self, token: int) -> bool:
        if self.guide.is_finished() and not self.guide.accepts_tokens([token]):
            return False
        self.guide.advance(token_id=token, return_tokens=False)
        return True

    def accepts(self, tokens: list[int]) -> bool:
        return bool(self.guide.accepts_tokens(tokens))


class _XGrammarMatcher(RowMatcher):
    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.width = (vocab_size + 31) // 32

    def fill(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def accepts(self, tokens: list[int]) -> bool:
        taken = 0
        for token in tokens:
            if not self.matcher.accept_token(token):
                break
            taken += 1
        self.matcher.rollback(taken)
        return taken == len(tokens)


@dataclass
class CompiledConstraint:
    key: str
    kind: str
    backend: str
    new_matcher: Callable[[], RowMatcher]
    size_bytes: int
    compile_seconds: float
    rewrites: tuple[str, ...] = ()  # meaning-preserving rewrites applied before compiling
    attempts: tuple[str, ...] = ()  # backends tried first, and why each fell through
    approximated: tuple[str, ...] = ()  # what is not enforced (only with strict: false)
    closer: JsonCloser | None = None  # shortest completions, for closing JSON within max_tokens
    min_tokens: int | None = None  # fewest tokens of a complete output we can construct


def installed_backends() -> list[str]:
    return [name for name in ("llguidance", "outlines_core", "xgrammar")
            if importlib.util.find_spec(name) is not None]


def choose_backend(constraint: AnyConstraint, defaults: BackendDefaults) -> str:
    backend = constraint.backend or getattr(defaults, constraint.type)
    if backend not in installed_backends():
        raise ConstraintError(f"backend {backend!r} is not installed here; installed: "
                              f"{', '.join(installed_backends())}", param="backend")
    if constraint.type == "grammar" and backend != "llguidance":
        raise ConstraintError(f"Lark grammars compile with llguidance only, not {backend}", param="backend")
    return backend


class ConstraintCompiler:
    """Compiles constraints for one model's tokenizer, with every installed backend."""

    def __init__(self, hf_model: Any, tokenizer: Any, defaults: BackendDefaults, limits: LimitsConfig) -> None:
        import outlines

        self.defaults = defaults
        self.limits = limits
        self.outlines_model = outlines.from_transformers(hf_model, tokenizer)
        self.vocab_size = int(hf_model.config.get_text_config().vocab_size)
        self.tokenizer = tokenizer
        self._backends: dict[str, Any] = {}
        self._encoder: ShortestEncoder | None = None
        self._inflight: OrderedDict[str, concurrent.futures.Future[Any]] = OrderedDict()
        self._inflight_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """The fewest tokens that spell `text` (what closing spends and the minimum budget)."""
        if self._encoder is None:
            self._encoder = ShortestEncoder(self.tokenizer, self.vocab_size)
        return self._encoder(text)

    def backend(self, name: str) -> Any:
        if name not in self._backends:
            from outlines.backends import LLGuidanceBackend, OutlinesCoreBackend, XGrammarBackend

            classes: dict[str, Any] = {"llguidance": LLGuidanceBackend, "outlines_core": OutlinesCoreBackend,
                                       "xgrammar": XGrammarBackend}
            self._backends[name] = classes[name](self.outlines_model)
        return self._backends[name]

    def compile(self, constraint: AnyConstraint) -> CompiledConstraint:
        """Check limits, then compile within `compile_timeout_s`: a JSON Schema through the
        cascade, the other kinds with their configured backend."""
        check_constraint(constraint, self.limits)
        started = time.perf_counter()
        if isinstance(constraint, JsonSchemaConstraint):
            compiled = self._compile_schema(constraint)
        else:
            backend = choose_backend(constraint, self.defaults)
            new_matcher, size = self._timed(backend, constraint)
            compiled = CompiledConstraint(constraint.cache_key(), constraint.type, backend, new_matcher, size, 0.0)
        compiled.compile_seconds = time.perf_counter() - started
        self._add_budget(compiled, constraint)
        return compiled

    def schema_order(self, constraint: JsonSchemaConstraint) -> list[str]:
        if constraint.backend is not None:
            return [choose_backend(constraint, self.defaults)]
        if self.defaults.json_schema != "cascade":
            return [choose_backend(constraint, self.defaults)]
        order: list[str] = [b for b in self.defaults.cascade if b in installed_backends()]
        if not order:
            raise ConstraintError(f"no backend of backends.cascade ({', '.join(self.defaults.cascade)}) is "
                                  f"installed here; installed: {', '.join(installed_backends())}", param="backend")
        return order

    def _compile_schema(self, constraint: JsonSchemaConstraint) -> CompiledConstraint:
        """The first backend of the cascade that enforces the normalised schema exactly wins;
        explicit errors, detected approximations and timeouts fall through to the next. With
        ``strict: false`` and no exact backend, llguidance approximates (output checked after)."""
        plan = plan_schema(constraint.json_schema, self.schema_order(constraint), self.limits.max_ref_expansion)
        normalized = constraint.model_copy(update={"json_schema": plan.schema})
        failures: list[tuple[str, ServeAppError]] = []
        for backend in plan.exact:
            try:
                new_matcher, size = self._timed(backend, normalized)
            except (ConstraintError, LimitExceededError) as error:
                failures.append((backend, error))
                continue
            return CompiledConstraint(constraint.cache_key(), "json_schema", backend, new_matcher, size, 0.0,
                                      rewrites=plan.rewrites, attempts=_attempts(failures))
        if not constraint.strict and "llguidance" in installed_backends():
            new_matcher, size, approximated = self._within_timeout(
                "llguidance", "json_schema", lambda: self._llguidance_lenient(normalized),
                key=f"llguidance-lenient|{normalized.cache_key()}")
            return CompiledConstraint(constraint.cache_key(), "json_schema", "llguidance", new_matcher, size, 0.0,
                                      rewrites=plan.rewrites, attempts=_attempts(failures),
                                      approximated=tuple(approximated) or ("compiled leniently",))
        if not failures:
            raise plan.rejection(constraint.strict)
        raise _no_exact_backend(failures, plan.schema)

    def _timed(self, backend: str, constraint: AnyConstraint) -> tuple[Callable[[], RowMatcher], int]:
        return self._within_timeout(backend, constraint.type, lambda: self._compile_with(backend, constraint),
                                    key=f"{backend}|{constraint.cache_key()}")

    def _within_timeout(self, backend: str, kind: str, compile_fn: Callable[[], _T], key: str) -> _T:
        """Compile off the caller's thread, giving up at `limits.compile_timeout_s`. A compile
        that times out cannot be stopped (a thread), so it is kept: a retry of the same
        constraint waits for that work instead of starting it again, and gets its result."""
        with self._inflight_lock:
            future = self._inflight.get(key)
            if future is None:
                future = self._inflight[key] = _COMPILE_POOL.submit(compile_fn)
                while len(self._inflight) > MAX_INFLIGHT_COMPILES:
                    self._inflight.popitem(last=False)
        try:
            result = future.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise LimitExceededError(
                f"compiling the {kind} constraint with {backend} took longer than "
                f"limits.compile_timeout_s ({self.limits.compile_timeout_s:g} s); it goes on in the background, "
                f"and a retry uses its result", param=kind, code="compile_timeout_s") from None
        finally:
            if future.done():
                with self._inflight_lock:
                    if self._inflight.get(key) is future:
                        del self._inflight[key]
        return result

    def _add_budget(self, compiled: CompiledConstraint, constraint: AnyConstraint) -> None:
        """The minimum budget (and, for JSON Schema, the closer that keeps output within it)."""
        if isinstance(constraint, ChoiceConstraint):
            compiled.min_tokens = min(len(self.encode(choice)) for choice in constraint.choices)
        elif isinstance(constraint, JsonSchemaConstraint):
            try:
                # xgrammar without any_whitespace writes ", " and ": "; the others allow compact JSON.
                separators = (", ", ": ") if compiled.backend == "xgrammar" else (",", ":")
                closer = JsonCloser(constraint.json_schema, self.encode, ENFORCED_FORMATS, separators)
            except Exception:  # noqa: BLE001 - no closer means honest truncation, never a failed request
                logger.warning("cannot build a closer for %s", compiled.key, exc_info=True)
                return
            compiled.closer, compiled.min_tokens = closer, closer.min_tokens

    def _compile_with(self, backend: str, constraint: AnyConstraint) -> tuple[Callable[[], RowMatcher], int]:
        compile_fn = {"llguidance": self._llguidance, "outlines_core": self._outlines_core,
                      "xgrammar": self._xgrammar}[backend]
        try:
            return compile_fn(constraint)
        except ServeAppError:
            raise
        except Exception as error:  # backends raise plain errors (xgrammar: RuntimeError) for input they refuse
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConstraintError(f"{backend} cannot compile this {constraint.type}: {first_line[:300]}",
                                  param=constraint.type, code="unsupported") from None

    def _llguidance(self, constraint: AnyConstraint) -> tuple[Callable[[], RowMatcher], int]:
        kind, source = _llguidance_source(constraint)
        matcher, new_matcher, size = self._llguidance_compile(kind, source, constraint.type)
        warnings = matcher.get_grammar_warnings()
        if warnings:
            raise ConstraintError(f"llguidance would only approximate this {constraint.type}: "
                                  f"{'; '.join(warnings)}", param=constraint.type, code="approximated")
        return new_matcher, size

    def _llguidance_lenient(self, constraint: JsonSchemaConstraint) -> tuple[Callable[[], RowMatcher], int,
                                                                             list[str]]:
        """llguidance ignoring what it cannot enforce; its warnings say what that is."""
        schema = {**constraint.json_schema, "x-guidance": {"whitespace_flexible": False, "lenient": True,
                                                           "coerce_one_of": True}}
        matcher, new_matcher, size = self._llguidance_compile("json_schema", json.dumps(schema), "json_schema",
                                                              lenient=True)
        return new_matcher, size, list(matcher.get_grammar_warnings())

    def _llguidance_compile(self, kind: str, source: str, param: str,
                            lenient: bool = False) -> tuple[Any, Callable[[], RowMatcher], int]:
        """(the compiled matcher, a factory of per-request copies, its size in bytes)."""
        import llguidance

        tokenizer = self.backend("llguidance").llg_tokenizer
        grammar = llguidance.grammar_from(kind, source)  # type: ignore[arg-type]
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise ConstraintError(f"llguidance cannot enforce this {param}{' even leniently' if lenient else ''}: "
                                  f"{matcher.get_error()}", param=param, code="unsupported")
        vocab = tokenizer.vocab_size
        return matcher, (lambda: _LLGuidanceMatcher(matcher.deep_copy(), vocab)), len(grammar) * 8 + 64 * 1024

    def _outlines_core(self, constraint: AnyConstraint) -> tuple[Callable[[], RowMatcher], int]:
        """Built in a forked child that is killed on timeout: outlines_core turns a regex into a
        DFA eagerly, which can blow up (and would keep burning CPU in a discarded thread)."""
        backend = self.backend("outlines_core")
        is_schema = isinstance(constraint, JsonSchemaConstraint)
        source = json.dumps(constraint.json_schema) if is_schema else _regex_of(constraint)  # type: ignore[union-attr]
        index = build_index_in_child(source, is_schema, backend.vocabulary, self.limits.compile_timeout_s)
        size = sum(len(t) for t in index.get_transitions().values()) * 16 + len(source)
        vocab = self.vocab_size
        return (lambda: _OutlinesCoreMatcher(index, vocab)), size

    def _xgrammar(self, constraint: AnyConstraint) -> tuple[Callable[[], RowMatcher], int]:
        compiler = self.backend("xgrammar").grammar_compiler
        if isinstance(constraint, JsonSchemaConstraint):
            # xgrammar approximates some schemas and says so only on the C++ stderr: read it.
            with captured_stderr() as lines:
                compiled = compiler.compile_json_schema(json.dumps(constraint.json_schema), any_whitespace=False)
            warnings = [line.split("Warning: ", 1)[1] for line in lines if "Warning: " in line]
            if warnings:
                raise ConstraintError(f"xgrammar would only approximate this json_schema: {'; '.join(warnings)}",
                                      param="json_schema", code="approximated")
        else:
            compiled = compiler.compile_regex(_regex_of(constraint))
        size = int(getattr(compiled, "memory_size_bytes", 0) or 1024 * 1024)
        vocab = self.vocab_size
        return (lambda: _XGrammarMatcher(compiled, vocab)), size


# Keywords that appear in most schemas and in prose: they do not locate an error.
_COMMON_WORDS = {"type", "items", "properties", "required", "enum", "const", "not", "if", "then", "else"}


# Words in backends' errors that stand for a keyword ("regex parse error" is about a `pattern`).
_ERROR_WORDS = {"regex": "pattern", "lookarounds": "pattern", "circular": "$ref", "references": "$ref"}


def _attempts(failures: list[tuple[str, ServeAppError]]) -> tuple[str, ...]:
    return tuple(f"{backend}: {error.message}" for backend, error in failures)


def _no_exact_backend(failures: list[tuple[str, ServeAppError]], schema: dict[str, Any]) -> ServeAppError:
    """Every candidate failed to compile: name the keyword the first error mentions and where it
    first occurs, and what each backend said."""
    backend, first = failures[0]
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


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Lines written to file descriptor 2 (where C++ libraries log) inside the block; lines that
    other threads wrote meanwhile are passed on to the real stderr afterwards."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as scratch:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            for line in scratch.read().decode(errors="replace").splitlines():
                lines.append(line)
                if "/project/cpp/" not in line:  # xgrammar's own log lines
                    print(line, file=sys.stderr)


def _regex_of(constraint: AnyConstraint) -> str:
    if isinstance(constraint, ChoiceConstraint):
        return constraint.as_regex()
    if isinstance(constraint, RegexConstraint):
        return constraint.pattern
    raise ConstraintError(f"{constraint.type} cannot be expressed as a regex", param=constraint.type)


def _llguidance_source(constraint: AnyConstraint) -> tuple[str, str]:
    if isinstance(constraint, JsonSchemaConstraint):
        schema = dict(constraint.json_schema)
        schema["x-guidance"] = {"whitespace_flexible": False}
        return "json_schema", json.dumps(schema)
    if isinstance(constraint, GrammarConstraint):
        return "lark", constraint.grammar
    return "regex", _regex_of(constraint)



def _index_child(conn: Any, source: str, is_schema: bool, vocabulary: Any) -> None:
    import pickle

    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    try:
        regex = build_regex_from_schema(source, OUTLINES_CORE_WHITESPACE) if is_schema else source
        conn.send(("ok", pickle.dumps(Index(regex, vocabulary))))
    except Exception as error:  # outlines_core raises plain exceptions for unbuildable input
        conn.send(("error", str(error)))
    finally:
        conn.close()


def build_index_in_child(source: str, is_schema: bool, vocabulary: Any, timeout_s: float) -> Any:
    import multiprocessing
    import pickle

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_index_child, args=(sender, source, is_schema, vocabulary), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise LimitExceededError(f"compiling with outlines_core took longer than limits.compile_timeout_s "
                                     f"({timeout_s:g} s)", param="constraint", code="compile_timeout_s")
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", f"the compiler process died (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if status != "ok":
        raise ConstraintError(f"outlines_core cannot compile this constraint: {payload}", param="constraint",
                              code="unsupported")
    return pickle.loads(payload)
