"""Compiling constraints with Outlines' backends, and one fresh logits processor per request.

Outlines compiles per Generator and its processors keep per-row state, so a server cannot share
them. Here the compiled artifact (llguidance matcher, outlines_core `Index`, xgrammar
`CompiledGrammar`) is cached, and every request gets a cheap processor built from it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_app.config import BackendDefaults, LimitsConfig
from serve_app.engine.constraints import (
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    check_limits,
)
from serve_app.engine.schema_support import check_schema_supported
from serve_app.errors import ConstraintError, LimitExceededError

AnyConstraint = JsonSchemaConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint

# Compact JSON: weak models otherwise fill their budget with whitespace.
OUTLINES_CORE_WHITESPACE = r"[ ]?"
_COMPILE_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="compile")


@dataclass
class CompiledConstraint:
    key: str
    kind: str
    backend: str
    new_processor: Callable[[], Any]
    size_bytes: int
    compile_seconds: float


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


def _disable_mask_kernel_compile() -> None:
    """outlines_core's mask kernel is wrapped in ``torch.compile``: seconds on the first request,
    and slower than eager on CPU. Use the eager function it wraps."""
    import outlines_core.kernels.torch as kernels

    eager = getattr(kernels._apply_token_bitmask_inplace_kernel, "_torchdynamo_orig_callable", None)
    if eager is not None:
        kernels._apply_token_bitmask_inplace_kernel = eager


class ConstraintCompiler:
    """Compiles constraints for one model's tokenizer, with every installed backend."""

    def __init__(self, hf_model: Any, tokenizer: Any, defaults: BackendDefaults, limits: LimitsConfig) -> None:
        import outlines

        self.defaults = defaults
        self.limits = limits
        self.outlines_model = outlines.from_transformers(hf_model, tokenizer)
        self._backends: dict[str, Any] = {}

    def backend(self, name: str) -> Any:
        if name not in self._backends:
            from outlines.backends import LLGuidanceBackend, OutlinesCoreBackend, XGrammarBackend

            classes: dict[str, Any] = {"llguidance": LLGuidanceBackend, "outlines_core": OutlinesCoreBackend,
                                       "xgrammar": XGrammarBackend}
            if name == "outlines_core":
                _disable_mask_kernel_compile()
            self._backends[name] = classes[name](self.outlines_model)
        return self._backends[name]

    def compile(self, constraint: AnyConstraint) -> CompiledConstraint:
        """Check limits and keyword support, then compile within `compile_timeout_s`."""
        check_limits(constraint, self.limits)
        backend = choose_backend(constraint, self.defaults)
        if isinstance(constraint, JsonSchemaConstraint):
            check_schema_supported(constraint.json_schema, backend)
        started = time.perf_counter()
        future = _COMPILE_POOL.submit(self._compile_with, backend, constraint)
        try:
            new_processor, size = future.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise LimitExceededError(
                f"compiling the {constraint.type} constraint took longer than "
                f"limits.compile_timeout_s ({self.limits.compile_timeout_s:g} s)",
                param=constraint.type, code="compile_timeout_s") from None
        return CompiledConstraint(constraint.cache_key(), constraint.type, backend, new_processor,
                                  size, time.perf_counter() - started)

    def _compile_with(self, backend: str, constraint: AnyConstraint) -> tuple[Callable[[], Any], int]:
        compile_fn = {"llguidance": self._llguidance, "outlines_core": self._outlines_core,
                      "xgrammar": self._xgrammar}[backend]
        return compile_fn(constraint)

    def _llguidance(self, constraint: AnyConstraint) -> tuple[Callable[[], Any], int]:
        import llguidance

        backend = self.backend("llguidance")
        kind, source = _llguidance_source(constraint)
        grammar = llguidance.grammar_from(kind, source)  # type: ignore[arg-type]
        matcher = llguidance.LLMatcher(backend.llg_tokenizer, grammar)
        if matcher.is_error():
            raise ConstraintError(f"llguidance cannot enforce this {constraint.type}: "
                                  f"{matcher.get_error()}", param=constraint.type, code="unsupported")
        warnings = matcher.get_grammar_warnings()
        if warnings:
            raise ConstraintError(f"llguidance would only approximate this {constraint.type}: "
                                  f"{'; '.join(warnings)}", param=constraint.type, code="approximated")
        return _llguidance_factory(matcher, grammar, backend), len(grammar) * 8 + 64 * 1024

    def _outlines_core(self, constraint: AnyConstraint) -> tuple[Callable[[], Any], int]:
        from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        backend = self.backend("outlines_core")
        if isinstance(constraint, JsonSchemaConstraint):
            regex = build_regex_from_schema(json.dumps(constraint.json_schema), OUTLINES_CORE_WHITESPACE)
        else:
            regex = _regex_of(constraint)
        try:
            index = Index(regex, backend.vocabulary)
        except Exception as error:  # outlines_core raises plain exceptions for unbuildable regexes
            raise ConstraintError(f"outlines_core cannot compile this {constraint.type}: {error}",
                                  param=constraint.type, code="unsupported") from None
        size = sum(len(t) for t in index.get_transitions().values()) * 16 + len(regex)
        return (lambda: OutlinesCoreLogitsProcessor(index, "torch")), size

    def _xgrammar(self, constraint: AnyConstraint) -> tuple[Callable[[], Any], int]:
        from outlines.backends.xgrammar import XGrammarLogitsProcessor

        compiler = self.backend("xgrammar").grammar_compiler
        if isinstance(constraint, JsonSchemaConstraint):
            compiled = compiler.compile_json_schema(json.dumps(constraint.json_schema), any_whitespace=False)
        else:
            compiled = compiler.compile_regex(_regex_of(constraint))
        size = int(getattr(compiled, "memory_size_bytes", 0) or 1024 * 1024)
        return (lambda: XGrammarLogitsProcessor(compiled, "torch")), size


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


def _llguidance_factory(matcher: Any, grammar: str, backend: Any) -> Callable[[], Any]:
    """Processors that start from copies of one compiled matcher, not a recompile per request."""
    from outlines.backends.llguidance import LLGuidanceLogitsProcessor

    class _Processor(LLGuidanceLogitsProcessor):
        def _setup(self, batch_size: int) -> None:
            super()._setup(0)
            import llguidance.torch

            self.ll_matchers = [matcher.deep_copy() for _ in range(batch_size)]
            self.bitmask = llguidance.torch.allocate_token_bitmask(batch_size, self.llg_tokenizer.vocab_size)

    return lambda: _Processor(grammar, backend.llg_tokenizer, "torch")
