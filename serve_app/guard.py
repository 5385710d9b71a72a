"""The router's front door, as plain ASGI middleware: API keys, then the body size limit counted
while the body streams in (chunked uploads included), before any route reads or parses it."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve_app.config import ConfigError, ServerConfig
from serve_app.errors import PayloadTooLargeError, ServeAppError, UnauthorizedError, UnsupportedMediaTypeError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes anyone may call: probes and the metrics scrape.
OPEN_PATHS = frozenset({"/healthz", "/health", "/readyz", "/metrics"})


def api_keys(server: ServerConfig, environ: MutableMapping[str, str] | None = None) -> list[bytes]:
    """Accepted keys from the config and the env var, stripped. An env var that is set but holds
    no key is a mistake that would silently turn authentication off: refuse to start instead."""
    from_env = (os.environ if environ is None else environ).get(server.api_keys_env, "")
    keys = [k.strip() for k in [*server.api_keys, *from_env.split(",")] if k.strip()]
    if from_env.strip(", \t\r\n") == "" and from_env != "" and not server.api_keys:
        raise ConfigError(f"{server.api_keys_env} is set but holds no API key (only blanks or commas); "
                          f"unset it to run without authentication")
    return [k.encode() for k in keys]


class BodyLimit:
    """Refuses a body over `max_body_bytes`: by its Content-Length at once, else as it arrives."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    def check_length(self, headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise self.too_large()

    def too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body over {self.max_body_bytes} bytes", code="max_body_bytes")

    async def read_body(self, receive: Receive) -> bytes | None:
        """The whole body, refused as soon as it passes the limit; None if the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class Guard(BodyLimit):
    """API keys, then the body limit. Keys are compared as bytes in constant time (any header
    bytes, ASCII or not) and never logged or echoed."""

    def __init__(self, server: ServerConfig) -> None:
        super().__init__(server.max_body_bytes)
        self.keys = api_keys(server)

    def check_headers(self, path: str, headers: dict[bytes, bytes], method: str = "GET") -> None:
        if self.keys and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not any(hmac.compare_digest(token, k) for k in self.keys):
                raise UnauthorizedError("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")
        if method in BODY_METHODS:
            check_json_content_type(headers)
        self.check_length(headers)


# A browser sends a POST whose Content-Type is text/plain, a form or none without asking the server
# first (no CORS preflight), so any web page could spend a keyless local server's compute: a body
# is read only when it says it is JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def check_json_content_type(headers: dict[bytes, bytes]) -> None:
    """415 unless the body is declared `application/json` (parameters such as charset allowed)."""
    declared = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if declared != b"application/json":
        shown = declared.decode("latin-1")[:80] or "none"
        raise UnsupportedMediaTypeError(
            f"request bodies must be JSON: send 'Content-Type: application/json' (got {shown})",
            param="content-type", code="unsupported_media_type")


def route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve mounts apps under one)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands on the body already read, then the client's later messages
    (a disconnect, which cancels streaming generation)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


class GuardMiddleware:
    def __init__(self, app: ASGIApp, guard: Guard, respond: Callable[[ServeAppError], Any]) -> None:
        self.app = app
        self.guard = guard
        self.respond = respond  # error -> an ASGI response (the router's one error builder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.guard.check_headers(route_path(scope), dict(scope.get("headers", [])), scope.get("method", "GET"))
            body = await self.guard.read_body(receive)
        except ServeAppError as error:
            return await self.respond(error)(scope, receive, send)
        if body is not None:
            await self.app(scope, replay(body, receive), send)
        return None


# -- the same body limit in Serve's HTTP proxy -----------------------------------------------------
# Serve's proxy reads a request's whole body into a queue before the router sees any of it, so
# the router alone cannot stop a 32 MiB chunked upload early. Serve takes proxy middleware from
# the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read when a proxy starts
# (`proxy_env` gives the variables; `serve-app run`, `make serve` and the tests set them, and a
# cluster started by hand needs them in `ray start`'s environment).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_LIMIT_ENV = "SERVE_APP_PROXY_MAX_BODY_BYTES"


def proxy_env(max_body_bytes: int) -> dict[str, str]:
    return {PROXY_CALLBACK_ENV: "serve_app.guard:proxy_middlewares", PROXY_LIMIT_ENV: str(max_body_bytes)}


def proxy_middlewares() -> list[Any]:
    from starlette.middleware import Middleware

    limit = int(os.environ.get(PROXY_LIMIT_ENV, ServerConfig().max_body_bytes))
    return [Middleware(ProxyBodyLimit, max_body_bytes=limit)]


class ProxyBodyLimit:
    """Pure ASGI (the proxy has no FastAPI app): answers 413 as soon as a body passes the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = BodyLimit(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.limit.check_length(dict(scope.get("headers", [])))
            body = await self.limit.read_body(receive)
        except ServeAppError as error:
            from serve_app.api.errors import error_response  # the router's one error builder

            return await error_response(error, close=True)(scope, receive, send)
        if body is not None:
            await self.app(scope, replay(body, receive), send)
        return None
