"""Free text before a row's constraint applies: a reasoning model's section (`<think>...</think>`),
or under tool_choice "auto" whatever the answer says before it starts a call.

A row with preludes starts with its constraint's matcher, closer and checker parked: it samples
freely, and its text streams as reasoning (or as content) while the prelude lasts. The prelude
ends when its end marker has been written (matched on the tokens, or on the text for a marker the
tokenizer spells in pieces); its tokens then become part of the row's context, its text becomes
`reasoning` (or `preamble`), and the constraint starts from an empty output with what is left of
the budget. The same policy runs in our decode loop and inside vLLM's sampler.

- reasoning: after its budget (or where the model would end the sequence) its end marker is
  forced, so a constrained answer always has room; the budget leaves the answer's fewest tokens.
- a call: with a marker (`<tool_call>`), text before it is content and the call after it is
  generated under the tools' schema; without one, the first token decides: the mask allows the
  call's first tokens and every token that cannot start a JSON object, so an answer that opens
  with `{` is a call under the schema from its first byte, and any other is text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.config import ModelConfig
from serve_app.constraints.row_checks import RowChecker
from serve_app.engine.backends import Matcher
from serve_app.engine.policies import RowPolicy, TokenStep
from serve_app.engine.row_closing import RowCloser
from serve_app.engine.stream import Row, Stream
from serve_app.errors import InvalidRequestError
from serve_app.generation import GenerationRequest

REASONING, CALL = "reasoning", "call"


@dataclass
class Parked:
    """The constraint's per-row state while a prelude runs."""

    matcher: Matcher | None
    closer: RowCloser | None
    checker: RowChecker | None


@dataclass
class Prelude:
    kind: str  # REASONING (its text is reasoning_content) or CALL (its text is content before a call)
    end: str  # the marker that ends it; "" for a call decided by its first token
    end_ids: list[int]  # the marker's tokens (what is forced)
    start: str = ""  # a marker removed from the front of its text
    budget: int | None = None  # tokens before the end marker is forced
    force_end: bool = False  # end-of-sequence is replaced by the end marker (an answer must follow)
    first_token: FirstToken | None = None  # CALL without a marker
    forcing: list[int] = field(default_factory=list)  # marker tokens still to write
    sent: int = 0  # characters of its visible text already streamed

    @property
    def event(self) -> str:
        return "reasoning" if self.kind == REASONING else "delta"

    def visible(self, text: str) -> str:
        """The text as streamed: a leading start marker (and the space after it) left out."""
        if not self.start:
            return text
        body = text.lstrip()
        if body.startswith(self.start):
            return body[len(self.start):].lstrip()
        return "" if self.start.startswith(body) else text


class FirstToken:
    """The first token of an answer that may be a call: the call's own first tokens, or any token
    that cannot open a JSON object (`free`, a bitmask in the matcher's width)."""

    def __init__(self, inner: Matcher, free: torch.Tensor) -> None:
        self.inner, self.free, self.width = inner, free, inner.width

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.inner.fill_bitmask(bitmask, row)
        bitmask[row, :self.free.numel()] |= self.free

    def is_call(self, token: int) -> bool:
        return not bool((int(self.free[token // 32]) >> (token % 32)) & 1)

    def advance(self, token: int) -> bool:
        return self.inner.advance(token)

    def accept(self, tokens: list[int]) -> bool:
        return self.inner.accept(tokens)

    def is_terminated(self) -> bool:
        return False

    def rollback(self, tokens: int) -> None:
        self.inner.rollback(tokens)


def free_first_tokens(token_texts: list[str], eos_ids: set[int], width: int) -> torch.Tensor:
    """The bitmask (`width` int32 words) of tokens that cannot open a JSON object: text that does
    not start with `{` once leading space is dropped, and end of sequence. Whitespace alone is not
    free: it may precede a `{`."""
    bits = torch.zeros(width * 32, dtype=torch.int64)
    for token, text in enumerate(token_texts[:width * 32]):
        body = text.lstrip()
        if (body and not body.startswith("{")) or token in eos_ids:
            bits[token] = 1
    words = (bits.view(width, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


class PreludePolicy(RowPolicy):
    """Forces a prelude's end marker when due, and ends the prelude once the marker is written."""

    def __init__(self, eos_ids: set[int]) -> None:
        self.eos_ids = eos_ids

    def before(self, step: TokenStep) -> str | None:
        stream = step.stream
        if not stream.row.preludes or step.token is None:
            return None
        prelude, out = stream.row.preludes[0], stream.output
        if prelude.first_token is not None:
            _decide(stream, prelude, step.token)
            return None
        due = prelude.budget is not None and len(out.token_ids) >= prelude.budget
        if not prelude.forcing and prelude.force_end and (due or step.token in self.eos_ids):
            prelude.forcing = list(prelude.end_ids)
        if prelude.forcing:
            step.token, step.text = prelude.forcing.pop(0), None
        return None

    def after(self, step: TokenStep) -> str | None:
        stream = step.stream
        if not stream.row.preludes:
            return None
        prelude, out = stream.row.preludes[0], stream.output
        if prelude.forcing or prelude.first_token is not None:
            return None
        ids = prelude.end_ids
        if (ids and out.token_ids[-len(ids):] == ids) or (prelude.end and prelude.end in out.text):
            end_prelude(stream, prelude)
        return None


def _decide(stream: Stream, prelude: Prelude, token: int) -> None:
    """A call without a marker: the first token says whether the answer is one."""
    assert prelude.first_token is not None
    row = stream.row
    if prelude.first_token.is_call(token):
        row.matcher = prelude.first_token.inner
        prelude.first_token = None
        end_prelude(stream, prelude)
    else:  # text: the constraint never applies
        row.preludes.clear()
        row.matcher, row.parked = None, None
        stream.output.unconstrained = True


def end_prelude(stream: Stream, prelude: Prelude) -> None:
    """The prelude is over: its tokens join the context, its text is kept, and the next prelude or
    the constraint starts from an empty output with the budget that is left."""
    row, out = stream.row, stream.output
    body = prelude.visible(out.text)
    if prelude.end and prelude.end in body:
        body = body[:body.index(prelude.end)]
    _flush(stream, prelude, body)
    if prelude.kind == REASONING:
        out.reasoning, out.reasoning_tokens = (out.reasoning or "") + body, out.reasoning_tokens + len(out.token_ids)
    else:
        out.preamble, row.quiet = body, True
    out.prelude_tokens += len(out.token_ids)
    row.prompt_ids = row.prompt_ids + out.token_ids
    row.__dict__.pop("prompt_token_set", None)  # a cached property of the old prompt
    row.max_new_tokens -= len(out.token_ids)
    out.token_ids, out.text, out.logprobs = [], "", []
    stream.sent(0)
    row.preludes.pop(0)
    if row.preludes:
        row.matcher = row.preludes[0].first_token
        return
    if row.parked is not None:
        row.matcher = row.matcher or row.parked.matcher
        row.closer, row.checker, row.parked = row.parked.closer, row.parked.checker, None


def emit_prelude(stream: Stream) -> None:
    """Stream the open prelude's text, holding back what may be the start of its end marker."""
    prelude = stream.row.preludes[0]
    if not stream.deltas or prelude.first_token is not None:
        return
    text = prelude.visible(stream.output.text)
    end = len(text) - max(0, len(prelude.end) - 1)
    while end > prelude.sent and text[end - 1] == "\ufffd":  # a character still being spelled
        end -= 1
    if end > prelude.sent:
        stream.emit(prelude.event, text[prelude.sent:end])
        prelude.sent = end


def _flush(stream: Stream, prelude: Prelude, body: str) -> None:
    if stream.deltas and len(body) > prelude.sent:
        stream.emit(prelude.event, body[prelude.sent:])
    prelude.sent = len(body)


def settle(stream: Stream) -> None:
    """The row finished inside a prelude: a reasoning section is all reasoning (no answer); text
    where a call could have started is the whole answer, unconstrained."""
    row = stream.row
    prelude = row.preludes[0]
    if prelude.kind == REASONING:
        end_prelude(stream, prelude)
        stream.output.unconstrained = bool(row.preludes)  # a call that never started
        row.preludes.clear()
        row.quiet = False
        return
    stream.sent(prelude.sent)  # the answer's text, streamed so far as the prelude's
    row.preludes.clear()
    row.matcher, row.parked = None, None
    stream.output.unconstrained = True


class PreludeMaker:
    """An engine's preludes for a prepared row: what its config, chat template and tokenizer say."""

    def __init__(self, tokenizer: Any, config: ModelConfig, eos_ids: set[int]) -> None:
        self.tokenizer, self.config, self.eos_ids = tokenizer, config, eos_ids
        template = str(getattr(tokenizer, "chat_template", None) or "")
        reasoning = config.reasoning
        self.reasons = reasoning.enabled is True or (reasoning.enabled == "auto" and reasoning.start in template
                                                     and reasoning.end in template)
        marker = config.tool_calls.marker
        self.call_marker = ("<tool_call>" if "<tool_call>" in template else None) if marker == "auto" else marker
        self._free: dict[int, torch.Tensor] = {}

    def make(self, request: GenerationRequest, prompt_ids: list[int], max_new: int,
             enforcement_min: int | None, constrained: bool) -> list[Prelude]:
        """The row's preludes, in order (none for most rows). `enforcement_min`: the fewest tokens
        of the constraint's output; `constrained`: the row has a constraint."""
        preludes = []
        if request.messages is not None and self.reasons and not self._closed_in(prompt_ids):
            preludes.append(self._reasoning(request, max_new, enforcement_min, constrained))
        if request.tool_call_auto and constrained:
            preludes.append(Prelude(CALL, self.call_marker or "", self._ids(self.call_marker or "")))
        return preludes

    def first_token(self, matcher: Matcher) -> FirstToken:
        if matcher.width not in self._free:
            texts = [str(self.tokenizer.decode([i])) for i in range(min(len(self.tokenizer), matcher.width * 32))]
            self._free[matcher.width] = free_first_tokens(texts, self.eos_ids, matcher.width)
        return FirstToken(matcher, self._free[matcher.width])

    def _reasoning(self, request: GenerationRequest, max_new: int, least: int | None, constrained: bool) -> Prelude:
        reasoning = self.config.reasoning
        end_ids = self._ids(reasoning.end)
        asked = request.sampling.max_reasoning_tokens
        asked = reasoning.max_tokens if asked is None else asked
        if not constrained and asked is None:
            return Prelude(REASONING, reasoning.end, end_ids, reasoning.start)
        room = max_new - ((least or 1) if constrained else 0) - len(end_ids)
        if room < 0:
            raise InvalidRequestError(
                f"max_tokens {max_new} is too small for a reasoning section and its answer: its end marker "
                f"({len(end_ids)} token{'s' * (len(end_ids) != 1)}) and the answer's shortest valid output "
                f"({least or 1})", param="max_tokens",
                code="max_tokens_too_small")
        budget = room if asked is None else min(asked, room)
        return Prelude(REASONING, reasoning.end, end_ids, reasoning.start, budget=budget, force_end=True)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _closed_in(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt itself opened and closed the section (Qwen3's enable_thinking: false)."""
        tail = str(self.tokenizer.decode(prompt_ids[-64:], skip_special_tokens=False))
        start = tail.rfind(self.config.reasoning.start)
        return start >= 0 and self.config.reasoning.end in tail[start:]


def park(row: Row, preludes: list[Prelude], maker: PreludeMaker) -> None:
    """Start `row` in its preludes: its constraint's state waits until they end."""
    if not preludes:
        return
    row.preludes = preludes
    row.parked = Parked(row.matcher, row.closer, row.checker)
    row.matcher = row.closer = row.checker = None
    first = preludes[0]
    if first.kind == CALL and not first.end and row.parked.matcher is not None:
        first.first_token = maker.first_token(row.parked.matcher)
        row.matcher = first.first_token
    for later in preludes[1:]:
        if later.kind == CALL and not later.end and row.parked.matcher is not None:
            later.first_token = maker.first_token(row.parked.matcher)
