"""A sampled token through a row's policies when the row has checks: a token a check refuses is
banned at that position and the row samples again from the same logits, or (RowChecker's
escalation) writes the failing value again from an earlier token, banned there; with nothing left
at a position, the last token is taken back. Never before the failing value's parent.

How tokens are taken back is the engine's: our decode loop masks their KV-cache columns and feeds
the token before them again; vLLM cannot take a token back, so its steering ends the request and
resubmits the prompt with the tokens kept (engine/vllm_steering.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from serve_app.engine.policies import RETRY, RowPolicy, TokenStep, advance_row
from serve_app.engine.sampling import sample_tokens
from serve_app.engine.stream import Stream

# What advance_checked answers when it took tokens back (the row's next step samples anew).
TAKEN_BACK: Any = object()
TakeBack = Callable[[Stream, int], bool]  # (stream, tokens) -> whether they were taken back


def advance_checked(step: TokenStep, policies: list[RowPolicy], decode: Callable[[list[int]], str],
                    logits: torch.Tensor | None, generator: torch.Generator | None, take_back: TakeBack) -> Any:
    """The row's finish reason (None to go on, TAKEN_BACK after a rollback) for the sampled token."""
    stream = step.stream
    while True:
        verdict = advance_row(step, policies, decode)
        checker = stream.row.checker
        if checker is None or logits is None or generator is None:
            return verdict
        if verdict == RETRY:
            refused = step.token
        elif step.token is None and checker.banned(len(stream.output.token_ids)):
            refused = None  # checks banned everything the constraint allowed here
        else:
            return verdict
        token = retry(stream, refused, logits, generator, take_back)
        if token is TAKEN_BACK:
            return TAKEN_BACK
        if token is None:
            return "length"  # the checks' budget is spent, or nothing passes: ends honestly
        step = TokenStep(stream, token, logprobs=step.logprobs)


def retry(stream: Stream, refused: int | None, logits: torch.Tensor, generator: torch.Generator,
          take_back: TakeBack) -> Any:
    """A check refused `refused` at the row's next position (None: every token left there is
    refused): the token to try instead, TAKEN_BACK, or None when the checks' budget is spent or
    nothing is left to try."""
    row, out = stream.row, stream.output
    checker = row.checker
    assert checker is not None
    position, floor = len(out.token_ids), checker.rollback_floor
    if refused is not None:
        if not checker.refuse(position, refused):
            return None
        target = checker.escalation(position)
        if target is not None:
            if checker.refuse(target, *checker.rewrite_bans(target, out.token_ids)) and \
                    take_back(stream, position - target):
                return TAKEN_BACK
            checker.stats.exhausted = True
            return None
        logits[refused] = -torch.inf
        if row.closer is not None:
            row.closer.rewind(out.text)
        if bool(torch.isfinite(logits).any()):
            return sample_tokens(logits[None], [row], [generator])[0]
    if position == 0 or position - 1 < floor or not checker.refuse(position - 1, out.token_ids[-1]) \
            or not take_back(stream, 1):
        checker.stats.exhausted = True  # no output that passes is left to search for
        return None
    return TAKEN_BACK


def roll_back_row(stream: Stream, tokens: int, decode: Callable[[list[int]], str]) -> bool:
    """Undo a row's last `tokens` tokens in its own state: matcher, output, scan, closer. False
    (nothing changed) when the matcher cannot roll back that far."""
    row, out = stream.row, stream.output
    if row.matcher is not None:
        try:
            row.matcher.rollback(tokens)
        except Exception:  # noqa: BLE001 - a backend's bounded history: the row ends honestly instead
            return False
    del out.token_ids[len(out.token_ids) - tokens:]
    del out.logprobs[len(out.token_ids):]
    out.text = decode(out.token_ids)
    if row.checker is not None:
        row.checker.rewind(len(out.token_ids), out.text)
    if row.closer is not None:
        row.closer.rewind(out.text)
    return True


def count_checks(totals: Counter[str], stream: Stream) -> None:
    """Add a finished row's checks to an engine's totals (ReplicaStatus.checks)."""
    checker = stream.row.checker
    if checker is not None:
        stats = checker.stats
        totals.update(evaluated=stats.evaluated, violations=stats.violations, rollbacks=stats.rollbacks,
                      exhausted=int(stats.exhausted))
