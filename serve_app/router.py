"""The HTTP ingress: thin routes over the guard (guard.py), the intake that validates off the
event loop (api/intake.py), each model's bounded queue (model_queue.py) and the stream relay
(relay.py). Route handlers read: intake -> dispatch or stream -> shape the response.

It never imports torch, a backend or the decode loop (a test checks this), so it starts fast
and stays small.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (a handler's `request: Request` must be the class, not a string, or it becomes a query parameter).
import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api import request_models, responses, responses_api, streaming
from serve_app.api.errors import error_response
from serve_app.api.intake import Intake, RequestChecker, as_sent
from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import ModelNotFoundError, ServeAppError
from serve_app.generation import GenerationRequest, GenerationResult
from serve_app.guard import Guard, GuardMiddleware
from serve_app.logs import under_serve_logger
from serve_app.metrics import UNKNOWN_ROUTE, ClusterMetrics, RouterMetrics
from serve_app.model_queue import ModelQueue
from serve_app.registry import get_registry
from serve_app.relay import StreamFormat, relay
from serve_app.status import read_statuses
from serve_app.transport import Handles, too_large

# Each route: method, path, the Router method that answers it.
ROUTES = (
    ("POST", "/v1/chat/completions", "chat_completions"), ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/generate", "generate"), ("POST", "/v1/responses", "responses"),
    ("GET", "/v1/models", "models"), ("GET", "/v1/models/{model_id}", "model"),
    ("GET", "/healthz", "healthz"), ("GET", "/health", "health"), ("GET", "/readyz", "readyz"),
    ("GET", "/metrics", "prometheus"), ("GET", "/v1/replicas", "replicas"),
)


def build_api(router: "Router") -> FastAPI:
    """The router replica's own FastAPI app: its guard and metrics, its routes, one error builder.
    Built per replica (Serve calls `__serve_build_asgi_app__`), so nothing module-level changes."""
    api = FastAPI(title="serve_app", version="0.1.0")

    async def on_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    for kind in (RequestValidationError, ServeAppError, StarletteHTTPException, Exception):
        api.add_exception_handler(kind, on_error)

    # Keys and the body limit come before anything reads the request; counting wraps them (a 401
    # counts): Starlette puts the middleware added last outermost.
    api.add_middleware(GuardMiddleware, guard=router.guard, respond=error_response)
    api.add_middleware(CountRequests, count=lambda model, route, code: router.metrics.requests.labels(
        model, route, code).inc())
    for method, path, name in ROUTES:
        api.add_api_route(path, getattr(router, name), methods=[method], response_model=None)
    return api


class CountRequests:
    """Counts each answer by model, route template (never the raw path: a client must not be able
    to add series) and status, as its response starts. Pure ASGI: Starlette's `@app.middleware`
    runs every request through an extra task and memory streams."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str, str], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or UNKNOWN_ROUTE
                self.count(scope.get("state", {}).get("model", UNKNOWN_ROUTE), route, str(message["status"]))
            await send(message)

        return await self.app(scope, receive, counted)


def _model_card(model: ModelConfig) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "serve_app"}


@serve.deployment(name="router")
@serve.ingress()
class Router:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        under_serve_logger()
        self.config = AppConfig.model_validate(config)
        self.handles = Handles(handles)
        self.app_name = serve.get_replica_context().app_name
        self.registry = get_registry()
        self.metrics = RouterMetrics()
        self.cluster_metrics = ClusterMetrics()
        self.guard = Guard(self.config.server)
        self.checker = RequestChecker(self.config)
        self.queues = {m.name: ModelQueue(m.limits.max_pending_requests) for m in self.config.models}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def intake(self, request: Request, body_type: type[Any]) -> Intake:
        """Parse and validate in a worker thread: a large or hostile body never holds the event
        loop (other requests, /healthz) while it is checked."""
        raw = await request.body()  # already read, and bounded, by the guard
        intake = await asyncio.to_thread(self.checker.prepare, raw, body_type)
        request.state.model = intake.model.name  # the requests_total label
        return intake

    def admit(self, model: ModelConfig) -> ModelQueue:
        """Take a place in the model's bounded queue (429 when it is full)."""
        queue = self.queues[model.name]
        queue.enter()
        self.metrics.pending.labels(model.name).set(queue.pending)
        return queue

    def leave(self, model: ModelConfig, queue: ModelQueue, results: list[GenerationResult],
              started: float | None = None, route: str = "") -> None:
        queue.leave(finished=bool(results))
        self.metrics.pending.labels(model.name).set(queue.pending)
        for result in results:
            self.metrics.observe_result(model.name, result)
        if started is not None and results:
            self.cluster_metrics.request_done(model.name, route, time.perf_counter() - started)

    async def dispatch(self, model: ModelConfig, rows: list[GenerationRequest],
                       route: str = "") -> list[GenerationResult]:
        queue, started = self.admit(model), time.perf_counter()
        results: list[GenerationResult] = []
        try:
            payload = [row.model_dump(mode="json", by_alias=True) for row in rows]
            results = [GenerationResult.model_validate(r) for r in await self.call_replica(model, rows, payload)]
            return results
        finally:  # also when the client disconnected and Serve cancelled this request
            self.leave(model, queue, results, started, route)

    async def call_replica(self, model: ModelConfig, rows: list[GenerationRequest],
                           payload: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A replica that dies under a request (killed, crashed) gets it retried on another, up to
        `server.replica_attempts` tries; then a 503 with Retry-After (see api/errors.py). A call
        gRPC refuses for its size is sent again by reference (transport.py), not counted as a try."""
        from ray.exceptions import RayActorError

        handle, attempt = self.handles.for_call(model, rows, payload), 1
        while True:
            try:
                return await handle.generate.remote(payload)
            except RayActorError:
                if attempt == self.config.server.replica_attempts:
                    raise
                attempt += 1
            except Exception as error:
                if not too_large(error) or handle is self.handles.by_reference[model.name]:
                    raise
                handle = self.handles.by_reference[model.name]

    async def stream(self, model: ModelConfig, rows: list[GenerationRequest], fmt: StreamFormat,
                     route: str = "") -> StreamingResponse:
        """Start a replica stream and wait for its first event, so that errors raised before any
        token (prompt too long, a constraint that does not compile) still get a 4xx response."""
        queue, started = self.admit(model), time.perf_counter()
        payload = [row.model_dump(mode="json", by_alias=True) for row in rows]
        stream = self.handles.by_reference[model.name].options(stream=True).generate_stream.remote(payload)
        try:
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            self.leave(model, queue, [])
            raise
        events = relay(first, stream, fmt, lambda results: self.leave(model, queue, results, started, route))
        return StreamingResponse(events, media_type="text/event-stream")

    async def openai(self, request: Request, body_type: type[Any], chat: bool) -> dict[str, Any] | StreamingResponse:
        intake = await self.intake(request, body_type)
        model, rows = intake.model, intake.rows
        route = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            if intake.body.stream:
                return await self.stream(model, rows, streaming.ChunkFormatter(model.name, chat, len(rows),
                                                                               intake.body), route)
            results = await self.dispatch(model, rows, route)
        except ServeAppError as error:  # a replica's refusal, naming the field as this request sent it
            raise as_sent(error, intake.body) from None
        shape = responses.chat_completion_response if chat else responses.completion_response
        return shape(model.name, results, intake.body)

    async def chat_completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        return await self.openai(request, request_models.ChatCompletionRequest, chat=True)

    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        return await self.openai(request, request_models.CompletionRequest, chat=False)

    async def generate(self, request: Request) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        intake = await self.intake(request, request_models.NativeGenerateRequest)
        model, [row] = intake.model, intake.rows
        try:
            if intake.body.stream:
                return await self.stream(model, [row], streaming.NativeEvents(model.name, row.constraint, started),
                                         "/v1/generate")
            [result] = await self.dispatch(model, [row], "/v1/generate")
        except ServeAppError as error:
            raise as_sent(error, intake.body) from None
        return responses.native_response(model.name, result, row.constraint, time.perf_counter() - started)

    async def responses(self, request: Request) -> dict[str, Any] | StreamingResponse:
        intake = await self.intake(request, responses_api.ResponsesRequest)
        model, [row], body = intake.model, intake.rows, intake.body
        try:
            if body.stream:
                events = responses_api.ResponseEvents(model.name, body)
                return await self.stream(model, [row], events, "/v1/responses")
            [result] = await self.dispatch(model, [row], "/v1/responses")
        except ServeAppError as error:
            raise as_sent(error, body) from None
        return responses_api.response_object(model.name, result, body)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in self.config.models]}

    async def model(self, model_id: str) -> dict[str, Any]:
        try:
            found = self.config.model(model_id)
        except KeyError:
            known = ", ".join(m.name for m in self.config.models)
            raise ModelNotFoundError(f"model {model_id!r} not found; known models: {known}", param="model",
                                     code="model_not_found") from None
        return _model_card(found)

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def health(self) -> dict[str, str]:
        """The same liveness answer under the name vLLM and most load balancers probe."""
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        live = read_statuses(await self.registry.live.remote(self.app_name))
        counts = {m.name: sum(1 for r in live if r.model == m.name) for m in self.config.models}
        ready = all(counts.values())
        return JSONResponse({"ready": ready, "replicas": counts}, status_code=200 if ready else 503)

    async def prometheus(self) -> Response:
        live = read_statuses(await self.registry.live.remote(self.app_name))
        return Response(self.metrics.render(live), media_type=CONTENT_TYPE_LATEST)

    async def replicas(self) -> dict[str, Any]:
        live = read_statuses(await self.registry.live.remote(self.app_name))
        return {"replicas": [r.model_dump(mode="json") for r in sorted(live, key=lambda r: (r.model, r.replica_id))]}
