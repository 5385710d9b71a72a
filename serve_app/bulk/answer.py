"""Items -> result lines through one engine: the router's intake (api/intake.py) validates each
body exactly as the HTTP route does, the engine prepares and generates every row of a batch
together, and the route's own response builder shapes the answer. So a batch line gets the
status and body a POST of its `body` to its `url` gets, streams aside (a batch answers whole).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.api import request_models, responses, responses_api
from serve_app.api.errors import as_serve_app_error
from serve_app.api.intake import Intake, RequestChecker, as_sent
from serve_app.bulk.items import Item, result_line
from serve_app.config import AppConfig
from serve_app.engine.protocol import Engine
from serve_app.engine.requests import Submission
from serve_app.errors import ServeAppError
from serve_app.generation import GenerationResult

Shape = Callable[[str, list[GenerationResult], Any, Intake, float], dict[str, Any]]


def _chat(model: str, results: list[GenerationResult], body: Any, _: Intake, __: float) -> dict[str, Any]:
    return responses.chat_completion_response(model, results, body)


def _completion(model: str, results: list[GenerationResult], body: Any, _: Intake, __: float) -> dict[str, Any]:
    return responses.completion_response(model, results, body)


def _native(model: str, results: list[GenerationResult], _: Any, intake: Intake, took: float) -> dict[str, Any]:
    return responses.native_response(model, results[0], intake.rows[0].constraint, took)


def _response(model: str, results: list[GenerationResult], body: Any, _: Intake, __: float) -> dict[str, Any]:
    return responses_api.response_object(model, results[0], body)


ROUTES: dict[str, tuple[type[Any], Shape]] = {
    "/v1/chat/completions": (request_models.ChatCompletionRequest, _chat),
    "/v1/completions": (request_models.CompletionRequest, _completion),
    "/v1/generate": (request_models.NativeGenerateRequest, _native),
    "/v1/responses": (responses_api.ResponsesRequest, _response),
}


@dataclass
class Answer:
    """One result line and what the job's summary counts of it."""

    key: str
    line: dict[str, Any]
    status: int
    valid: bool | None = None
    tokens: int = 0

    def row(self) -> dict[str, Any]:
        """As a Ray Data row: no nulls (valid -1/0/1), the line as JSON text."""
        return {"key": self.key, "answer": json.dumps(self.line, ensure_ascii=False, allow_nan=False),
                "status": self.status, "valid": -1 if self.valid is None else int(self.valid), "tokens": self.tokens}


@dataclass
class Started:
    item: Item
    intake: Intake
    submissions: list[Submission] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def refusal(item: Item, error: BaseException) -> Answer:
    mapped = as_serve_app_error(error)
    return Answer(item.key, result_line(item, mapped.status_code, mapped.to_dict()), mapped.status_code)


class Answerer:
    """Answers items for the models of `config` whose engine it holds (one per engine actor)."""

    def __init__(self, config: AppConfig, engine: Engine) -> None:
        self.config, self.engine = config, engine
        self.checker = RequestChecker(config)

    def answer(self, items: list[Item]) -> list[Answer]:
        """Every item's rows join the engine's batch before the first is awaited."""
        started = [self.start(item) for item in items]
        return [s if isinstance(s, Answer) else self.finish(s) for s in started]

    def start(self, item: Item) -> Answer | Started:
        if item.error is not None:
            status, body = item.error
            return Answer(item.key, result_line(item, status, body), status)
        body_type, _ = ROUTES[item.url]
        body = {k: v for k, v in (item.body or {}).items() if k not in ("stream", "stream_options")}
        try:
            intake = self.checker.prepare_value(body, body_type)
        except ServeAppError as error:
            return refusal(item, error)
        if intake.model.name != self.engine.config.name:  # routed by model name: cannot happen
            return refusal(item, RuntimeError(f"item for {intake.model.name} reached {self.engine.config.name}"))
        started = Started(item, intake)
        try:
            prepared = [self.engine.prepare(row) for row in intake.rows]
        except ServeAppError as error:
            return refusal(item, as_sent(error, intake.body))
        started.submissions = [self.engine.submit_prepared(p, deltas=False) for p in prepared]
        return started

    def finish(self, started: Started) -> Answer:
        item, intake = started.item, started.intake
        try:
            results = [self.engine.result(s, s.stream.result()) for s in started.submissions]
        except Exception as error:  # noqa: BLE001 - a row failed in the engine: its line says so, the job goes on
            for submission in started.submissions:
                submission.stream.cancel()  # its other choices stop too
            return refusal(item, as_sent(error, intake.body) if isinstance(error, ServeAppError) else error)
        _, shape = ROUTES[item.url]
        body = shape(intake.model.name, results, intake.body, intake, time.perf_counter() - started.started)
        valids = [r.valid for r in results if r.valid is not None]
        return Answer(item.key, result_line(item, 200, body), 200, all(valids) if valids else None,
                      sum(r.usage.completion_tokens for r in results))
