"""Waiting until a URL answers 200 (an app's /readyz): `make serve`, the CLI, the job
entrypoint, the benchmarks and the tests all wait this one way."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

POLL_S = 1.0  # between probes
PROBE_TIMEOUT_S = 10  # one probe; a router busy starting can be slow to answer


class NotReadyError(TimeoutError):
    pass


def wait_until_ready(url: str, timeout_s: float, poll_s: float = POLL_S,
                     progress: Callable[[], str | None] | None = None) -> None:
    """`progress` (optional) is asked for a line between probes; each new line is printed."""
    deadline = time.monotonic() + timeout_s
    shown = None
    while time.monotonic() < deadline:
        if progress is not None:
            line = progress()
            if line and line != shown:
                print(line, flush=True)
                shown = line
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, reset, timed out, or an HTTP error status (503: not ready yet)
            pass
        time.sleep(poll_s)
    raise NotReadyError(f"{url} not ready after {timeout_s:.0f} s")
