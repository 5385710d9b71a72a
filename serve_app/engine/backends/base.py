"""The protocol every backend follows (as vLLM's structured-output backends do): a backend
compiles a constraint into an artifact once; each request gets a cheap matcher from it, which
fills its row of a batch bitmask, advances by tokens, checks a continuation, and rolls back.

Bitmasks are int32 words, one bit per token: the format llguidance, outlines_core and xgrammar
all fill, so the decode loop masks a whole batch in one tensor op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from serve_app.constraints import AnyConstraint, ChoiceConstraint, JsonSchemaConstraint, RegexConstraint
from serve_app.errors import ConstraintError, ServeAppError


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one bitmask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class Matcher(Protocol):
    """One request's position in its compiled constraint."""

    width: int  # int32 words in this backend's bitmask row

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask`."""

    def advance(self, token: int) -> bool:
        """Consume a generated token; False if the constraint rejects it."""

    def accept(self, tokens: list[int]) -> bool:
        """Whether these tokens, from here, end in an accepting state (the state is unchanged)."""

    def is_terminated(self) -> bool:
        """Whether the constraint allows nothing more."""

    # Optional: `forced_tokens() -> list[int]`, the tokens every continuation starts with (the
    # decode loop's jump-forward; engine/jump_forward.py). llguidance has it.

    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` advances."""


@dataclass
class Compiled:
    """A backend's artifact: a factory of per-request matchers, and what it costs to keep."""

    new_matcher: Callable[[], Matcher]
    size_bytes: int
    approximated: tuple[str, ...] = ()  # what is not enforced (lenient compiles only)


@dataclass(frozen=True)
class BackendContext:
    """What backends need from the model: Outlines' wrapper (its backends convert the tokenizer
    for each library) and the size of the logits' vocabulary."""

    outlines_model: Any
    vocab_size: int


class Backend(ABC):
    name: ClassVar[str]
    # How this backend writes JSON when whitespace is not free (what closing must write too).
    json_separators: ClassVar[tuple[str, str]] = (",", ":")

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    def compile(self, constraint: AnyConstraint, timeout_s: float) -> Compiled:
        """The artifact, or a ConstraintError naming why this backend cannot enforce it exactly."""
        return self._refusals_as_errors(constraint, lambda: self._compile(constraint, timeout_s))

    def compile_lenient(self, constraint: JsonSchemaConstraint, timeout_s: float) -> Compiled:
        """An approximation, saying in `approximated` what it does not enforce (strict: false)."""
        raise ConstraintError(f"{self.name} does not approximate schemas", param="json_schema", code="unsupported")

    @abstractmethod
    def _compile(self, constraint: AnyConstraint, timeout_s: float) -> Compiled:
        ...

    def _refusals_as_errors(self, constraint: AnyConstraint, compile_fn: Callable[[], Compiled]) -> Compiled:
        try:
            return compile_fn()
        except ServeAppError:
            raise
        except Exception as error:  # backends raise plain errors (xgrammar: RuntimeError) for input they refuse
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConstraintError(f"{self.name} cannot compile this {constraint.type}: {first_line[:300]}",
                                  param=constraint.type, code="unsupported") from None


def regex_of(constraint: AnyConstraint) -> str:
    """A regex or choice constraint as one regex (the backends' common input)."""
    if isinstance(constraint, ChoiceConstraint):
        return constraint.as_regex()
    if isinstance(constraint, RegexConstraint):
        return constraint.pattern
    raise ConstraintError(f"{constraint.type} cannot be expressed as a regex", param=constraint.type)
