"""Relaying a replica's event stream to the client as server-sent events, in either format
(OpenAI chunks or native events, api/streaming.py): the same lifecycle for both. Errors after the
200 has been sent are reported in the stream itself, in the error shape; whatever ends the
stream (done, an error, the client gone) cancels the generation."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from serve_app.api.errors import as_serve_app_error
from serve_app.generation import GenerationResult, TokenLogprobs

DONE = "data: [DONE]\n\n"


class StreamFormat(Protocol):
    """Each method returns the chunks to send (none, one or several)."""

    def start(self) -> list[dict[str, Any]]: ...

    def delta(self, index: int, text: str, logprobs: list[TokenLogprobs] | None = None) -> list[dict[str, Any]]: ...

    def reasoning(self, index: int, text: str) -> list[dict[str, Any]]: ...

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> list[dict[str, Any]]: ...


def sse(payload: dict[str, Any]) -> str:
    """One event; never `NaN`/`Infinity` (not JSON: clients' parsers reject them), written as null."""
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(payload), separators=(",", ":"), allow_nan=False)
    return f"data: {text}\n\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _chain(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


async def relay(first: dict[str, Any], stream: Any, fmt: StreamFormat,
                on_end: Callable[[list[GenerationResult]], None]) -> AsyncIterator[str]:
    """`first` is the stream's first event (already awaited, so that errors before any token
    were still a 4xx); `on_end` gets the finished rows' results, however the stream ends."""
    results: dict[int, GenerationResult] = {}
    try:
        for chunk in fmt.start():
            yield sse(chunk)
        async for event in _chain(first, stream):
            if "delta" in event:
                logprobs = event.get("logprobs")
                entries = None if logprobs is None else [TokenLogprobs.model_validate(e) for e in logprobs]
                for chunk in fmt.delta(event["index"], event["delta"], entries):
                    yield sse(chunk)
                continue
            if "reasoning" in event:
                for chunk in fmt.reasoning(event["index"], event["reasoning"]):
                    yield sse(chunk)
                continue
            results[event["index"]] = GenerationResult.model_validate(event["done"])
            for chunk in fmt.finish(event["index"], results[event["index"]], list(results.values())):
                yield sse(chunk)
        yield DONE
    except Exception as error:  # after the 200 has been sent: report in the stream itself
        yield sse(as_serve_app_error(error).to_dict())
    finally:
        stream.cancel()  # the client went away or we are done: stop generating
        on_end(list(results.values()))
