"""outlines_core: JSON Schema (through its regex), regex and choice. It turns a regex into a DFA
index eagerly, which can blow up, so the index is built in a forked child killed at the timeout
(isolation.py)."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from serve_app.constraints import AnyConstraint, JsonSchemaConstraint
from serve_app.engine.backends.base import Backend, Compiled, bitmask_words, regex_of
from serve_app.engine.backends.isolation import build_index_in_child

# Compact JSON: weak models otherwise fill their budget with whitespace.
WHITESPACE = r"[ ]?"
# Bytes per index transition, measured on its pickled form.
BYTES_PER_TRANSITION = 16


# Tokens a matcher can take back (checks made while generating roll rows back; the default is 32).
MAX_ROLLBACK = 4096


class OutlinesCoreMatcher:
    def __init__(self, index: Any, vocab_size: int) -> None:
        from outlines_core import Guide

        self.guide = Guide(index, max_rollback=MAX_ROLLBACK)
        self.width = bitmask_words(vocab_size)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        from outlines_core.kernels.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.guide, bitmask[row:row + 1])

    def advance(self, token: int) -> bool:
        if self.guide.is_finished() and not self.guide.accepts_tokens([token]):
            return False
        self.guide.advance(token_id=token, return_tokens=False)
        return True

    def accept(self, tokens: list[int]) -> bool:
        return bool(self.guide.accepts_tokens(tokens))

    def is_terminated(self) -> bool:
        return bool(self.guide.is_finished())

    def rollback(self, tokens: int) -> None:
        self.guide.rollback_state(tokens)


class OutlinesCoreBackend(Backend):
    name = "outlines_core"

    @cached_property
    def vocabulary(self) -> Any:
        from outlines.backends import OutlinesCoreBackend as OutlinesCore

        return OutlinesCore(self.context.outlines_model).vocabulary

    def _compile(self, constraint: AnyConstraint, timeout_s: float) -> Compiled:
        is_schema = isinstance(constraint, JsonSchemaConstraint)
        source = json.dumps(constraint.json_schema) if is_schema else regex_of(constraint)  # type: ignore[union-attr]
        index = build_index_in_child(source, is_schema, self.vocabulary, timeout_s, WHITESPACE)
        size = sum(len(t) for t in index.get_transitions().values()) * BYTES_PER_TRANSITION + len(source)
        vocab = self.context.vocab_size
        return Compiled(lambda: OutlinesCoreMatcher(index, vocab), size)


BACKEND = OutlinesCoreBackend
