"""Results as they stream: OpenAI chunks (chat and completions, tool calls sent whole once
validated) and the native /v1/generate events."""

from __future__ import annotations

import time
from typing import Any

from serve_app.api import tools as tooling
from serve_app.api.responses import chat_logprobs, chat_message, completion_logprobs, native_response, new_id, usage_of
from serve_app.constraints import Constraint
from serve_app.generation import (
    GenerationResult,
    TokenLogprobs,
)


class ChunkFormatter:
    """OpenAI streaming chunks for chat (``chat.completion.chunk``) or completions.

    Text is sent as it comes, except where it may be a tool call: under a forced tool_choice the
    call is sent whole as ``delta.tool_calls`` when the answer ends (it is validated first); under
    "auto", text that starts like a call is held back until the answer ends and sent as a call
    or as content."""

    def __init__(self, model: str, chat: bool, n: int, body: Any = None) -> None:
        self.model, self.chat, self.n, self.body = model, chat, n, body
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.include_usage = bool(body is not None and body.include_usage)
        forced = bool(chat and body is not None and body.forced_tools())
        self.auto = bool(chat and body is not None and body.auto_tools() and not body.constrained())
        self.holding = {i: forced or self.auto for i in range(n)}  # choice -> text held back for now
        self.held: dict[int, str] = {}
        self.held_logprobs: dict[int, list[TokenLogprobs]] = {}
        self.sent_logprobs: dict[int, int] = {}  # entries already sent per choice
        self.offsets: dict[int, int] = {}  # completions: characters already sent per choice

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, index: int, text: str | None, finish_reason: str | None,
                logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(logprobs) if logprobs else None}
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + len(text or "")
        return {"index": index, "text": text or "", "finish_reason": finish_reason,
                "logprobs": completion_logprobs(logprobs, offset) if logprobs else None}

    def start(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(self.n)])]

    def delta(self, index: int, text: str, logprobs: list[TokenLogprobs] | None = None) -> list[dict[str, Any]]:
        if self.holding[index]:
            self.held[index] = self.held.get(index, "") + text
            if logprobs:
                self.held_logprobs.setdefault(index, []).extend(logprobs)
            if not self.auto or tooling.could_become_call(self.held[index]):
                return []
            self.holding[index] = False  # plain text after all: send what was held
            text = self.held.pop(index)
            logprobs = self.held_logprobs.pop(index, []) if logprobs is not None else None
        if logprobs is not None:
            self.sent_logprobs[index] = self.sent_logprobs.get(index, 0) + len(logprobs)
        return [self._chunk([self._choice(index, text, None, logprobs)])]

    def reasoning(self, index: int, text: str) -> list[dict[str, Any]]:
        """A reasoning model's section, as it comes (vLLM's `delta.reasoning_content`)."""
        if not self.chat:
            return []
        return [self._chunk([{"index": index, "delta": {"reasoning_content": text}, "finish_reason": None,
                              "logprobs": None}])]

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> list[dict[str, Any]]:
        """A choice's last chunks; after the last choice, the usage chunk when it was asked for."""
        chunks = []
        finish_reason: str = result.finish_reason
        valid = result.valid
        rest = (result.logprobs or [])[self.sent_logprobs.get(index, 0):] if result.logprobs is not None else None
        message, answer_reason, answer_valid = chat_message(result, self.body) if self.chat else ({}, None, None)
        held = self.holding[index] or result.preamble is not None  # a started call is never streamed as text
        if held and message:
            finish_reason, valid = answer_reason or finish_reason, answer_valid
            unsent = message.get("content") if self.holding[index] else result.text
            if message.get("tool_calls"):
                if self.holding[index] and message.get("content"):  # text before the call
                    chunks.append(self._chunk([self._choice(index, message["content"], None)]))
                calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                chunks.append(self._chunk([{"index": index, "delta": {"tool_calls": calls}, "finish_reason": None,
                                            "logprobs": chat_logprobs(rest) if rest else None}]))
            elif unsent:
                chunks.append(self._chunk([self._choice(index, unsent, None, rest)]))
            rest = None
        choice = {**self._choice(index, None, finish_reason, rest), "valid": valid,
                  "closed_early": result.closed_early}
        chunks.append(self._chunk([choice]))
        if self.include_usage and len(done) == self.n:
            chunks.append(self._chunk([], usage=usage_of(done)))
        return chunks


class NativeEvents:
    """The native stream: ``{"delta": text}`` events, then ``{"done": <native response>}``."""

    def __init__(self, model: str, constraint: Constraint | None, started: float) -> None:
        self.model, self.constraint, self.started = model, constraint, started

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, text: str, logprobs: list[TokenLogprobs] | None = None) -> list[dict[str, Any]]:
        return [{"delta": text}]

    def reasoning(self, index: int, text: str) -> list[dict[str, Any]]:
        return [{"reasoning": text}]

    def finish(self, index: int, result: GenerationResult, done: list[GenerationResult]) -> list[dict[str, Any]]:
        return [{"done": native_response(self.model, result, self.constraint, time.perf_counter() - self.started)}]
