"""llguidance: JSON Schema, regex, choice and Lark grammars. Compiles lazily in milliseconds,
errors on keywords it cannot enforce, and reports approximations as warnings (read here)."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from serve_app.constraints import AnyConstraint, GrammarConstraint, JsonSchemaConstraint
from serve_app.engine.backends.base import Backend, Compiled, bitmask_words, regex_of
from serve_app.errors import ConstraintError

# Compact JSON: weak models otherwise fill their budget with whitespace.
STRICT_EXTENSION = {"whitespace_flexible": False}
LENIENT_EXTENSION = {"whitespace_flexible": False, "lenient": True, "coerce_one_of": True}
# What a compiled grammar costs beyond its source (llguidance builds the rest lazily).
BASE_BYTES = 64 * 1024


class LLGuidanceMatcher:
    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.width = bitmask_words(vocab_size)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def accept(self, tokens: list[int]) -> bool:
        if self.matcher.validate_tokens(tokens) != len(tokens):
            return False
        trial = self.matcher.deep_copy()
        return all(trial.consume_token(t) for t in tokens) and bool(trial.is_accepting())

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    def rollback(self, tokens: int) -> None:
        self.matcher.rollback(tokens)

    def forced_tokens(self) -> list[int]:
        """The tokens every continuation starts with (llguidance trims where the tokenization of
        what follows could differ)."""
        return list(self.matcher.compute_ff_tokens())


class LLGuidanceBackend(Backend):
    name = "llguidance"

    def _compile(self, constraint: AnyConstraint, timeout_s: float) -> Compiled:
        matcher, compiled = self._build(*_source(constraint), constraint.type)
        warnings = matcher.get_grammar_warnings()
        if warnings:
            raise ConstraintError(f"llguidance would only approximate this {constraint.type}: "
                                  f"{'; '.join(warnings)}", param=constraint.type, code="approximated")
        return compiled

    def compile_lenient(self, constraint: JsonSchemaConstraint, timeout_s: float) -> Compiled:
        """llguidance ignoring what it cannot enforce; its warnings say what that is."""
        schema = {**constraint.json_schema, "x-guidance": LENIENT_EXTENSION}
        matcher, compiled = self._build("json_schema", json.dumps(schema), "json_schema", lenient=True)
        compiled.approximated = tuple(matcher.get_grammar_warnings()) or ("compiled leniently",)
        return compiled

    @cached_property
    def tokenizer(self) -> Any:
        """The model's tokenizer as llguidance takes it (Outlines converts it, once)."""
        from outlines.backends import LLGuidanceBackend as OutlinesLLGuidance

        return OutlinesLLGuidance(self.context.outlines_model).llg_tokenizer

    def _build(self, kind: str, source: str, param: str, lenient: bool = False) -> tuple[Any, Compiled]:
        import llguidance

        tokenizer = self.tokenizer
        grammar = llguidance.grammar_from(kind, source)  # type: ignore[arg-type]
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise ConstraintError(f"llguidance cannot enforce this {param}{' even leniently' if lenient else ''}: "
                                  f"{matcher.get_error()}", param=param, code="unsupported")
        vocab = tokenizer.vocab_size
        return matcher, Compiled(lambda: LLGuidanceMatcher(matcher.deep_copy(), vocab), len(grammar) * 8 + BASE_BYTES)


def _source(constraint: AnyConstraint) -> tuple[str, str]:
    if isinstance(constraint, JsonSchemaConstraint):
        return "json_schema", json.dumps({**constraint.json_schema, "x-guidance": STRICT_EXTENSION})
    if isinstance(constraint, GrammarConstraint):
        return "lark", constraint.grammar
    return "regex", regex_of(constraint)


BACKEND = LLGuidanceBackend
