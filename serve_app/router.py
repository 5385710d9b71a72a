"""The HTTP ingress: validates requests, dispatches them to the right model's replicas.

It never imports torch or Outlines (a test checks this), so it starts fast and stays small.
Route handlers are thin: parse -> validate against the model's config -> dispatch -> shape.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import metrics as metrics_module
from serve_app.api import schemas
from serve_app.api.errors import as_serve_app_error, error_response
from serve_app.config import AppConfig, ModelConfig, ServerConfig
from serve_app.engine.cascade import plan_schema
from serve_app.engine.constraints import Constraint, JsonSchemaConstraint, check_limits
from serve_app.engine.types import GenerationRequest, GenerationResult
from serve_app.errors import (
    ConstraintError,
    LimitExceededError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    ServeAppError,
    UnauthorizedError,
)
from serve_app.metrics import RouterMetrics
from serve_app.registry import get_registry

app = FastAPI(title="serve_app", version="0.1.0")
REPLICA_ATTEMPTS = 2


@app.exception_handler(RequestValidationError)
@app.exception_handler(ServeAppError)
@app.exception_handler(Exception)
async def _error_handler(_: Request, error: Exception) -> JSONResponse:
    return error_response(error)


# Routes anyone may call: probes and the metrics scrape.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Guard:
    """API keys (``Authorization: Bearer``) and the request body size limit. Keys are compared in
    constant time and never logged or echoed."""

    def __init__(self, server: ServerConfig) -> None:
        from_env = os.environ.get(server.api_keys_env, "")
        self.keys = [k for k in [*server.api_keys, *from_env.split(",")] if k.strip()]
        self.max_body_bytes = server.max_body_bytes

    def check(self, path: str, headers: Any) -> None:
        if self.keys and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in self.keys):
                raise UnauthorizedError("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise self.too_large()

    def too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body over {self.max_body_bytes} bytes", code="max_body_bytes")


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Any:
    guard: Guard | None = getattr(request.app.state, "guard", None)
    if guard is not None:
        try:
            guard.check(request.url.path, request.headers)
            if request.method == "POST" and "content-length" not in request.headers:
                body = await request.body()  # chunked upload: count what actually arrived
                if len(body) > guard.max_body_bytes:
                    raise guard.too_large()
        except ServeAppError as error:
            return error_response(error)
    return await call_next(request)


@app.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Any:
    labels = {"model": "unknown"}
    metrics_module.REQUEST_LABELS.set(labels)
    response = await call_next(request)
    metrics: RouterMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None and request.url.path.startswith("/v1/") and request.method == "POST":
        metrics.requests.labels(labels["model"], request.url.path, str(response.status_code)).inc()
    return response


@app.exception_handler(StarletteHTTPException)
async def _http_error_handler(_: Request, error: StarletteHTTPException) -> JSONResponse:
    body = {"error": {"message": str(error.detail), "type": "not_found" if error.status_code == 404
                      else "invalid_request_error", "param": None, "code": str(error.status_code)}}
    return JSONResponse(body, status_code=error.status_code)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _chain(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


class ModelQueue:
    """A model's bounded queue at the router: requests accepted and not finished, and how fast
    they drain (completions per second over a recent window), for an honest Retry-After."""

    WINDOW_S = 30.0
    MAX_RETRY_AFTER_S = 60

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._done: deque[float] = deque(maxlen=1000)

    def drain_rate(self) -> float:
        now = time.monotonic()
        while self._done and now - self._done[0] > self.WINDOW_S:
            self._done.popleft()
        if len(self._done) < 2:
            return 0.0
        return len(self._done) / max(now - self._done[0], 1e-3)

    def retry_after_s(self) -> int:
        rate = self.drain_rate()
        if rate <= 0:
            return self.MAX_RETRY_AFTER_S // 6
        excess = self.pending - self.limit + 1
        return max(1, min(self.MAX_RETRY_AFTER_S, math.ceil(excess / rate)))

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


_PLANNED: OrderedDict[str, ConstraintError | None] = OrderedDict()  # schema -> its rejection, if any


def validate_for_model(model: ModelConfig, rows: list[GenerationRequest]) -> None:
    """What can be checked without the tokenizer: limits, keyword support, max_tokens."""
    constraint: Constraint | None = rows[0].constraint
    if constraint is not None:
        check_limits(constraint, model.limits)
        if isinstance(constraint, JsonSchemaConstraint) and constraint.strict:
            default = model.backends.json_schema
            order = [constraint.backend] if constraint.backend else \
                model.backends.cascade if default == "cascade" else [default]
            key = f"{','.join(order)}|{model.limits.max_ref_expansion}|{constraint.cache_key()}"
            if key not in _PLANNED:  # normalising a large schema takes milliseconds: once per schema
                plan = plan_schema(constraint.json_schema, order, model.limits.max_ref_expansion)
                _PLANNED[key] = None if plan.exact else plan.rejection()
                if len(_PLANNED) > 1024:
                    _PLANNED.popitem(last=False)
            rejection = _PLANNED[key]
            if rejection is not None:
                raise rejection
    max_new = rows[0].sampling.max_new_tokens
    if max_new is not None and max_new > model.limits.max_new_tokens:
        raise LimitExceededError(f"max_tokens {max_new} exceeds the limit of {model.limits.max_new_tokens} "
                                 f"for model {model.name}", param="max_tokens", code="max_new_tokens")


@serve.deployment(name="router", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.handles = handles
        self.app_name = serve.get_replica_context().app_name
        self.registry = get_registry()
        self.metrics = app.state.metrics = RouterMetrics()
        app.state.guard = Guard(self.config.server)
        self.queues = {m.name: ModelQueue(m.limits.max_pending_requests) for m in self.config.models}

    def model(self, name: str) -> ModelConfig:
        labels = metrics_module.REQUEST_LABELS.get(None)
        if labels is not None and name in self.queues:
            labels["model"] = name
        try:
            return self.config.model(name)
        except KeyError:
            known = ", ".join(m.name for m in self.config.models)
            raise ModelNotFoundError(f"model {name!r} not found; known models: {known}", param="model",
                                     code="model_not_found") from None

    def admit(self, model: ModelConfig, rows: list[GenerationRequest]) -> ModelQueue:
        """Validate, then take a place in the model's bounded queue (429 when it is full)."""
        validate_for_model(model, rows)
        queue = self.queues[model.name]
        queue.enter()
        self.metrics.pending.labels(model.name).set(queue.pending)
        return queue

    def leave(self, model: ModelConfig, queue: ModelQueue, results: list[GenerationResult]) -> None:
        queue.leave(finished=bool(results))
        self.metrics.pending.labels(model.name).set(queue.pending)
        for result in results:
            self.metrics.observe_result(model.name, result)

    async def dispatch(self, model: ModelConfig, rows: list[GenerationRequest]) -> list[GenerationResult]:
        queue = self.admit(model, rows)
        results: list[GenerationResult] = []
        try:
            payload = [row.model_dump(mode="json", by_alias=True) for row in rows]
            results = [GenerationResult.model_validate(r) for r in await self.call_replica(model, payload)]
            return results
        finally:  # also when the client disconnected and Serve cancelled this request
            self.leave(model, queue, results)

    async def call_replica(self, model: ModelConfig, payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A replica that dies under a request (killed, crashed) gets it retried once on another;
        a second failure is a 503 with Retry-After (see api/errors.py)."""
        from ray.exceptions import RayActorError

        for attempt in range(REPLICA_ATTEMPTS):
            try:
                return await self.handles[model.name].generate.remote(payload)
            except RayActorError:
                if attempt + 1 == REPLICA_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def open_stream(self, model: ModelConfig, rows: list[GenerationRequest]) -> tuple[Any, Any, ModelQueue]:
        """Start a replica stream and wait for its first event, so that errors raised before any
        token (prompt too long, a constraint that does not compile) still get a 4xx response."""
        queue = self.admit(model, rows)
        payload = [row.model_dump(mode="json", by_alias=True) for row in rows]
        stream = self.handles[model.name].options(stream=True).generate_stream.remote(payload)
        try:
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            self.leave(model, queue, [])
            raise
        return stream, first, queue

    async def openai_stream(self, model: ModelConfig, rows: list[GenerationRequest], chat: bool) -> StreamingResponse:
        stream, first, queue = await self.open_stream(model, rows)
        formatter = schemas.ChunkFormatter(model.name, chat, len(rows))

        async def chunks() -> AsyncIterator[str]:
            results: dict[int, GenerationResult] = {}
            try:
                for chunk in formatter.start():
                    yield _sse(chunk)
                async for event in _chain(first, stream):
                    if "delta" in event:
                        yield _sse(formatter.delta(event["index"], event["delta"]))
                        continue
                    results[event["index"]] = GenerationResult.model_validate(event["done"])
                    last = len(results) == len(rows)
                    usage = schemas.usage_of(list(results.values())) if last else None
                    yield _sse(formatter.finish(event["index"], results[event["index"]], usage))
                yield "data: [DONE]\n\n"
            except Exception as error:  # after the 200 has been sent: report in the stream itself
                yield _sse(as_serve_app_error(error).to_dict())
            finally:
                stream.cancel()  # the client went away or we are done: stop generating
                self.leave(model, queue, list(results.values()))

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: schemas.ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        model = self.model(body.model)
        if body.stream:
            return await self.openai_stream(model, body.generation_requests(), chat=True)
        results = await self.dispatch(model, body.generation_requests())
        return schemas.chat_completion_response(model.name, results)

    @app.post("/v1/completions", response_model=None)
    async def completions(self, body: schemas.CompletionRequest) -> dict[str, Any] | StreamingResponse:
        model = self.model(body.model)
        if body.stream:
            return await self.openai_stream(model, body.generation_requests(), chat=False)
        results = await self.dispatch(model, body.generation_requests())
        return schemas.completion_response(model.name, results)

    @app.post("/v1/generate", response_model=None)
    async def generate(self, body: schemas.NativeGenerateRequest) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        model = self.model(body.model)
        row = body.generation_request()
        if body.stream:
            return await self.native_stream(model, row, started)
        [result] = await self.dispatch(model, [row])
        return schemas.native_response(model.name, result, row.constraint, time.perf_counter() - started)

    async def native_stream(self, model: ModelConfig, row: GenerationRequest, started: float) -> StreamingResponse:
        stream, first, queue = await self.open_stream(model, [row])

        async def events() -> AsyncIterator[str]:
            results: list[GenerationResult] = []
            try:
                async for event in _chain(first, stream):
                    if "delta" in event:
                        yield _sse({"delta": event["delta"]})
                    else:
                        result = GenerationResult.model_validate(event["done"])
                        results.append(result)
                        elapsed = time.perf_counter() - started
                        yield _sse({"done": schemas.native_response(model.name, result, row.constraint, elapsed)})
                yield "data: [DONE]\n\n"
            except Exception as error:
                yield _sse(as_serve_app_error(error).to_dict())
            finally:
                stream.cancel()
                self.leave(model, queue, results)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "serve_app"} for m in self.config.models]}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        live = await self.registry.live.remote(self.app_name)
        counts = {m.name: sum(1 for r in live if r["model"] == m.name) for m in self.config.models}
        ready = all(counts.values())
        return JSONResponse({"ready": ready, "replicas": counts}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        live = await self.registry.live.remote(self.app_name)
        return Response(self.metrics.render(live), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/replicas")
    async def replicas(self) -> dict[str, Any]:
        live = await self.registry.live.remote(self.app_name)
        return {"replicas": sorted(live, key=lambda r: (r["model"], r["replica_id"]))}
