"""The few exception classes the service raises, each carrying its HTTP status.

They cross Ray actor boundaries, so they must pickle: every field is a plain
constructor argument kept in ``args``.
"""

from __future__ import annotations

from typing import Any


class ServeAppError(Exception):
    """Base class: an error a client can be told about."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param, code)
        self.message = message
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-style error body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code or self.error_type,
            }
        }


class InvalidRequestError(ServeAppError):
    """The request is malformed or asks for something out of range."""

    status_code = 400
    error_type = "invalid_request_error"


class ConstraintError(InvalidRequestError):
    """A constraint (schema, regex, choice, grammar) is invalid or cannot be enforced."""

    error_type = "invalid_constraint"


class LimitExceededError(InvalidRequestError):
    """A configured limit (size, tokens, compile time) was exceeded."""

    error_type = "limit_exceeded"


class UnauthorizedError(ServeAppError):
    status_code = 401
    error_type = "authentication_error"


class PayloadTooLargeError(ServeAppError):
    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaTypeError(ServeAppError):
    status_code = 415
    error_type = "invalid_request_error"


class ModelNotFoundError(ServeAppError):
    status_code = 404
    error_type = "model_not_found"


class OverloadedError(ServeAppError):
    status_code = 503
    error_type = "overloaded"
    retry_after_s = 1


class QueueFullError(ServeAppError):
    """The model's bounded queue is full; `retry_after_s` comes from the observed drain rate."""

    status_code = 429
    error_type = "queue_full"

    def __init__(self, message: str, retry_after_s: int, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param, code)
        self.args = (message, retry_after_s, param, code)
        self.retry_after_s = retry_after_s


class RouteError(ServeAppError):
    """Starlette's own HTTP errors (no such route: 404; a method the route lacks: 405), in our shape."""

    def __init__(self, message: str, status_code: int, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param, code)
        self.args = (message, status_code, param, code)
        self.status_code = status_code
        self.error_type = "not_found" if status_code == 404 else "invalid_request_error"


class ModelLoadError(ServeAppError):
    """The model could not be loaded where the placement plan put it."""

    status_code = 503
    error_type = "model_unavailable"
