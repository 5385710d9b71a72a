"""What happens to one row around each sampled token, as an ordered list of small policies.

Before the token is appended, each policy may replace it or end the row; after it, each may end
the row. The decode loop only schedules; these decide. The order matters and is the one
`row_policies` builds: cancellation, a prelude (free text before the constraint applies, e.g. a
reasoning section: engine/prelude.py), closing (may force the completion's tokens), checks (may
refuse the token: the loop then samples again without it), the constraint (the matcher must
accept the token), end of sequence; then closing again (the completion is written out), the
checks' scan, stop strings, the token budget.

The constraint's mask is applied to the logits before sampling (`constraint_bitmask`, computed
in a worker thread while the model runs); penalties and the n-gram ban are in sampling.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serve_app.engine.backends import Matcher, bitmask_words
from serve_app.engine.sampling import logprob_entry
from serve_app.engine.stream import Stream

# A policy's verdict: the finish reason ("stop", "length", "cancelled"), CLOSED (stop, having
# closed JSON early), RETRY (a check refused the token: ban it there and sample again), or None.
CLOSED = "closed"
RETRY = "retry"


@dataclass
class TokenStep:
    stream: Stream
    token: int | None
    text: str | None = None  # the output's text with `token`, when a policy already decoded it
    logprobs: torch.Tensor | None = None  # the row's log-softmax, when it asked for logprobs


class RowPolicy:
    def before(self, step: TokenStep) -> str | None:
        return None

    def after(self, step: TokenStep) -> str | None:
        return None


class Cancellation(RowPolicy):
    def before(self, step: TokenStep) -> str | None:
        return "cancelled" if step.stream.cancelled.is_set() else None


class Closing(RowPolicy):
    """Keeps the sampled token while the output can still be closed within the budget; else
    forces the shortest valid completion (serve_app/engine/row_closing.py)."""

    def __init__(self, eos_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        self.eos_ids, self.decode = eos_ids, decode

    def before(self, step: TokenStep) -> str | None:
        row, out = step.stream.row, step.stream.output
        closer, matcher = row.closer, row.matcher
        if closer is None or matcher is None or step.token is None:
            return None
        if not closer.closed_early and step.token in self.eos_ids:
            return None
        text = self.decode(out.token_ids + [step.token])
        chosen = closer.choose(step.token, text, row.max_new_tokens - len(out.token_ids), matcher.accept)
        if chosen is None:  # already complete: stop here rather than grow past the budget
            return CLOSED
        step.token, step.text = chosen, text if chosen == step.token else None
        return None

    def after(self, step: TokenStep) -> str | None:
        closer = step.stream.row.closer
        return CLOSED if closer is not None and closer.closed_early and not closer.forced else None


class Checks(RowPolicy):
    """Refuses a token whose text closes a value that fails a keyword checked while generating
    (serve_app/constraints/checks.py); keeps the row's scan up to date with the tokens kept.
    A row being closed is not checked: its completion was validated whole."""

    def __init__(self, eos_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        self.eos_ids, self.decode = eos_ids, decode

    def before(self, step: TokenStep) -> str | None:
        row, out = step.stream.row, step.stream.output
        checker = row.checker
        if checker is None or step.token is None or (row.closer is not None and row.closer.closed_early):
            return None
        final = step.token in self.eos_ids
        if final:
            text = out.text
        else:
            text = step.text = step.text if step.text is not None else self.decode(out.token_ids + [step.token])
        violation = checker.trial(text, final=final)
        if violation is None:
            return None
        checker.stats.violations += 1
        checker.violation = violation
        return RETRY

    def after(self, step: TokenStep) -> str | None:
        row = step.stream.row
        if row.checker is not None and not (row.closer is not None and row.closer.closed_early):
            row.checker.commit(step.stream.output.text)
        return None


class MatcherPolicy(RowPolicy):
    """The constraint's matcher must accept the token (the mask allowed it; this advances the matcher)."""

    def __init__(self, eos_ids: set[int]) -> None:
        self.eos_ids = eos_ids

    def before(self, step: TokenStep) -> str | None:
        matcher = step.stream.row.matcher
        if step.token is None:
            return "length"  # the constraint allows nothing more: incomplete
        if matcher is not None and step.token not in self.eos_ids and not matcher.advance(step.token):
            return "length"
        return None


class EndOfSequence(RowPolicy):
    def __init__(self, eos_ids: set[int]) -> None:
        self.eos_ids = eos_ids

    def before(self, step: TokenStep) -> str | None:
        if step.token not in self.eos_ids:
            return None
        # Constrained: the matcher allowed EOS, so the output is complete.
        step.stream.output.accepted = step.stream.row.matcher is not None
        return "stop"


class StopStrings(RowPolicy):
    def after(self, step: TokenStep) -> str | None:
        out, stops = step.stream.output, step.stream.row.stop
        positions = [out.text.find(s) for s in stops if s and s in out.text]
        if not positions:
            return None
        out.text = out.text[:min(positions)]
        return "stop"


class Budget(RowPolicy):
    def after(self, step: TokenStep) -> str | None:
        return "length" if len(step.stream.output.token_ids) >= step.stream.row.max_new_tokens else None


def row_policies(eos_ids: set[int], decode: Callable[[list[int]], str]) -> list[RowPolicy]:
    from serve_app.engine.prelude import PreludePolicy  # it builds on this module

    closing = Closing(eos_ids, decode)
    return [Cancellation(), PreludePolicy(eos_ids), closing, Checks(eos_ids, decode), MatcherPolicy(eos_ids),
            EndOfSequence(eos_ids), StopStrings(), Budget()]


def advance_row(step: TokenStep, policies: list[RowPolicy], decode: Callable[[list[int]], str]) -> str | None:
    """Run one sampled token through the policies; the finish reason, or None to go on."""
    out = step.stream.output
    if step.stream.failure is not None:  # its mask could not be computed: this row fails alone
        raise step.stream.failure
    if out.first_token_s is None:
        out.first_token_s = time.perf_counter() - step.stream.submitted_at
    for policy in policies:
        verdict = policy.before(step)
        if verdict is not None:
            return verdict
    assert step.token is not None  # the constraint policy ends rows that have no token
    out.token_ids.append(step.token)
    if step.logprobs is not None and step.stream.row.logprobs is not None:
        out.logprobs.append(logprob_entry(step.logprobs, step.token, step.stream.row.logprobs))
    out.text = step.text if step.text is not None else decode(out.token_ids)
    for policy in policies:
        verdict = policy.after(step)
        if verdict is not None:
            return verdict
    step.stream.emit_text(final=False)
    return None


def constraint_bitmask(streams: list[Stream], vocab_size: int) -> torch.Tensor | None:
    """One int32 bitmask row per stream (all ones for unconstrained rows); None if no row is
    constrained. A row whose matcher fails is marked to fail alone when it advances."""
    if all(s.row.matcher is None for s in streams):
        return None
    width = bitmask_words(vocab_size)
    bitmask = torch.full((len(streams), width), -1, dtype=torch.int32)
    for i, stream in enumerate(streams):
        if stream.row.matcher is None:
            continue
        try:
            _fill_row(bitmask, i, stream.row.matcher, width)
        except Exception as error:  # noqa: BLE001 - the row fails when it advances, not the batch
            stream.failure = error
    return bitmask


def _fill_row(bitmask: torch.Tensor, i: int, matcher: Matcher, width: int) -> None:
    if matcher.width == width:
        matcher.fill_bitmask(bitmask, i)
        return
    # The backend's vocabulary is narrower or wider than the model's logits.
    scratch = torch.zeros((1, matcher.width), dtype=torch.int32)
    matcher.fill_bitmask(scratch, 0)
    bitmask[i] = 0
    n = min(width, matcher.width)
    bitmask[i, :n] = scratch[0, :n]
