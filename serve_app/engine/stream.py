"""A submitted row and its stream of events: what a caller holds while the decode loop works.

``Stream.events`` yields ``("delta", str)`` items (each after a ``("logprobs", entries)``
item when the row asked for logprobs) and one final ``("done", RowOutput)`` (or
``("error", exception)``); ``notify`` (optional) is called from the decode thread for each
event, e.g. to wake an asyncio loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from serve_app.constraints.row_checks import RowChecker
from serve_app.engine.backends import Matcher
from serve_app.engine.row_closing import RowCloser

if TYPE_CHECKING:
    from serve_app.engine.prelude import Parked, Prelude

# Decoded text that ends in U+FFFD is an incomplete UTF-8 sequence: hold it back from streams.
_PARTIAL = "\ufffd"


@dataclass
class Row:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    matcher: Matcher | None = None
    closer: RowCloser | None = None  # closes JSON before max_new_tokens runs out
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k alternatives
    checker: RowChecker | None = None  # keywords checked while generating (may take tokens back)
    logit_bias: dict[int, float] | None = None  # added to the logits before the constraint's mask
    # Free text before the constraint applies (a reasoning section, text before a tool call), in
    # order; the constraint's matcher, closer and checker wait in `parked` (engine/prelude.py).
    preludes: list[Prelude] = field(default_factory=list)
    parked: Parked | None = None
    quiet: bool = False  # the answer is not streamed as text (a tool call: sent whole at the end)

    @cached_property
    def prompt_token_set(self) -> frozenset[int]:
        return frozenset(self.prompt_ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "running"  # then "stop", "length" or "cancelled"
    first_token_s: float | None = None
    queue_s: float | None = None  # from submission to the row's first prefill
    total_s: float = 0.0
    accepted: bool = False  # ended on EOS while constrained: the matcher allowed EOS, so it accepts
    closed_early: bool = False  # the closer forced the shortest valid completion near the budget
    # Per token when the row asked: (token, logprob, [(alternative, logprob), ...]).
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    # What the preludes wrote (engine/prelude.py): their tokens left `token_ids` when they ended.
    reasoning: str | None = None
    preamble: str | None = None  # the text before a tool call the answer started
    prelude_tokens: int = 0
    reasoning_tokens: int = 0
    unconstrained: bool = False  # the constraint never applied (no call was started)


class Stream:
    """A submitted row: text deltas as they are generated, then the final output.

    ``events`` yields ``("delta", str)`` items and one final ``("done", RowOutput)`` (or
    ``("error", exception)``). ``notify`` (optional) is called from the decode thread for each
    event, e.g. to wake an asyncio loop."""

    def __init__(self, row: Row, notify: Callable[[tuple[str, Any]], None] | None = None,
                 deltas: bool = True) -> None:
        self.row = row
        self.deltas = deltas  # False: no ("delta", text) events until the final one
        self.output = RowOutput()
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._notify = notify
        self._sent = 0  # characters of text already emitted as deltas
        self._sent_logprobs = 0  # entries of output.logprobs already emitted
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.failure: Exception | None = None  # set where computing this row's mask failed
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def context_ids(self) -> list[int]:
        """What a (re-)prefill feeds: the prompt and every token generated so far. A row
        preempted on out-of-memory resumes from here with its matcher state intact."""
        return self.row.prompt_ids + self.output.token_ids

    def emit(self, kind: str, value: Any) -> None:
        self.events.put((kind, value))
        if self._notify is not None:
            self._notify((kind, value))
        if kind in ("done", "error"):
            self.done.set()

    def emit_text(self, final: bool) -> None:
        """Emit new text, holding back what a stop string or a partial character may change."""
        if self.row.preludes:
            from serve_app.engine.prelude import emit_prelude, settle

            if final:
                settle(self)
            else:
                emit_prelude(self)
                return
        if self.row.quiet or (not final and not self.deltas):
            return
        text = self.output.text
        hold = 0 if final else max((len(s) - 1 for s in self.row.stop if s), default=0)
        end = len(text) - hold
        settled = len(self.output.logprobs)
        if not final and self.row.checker is not None:  # what a check may still take back is held
            end, settled = min(end, self.row.checker.settled_chars()), min(settled, self.row.checker.floor())
        while not final and end > self._sent and text[end - 1] == _PARTIAL:
            end -= 1
        if end > self._sent:
            if self.row.logprobs is not None:  # the entries so far, just before the text they go with
                entries = self.output.logprobs[self._sent_logprobs:settled]
                self._sent_logprobs += len(entries)
                self.emit("logprobs", entries)
            self.emit("delta", text[self._sent:end])
            self._sent = end

    def sent(self, chars: int) -> None:
        """`chars` characters of the text in `output.text` are out (a prelude's text, once it ended)."""
        self._sent, self._sent_logprobs = chars, 0

    def result(self, timeout: float | None = None) -> RowOutput:
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        while True:
            kind, value = self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


