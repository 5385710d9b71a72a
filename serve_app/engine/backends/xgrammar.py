"""xgrammar (optional: `pip install .[xgrammar]`): JSON Schema, regex and choice. Fast, but it
approximates some schemas and says so only on its C++ stderr, which is read here
(isolation.captured_stderr): an approximation falls through the cascade like an error."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from serve_app.constraints import AnyConstraint, JsonSchemaConstraint
from serve_app.engine.backends.base import Backend, Compiled, bitmask_words, regex_of
from serve_app.engine.backends.isolation import captured_stderr
from serve_app.errors import ConstraintError

# When it does not report its size: assume a megabyte (the cache's byte bound stays honest).
UNKNOWN_SIZE_BYTES = 1024 * 1024


class XGrammarMatcher:
    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.width = bitmask_words(vocab_size)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def accept(self, tokens: list[int]) -> bool:
        taken = 0
        for token in tokens:
            if not self.matcher.accept_token(token):
                break
            taken += 1
        self.matcher.rollback(taken)
        return taken == len(tokens)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def rollback(self, tokens: int) -> None:
        self.matcher.rollback(tokens)


class XGrammarBackend(Backend):
    name = "xgrammar"
    json_separators = (", ", ": ")  # xgrammar without any_whitespace writes these

    @cached_property
    def compiler(self) -> Any:
        from outlines.backends import XGrammarBackend as OutlinesXGrammar

        return OutlinesXGrammar(self.context.outlines_model).grammar_compiler

    def _compile(self, constraint: AnyConstraint, timeout_s: float) -> Compiled:
        if isinstance(constraint, JsonSchemaConstraint):
            with captured_stderr() as lines:
                compiled = self.compiler.compile_json_schema(json.dumps(constraint.json_schema), any_whitespace=False)
            warnings = [line.split("Warning: ", 1)[1] for line in lines if "Warning: " in line]
            if warnings:
                raise ConstraintError(f"xgrammar would only approximate this json_schema: {'; '.join(warnings)}",
                                      param="json_schema", code="approximated")
        else:
            compiled = self.compiler.compile_regex(regex_of(constraint))
        size = int(getattr(compiled, "memory_size_bytes", 0) or UNKNOWN_SIZE_BYTES)
        vocab = self.context.vocab_size
        return Compiled(lambda: XGrammarMatcher(compiled, vocab), size)


BACKEND = XGrammarBackend
