"""A model's bounded queue at the router: requests accepted and not finished, and how fast they
drain, for an honest Retry-After on the 429 it answers when full."""

from __future__ import annotations

import math
import time
from collections import deque

from serve_app.errors import QueueFullError

# Completions counted for the drain rate: the last 30 s (recent enough to follow load changes).
WINDOW_S = 30.0
# Retry-After stays within a minute; with no completions to measure, 10 s.
MAX_RETRY_AFTER_S = 60
UNKNOWN_RETRY_AFTER_S = 10
_RECENT = 1000  # completions remembered (more than a window's worth on one router)


class ModelQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._done: deque[float] = deque(maxlen=_RECENT)

    def drain_rate(self) -> float:
        """Completions per second over the window."""
        now = time.monotonic()
        while self._done and now - self._done[0] > WINDOW_S:
            self._done.popleft()
        if len(self._done) < 2:
            return 0.0
        return len(self._done) / max(now - self._done[0], 1e-3)

    def retry_after_s(self) -> int:
        rate = self.drain_rate()
        if rate <= 0:
            return UNKNOWN_RETRY_AFTER_S
        excess = self.pending - self.limit + 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

    def enter(self) -> None:
        if self.pending >= self.limit:
            retry = self.retry_after_s()
            raise QueueFullError(f"the queue for this model is full ({self.pending} requests pending, limit "
                                 f"{self.limit}); retry after {retry} s", retry_after_s=retry, code="queue_full")
        self.pending += 1

    def leave(self, finished: bool) -> None:
        self.pending -= 1
        if finished:
            self._done.append(time.monotonic())
