"""Finished results as HTTP responses: OpenAI chat and completion objects (messages, tool calls,
logprobs, usage) and the native /v1/generate answer."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from serve_app.api import tools as tooling
from serve_app.api.request_models import ChatCompletionRequest
from serve_app.constraints import Constraint, JsonSchemaConstraint
from serve_app.generation import (
    GenerationResult,
    TokenLogprobs,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(results: list[GenerationResult]) -> dict[str, Any]:
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    reasoning = sum(r.usage.reasoning_tokens for r in results)
    details = {"completion_tokens_details": {"reasoning_tokens": reasoning}} if reasoning else {}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, **details}


def chat_completion_response(model: str, results: list[GenerationResult],
                             body: ChatCompletionRequest | None = None) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        message, finish_reason, valid = chat_message(r, body)
        choices.append({"index": i, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(r.logprobs), "valid": valid, "closed_early": r.closed_early})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_of(results)}


def chat_message(result: GenerationResult,
                 body: ChatCompletionRequest | None) -> tuple[dict[str, Any], str, bool | None]:
    """The assistant message, finish_reason and `valid` of one answer: a tool call where the
    request forced one (and the answer finished valid) or allowed one (and the text is a call of
    an offered tool whose arguments validate); otherwise the text as content."""
    text, finish_reason, valid = result.text, result.finish_reason, result.valid
    reasoning = {"reasoning_content": result.reasoning} if result.reasoning is not None else {}
    call, content = None, None
    if body is not None and body.forced_tools() and finish_reason == "stop" and valid:
        call = tooling.forced_call(text)
    elif result.preamble is not None:  # "auto": the answer started a call, generated under the tools' schema
        call = tooling.forced_call(text) if finish_reason == "stop" and valid else None
        content = result.preamble if call is None or result.preamble.strip() else None
        text = result.preamble + text
    elif body is not None and body.auto_tools() and not body.constrained():
        call, valid = tooling.detect_call(text, body.auto_tools() or [])
        if call is not None and not valid:
            call = None  # a malformed call stays text, flagged invalid
    if call is not None:
        return {"role": "assistant", "content": content, "tool_calls": [call], **reasoning}, "tool_calls", valid
    return {"role": "assistant", "content": text, **reasoning}, finish_reason, valid


def chat_logprobs(entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {"content": [e.model_dump() for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprobs] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape; text_offset counts from the start of the output."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries], "text_offset": offsets}


def completion_response(model: str, results: list[GenerationResult], body: Any = None) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                     "logprobs": completion_logprobs(r.logprobs), "valid": r.valid, "closed_early": r.closed_early}
                    for i, r in enumerate(results)],
        "usage": usage_of(results),
    }


def native_response(model: str, result: GenerationResult, constraint: Constraint | None,
                    router_s: float) -> dict[str, Any]:
    parsed = None
    if isinstance(constraint, JsonSchemaConstraint) and result.valid:
        parsed = result.parsed()
        if not _finite(parsed):  # e.g. 1e999: valid JSON, but no float holds it (`text` has it exactly)
            parsed = None
    return {
        "id": new_id("gen"), "model": model, "text": result.text, "parsed": parsed, "reasoning": result.reasoning,
        "finish_reason": result.finish_reason, "valid": result.valid,
        # Honest truncation: output cut by max_tokens is never presented as valid or parsed.
        "truncated": result.finish_reason == "length", "closed_early": result.closed_early,
        "constraint_type": constraint.type if constraint else None, "backend": result.backend,
        "approximated": result.approximated, "rewrites": result.rewrites, "checks": result.checks,
        "usage": result.usage.model_dump(), "timings": {**result.timings, "router_total_s": router_s},
        "served_by": result.served_by,
    }


def _finite(value: Any) -> bool:
    """Whether a parsed JSON value can be written back as JSON (no number overflowed to inf)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True
