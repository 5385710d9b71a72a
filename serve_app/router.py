"""The HTTP ingress: validates requests, dispatches them to the right model's replicas.

It never imports torch or Outlines (a test checks this), so it starts fast and stays small.
Route handlers are thin: parse -> validate against the model's config -> dispatch -> shape.
"""

# No `from __future__ import annotations` here: Serve re-creates the route handlers in the
# replica from a pickle that keeps only the globals their code uses, so a string annotation such
# as "Request" could not be resolved there and FastAPI would take it for a query parameter.
import asyncio
import json
import math
import time
from collections import deque
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
from serve_app.api.intake import Intake, RequestChecker
from serve_app.config import AppConfig, ModelConfig
from serve_app.engine.types import GenerationRequest, GenerationResult
from serve_app.errors import QueueFullError, ServeAppError
from serve_app.guard import Guard, GuardMiddleware
from serve_app.metrics import UNKNOWN_ROUTE, RouterMetrics
from serve_app.registry import get_registry

app = FastAPI(title="serve_app", version="0.1.0")
REPLICA_ATTEMPTS = 2


@app.exception_handler(RequestValidationError)
@app.exception_handler(ServeAppError)
@app.exception_handler(Exception)
async def _error_handler(_: Request, error: Exception) -> JSONResponse:
    return error_response(error)


# Keys and the body limit come before anything reads the request; counting wraps them (a 401 counts).
app.add_middleware(GuardMiddleware, respond=error_response)


@app.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Any:
    labels = {"model": "unknown"}
    metrics_module.REQUEST_LABELS.set(labels)
    response = await call_next(request)
    metrics: RouterMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        # The route's template, never the raw path: a client must not be able to add series.
        route = getattr(request.scope.get("route"), "path", None) or UNKNOWN_ROUTE
        metrics.requests.labels(labels["model"], route, str(response.status_code)).inc()
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
        self.checker = RequestChecker(self.config)
        self.queues = {m.name: ModelQueue(m.limits.max_pending_requests) for m in self.config.models}

    async def intake(self, request: Request, body_type: type[Any]) -> Intake:
        """Parse and validate in a worker thread: a large or hostile body never holds the event
        loop (other requests, /healthz) while it is checked."""
        raw = await request.body()  # already read, and bounded, by the guard
        intake = await asyncio.to_thread(self.checker.prepare, raw, body_type)
        labels = metrics_module.REQUEST_LABELS.get(None)
        if labels is not None:
            labels["model"] = intake.model.name
        return intake

    def admit(self, model: ModelConfig) -> ModelQueue:
        """Take a place in the model's bounded queue (429 when it is full)."""
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
        queue = self.admit(model)
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
        queue = self.admit(model)
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
    async def chat_completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        intake = await self.intake(request, schemas.ChatCompletionRequest)
        if intake.body.stream:
            return await self.openai_stream(intake.model, intake.rows, chat=True)
        results = await self.dispatch(intake.model, intake.rows)
        return schemas.chat_completion_response(intake.model.name, results)

    @app.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        intake = await self.intake(request, schemas.CompletionRequest)
        if intake.body.stream:
            return await self.openai_stream(intake.model, intake.rows, chat=False)
        results = await self.dispatch(intake.model, intake.rows)
        return schemas.completion_response(intake.model.name, results)

    @app.post("/v1/generate", response_model=None)
    async def generate(self, request: Request) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        intake = await self.intake(request, schemas.NativeGenerateRequest)
        model, [row] = intake.model, intake.rows
        if intake.body.stream:
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
