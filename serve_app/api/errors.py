"""The one place that turns an error into an HTTP response: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import InvalidRequestError, OverloadedError, RouteError, ServeAppError

logger = logging.getLogger(__name__)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    # Pydantic names union members (e.g. "json_schema" of the constraint union) in the path.
    return ".".join(parts) or "body"


def from_validation_error(error: RequestValidationError | ValidationError) -> InvalidRequestError:
    """FastAPI's 422 becomes our 400, naming the field and what is wrong with it."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}",
                                   code="invalid_json")
    where = _location(tuple(first.get("loc", ())))
    if where == "body" and first.get("type") in ("model_attributes_type", "dict_type"):
        return InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unsupported parameter"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    return InvalidRequestError(f"{where}: {message}{suffix}", param=where, code=first.get("type"))


def as_serve_app_error(error: BaseException) -> ServeAppError:
    """Map anything raised while handling a request to one of our errors."""
    if isinstance(error, ServeAppError):
        return error
    if isinstance(error, StarletteHTTPException):
        return RouteError(str(error.detail), error.status_code, code=str(error.status_code))
    if isinstance(error, RequestValidationError | ValidationError):
        return from_validation_error(error)
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(error, ActorDiedError | ActorUnavailableError | RayActorError):
        return OverloadedError("the model replica became unavailable; retry shortly", code="replica_unavailable")
    logger.exception("unexpected error", exc_info=error)
    return ServeAppError(f"internal error: {type(error).__name__}")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that quotes a client's text (a field
    name with a lone surrogate, say) still renders, where UTF-8 encoding would fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: BaseException, close: bool = False) -> JSONResponse:
    """The response for any error: its status, the one body shape (`ServeAppError.to_dict`), a
    Retry-After where it says when to retry; `close`: the connection too (a body left unread)."""
    mapped = as_serve_app_error(error)
    retry_after = getattr(mapped, "retry_after_s", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if close:
        headers["Connection"] = "close"
    return AsciiJSONResponse(mapped.to_dict(), status_code=mapped.status_code, headers=headers or None)
