"""Closing a row's JSON before its token budget runs out: the per-row state over a shared
`JsonCloser` (serve_app/constraints/json_completion.py), and the shortest spelling of a completion in
tokens. Pure Python over text and a tokenizer: no torch."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from serve_app.constraints.json_completion import JsonCloser, Stack

logger = logging.getLogger(__name__)

# With the distance unknown (e.g. inside a string with a pattern), keep this many tokens spare
# beyond the last known distance before closing.
UNKNOWN_SLACK = 24
# Texts whose shortest spelling an encoder remembers, each at most this long (10 MB at most in all).
ENCODED_TEXTS = 2048
REMEMBERED_CHARS = 512
# A character takes at most this many more byte tokens once its first byte is out (UTF-8).
MAX_CONTINUATION_BYTES = 3


class RowCloser:
    """One row's closing state. For each sampled token, `choose` keeps it if the output can
    still be closed within the budget afterwards, or starts forcing the completion of the
    output so far (whose distance fit the budget one step earlier)."""

    def __init__(self, closer: JsonCloser) -> None:
        self.closer = closer
        self.stack: Stack | None = closer.start
        self.text = ""
        self.plan = closer.min_text
        self.plan_tokens = closer.min_ids
        self.last_known = len(self.plan_tokens or [])
        self.forced: list[int] = []
        self.closed_early = False
        self.gave_up = self.plan is None
        self.partial = 0  # tokens since the output last ended on a whole character

    def choose(self, token: int, text_after: str, remaining: int,
               accepts: Callable[[list[int]], bool]) -> int | None:
        """The token to emit instead of `token` (`remaining`: tokens left including this one);
        None when the output is already complete and should stop here."""
        if self.closed_early:
            return self.forced.pop(0) if self.forced else None
        if self.gave_up:
            return token
        closer = self.closer
        if self.stack is not None and text_after.startswith(self.text):
            stack = closer.feed(self.stack, text_after[len(self.text):])
        else:
            stack = closer.feed(closer.start, text_after)
        # A token can end inside a multi-byte character (decoded as U+FFFD): nothing closes that
        # until the character is whole, and its completion is then about the one before it. A
        # character is begun only with room to finish it and close.
        partial = text_after.endswith("\ufffd")
        plan = None if partial else closer.completion(stack)
        plan_tokens = closer.encode(plan) if plan is not None else None
        if plan_tokens is not None and len(plan_tokens) <= remaining - 1:
            keep = True
        elif partial:
            keep = remaining - 1 >= self.last_known + max(0, MAX_CONTINUATION_BYTES - self.partial)
        else:
            keep = plan_tokens is None and remaining - 1 >= self.last_known + UNKNOWN_SLACK
        if keep:
            self.partial = self.partial + 1 if partial else 0
            self.stack, self.text, self.plan, self.plan_tokens = stack, text_after, plan, plan_tokens
            if plan_tokens is not None:
                self.last_known = len(plan_tokens)
            return token
        return self._close_now(token, remaining, accepts)

    def rewind(self, text: str) -> None:
        """The output is `text` again (a check refused a token this state had already read, or took
        tokens back): recompute the position and the completion from it."""
        if self.closed_early or self.gave_up:
            return
        closer = self.closer
        self.stack = closer.feed(closer.start, text) if text else closer.start
        self.text = text
        self.partial = 1 if text.endswith("\ufffd") else 0
        self.plan = None if text.endswith("\ufffd") else closer.completion(self.stack)
        self.plan_tokens = closer.encode(self.plan) if self.plan is not None else None
        if self.plan_tokens is not None:
            self.last_known = len(self.plan_tokens)

    def _close_now(self, token: int, remaining: int, accepts: Callable[[list[int]], bool]) -> int | None:
        plan, tokens = self.plan, self.plan_tokens or []
        reason = "no completion is known here" if plan is None or self.plan_tokens is None else \
            "the completion does not fit" if len(tokens) > remaining else \
            "the completed output would not validate" if not self._valid(self.text + plan) else \
            "the matcher rejects the completion" if not accepts(tokens) else None
        if reason is not None:
            logger.debug("closing gave up: %s (output so far ends %r, completion %r)", reason, self.text[-40:], plan)
            self.gave_up = True  # cannot prove a valid close: go on freely, end honestly
            return token
        self.closed_early = True
        self.forced = list(tokens)
        return self.forced.pop(0) if self.forced else None

    def _valid(self, text: str) -> bool:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        try:
            return bool(self.closer.whole_validator.is_valid(value))
        except Exception:  # noqa: BLE001 - a pattern not decided in time: not offered as valid
            return False


class ShortestEncoder:
    """Text to the fewest tokens that spell it (dynamic programming over the vocabulary), so a
    forced completion spends as little budget as possible. The tokenizer's own encoding is the
    fallback whenever the shortest spelling does not decode back to the text."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.pieces: dict[str, int] = {}
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id in range(min(vocab_size, len(tokenizer))):
            if token_id in special:
                continue
            text = tokenizer.decode([token_id])
            if text and "\ufffd" not in text:
                self.pieces.setdefault(text, token_id)
        self.longest = max((len(p) for p in self.pieces), default=1)
        # A row's completion is often the one it had a token ago (the same closing tail while a
        # string value grows): bench-peers' schemas mix asks for 521 distinct texts in 2,014 calls.
        self._spelled = functools.lru_cache(maxsize=ENCODED_TEXTS)(self._spell)

    def __call__(self, text: str) -> list[int]:
        return list(self._spelled(text)) if len(text) <= REMEMBERED_CHARS else self._shortest(text)

    def _spell(self, text: str) -> tuple[int, ...]:
        return tuple(self._shortest(text))

    def _shortest(self, text: str) -> list[int]:
        n = len(text)
        best: list[tuple[int, int, int] | None] = [None] * (n + 1)  # (count, previous end, token)
        best[0] = (0, -1, -1)
        for start in range(n):
            here = best[start]
            if here is None:
                continue
            for end in range(start + 1, min(n, start + self.longest) + 1):
                token = self.pieces.get(text[start:end])
                if token is not None and (best[end] is None or best[end][0] > here[0] + 1):  # type: ignore[index]
                    best[end] = (here[0] + 1, start, token)
        if best[n] is None:
            return self._fallback(text)
        ids: list[int] = []
        end = n
        while end > 0:
            _, start, token = best[end]  # type: ignore[misc]
            ids.append(token)
            end = start
        ids.reverse()
        return ids if self.tokenizer.decode(ids) == text else self._fallback(text)

    def _fallback(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
