"""From a raw request body to validated generation rows for one model: the router's whole
validation, in one function it runs in a worker thread, never on its event loop.

Order matters: the cheap, bounded checks come first (JSON nesting, strings, types, then each
constraint's sizes and depths), and only then the checks that parse or compile (meta-validation,
`re.compile`, a Lark parse, normalisation and the cascade's plan). A verdict per constraint is
cached, so a popular schema is checked once per router.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from serve_app.api.body import load_json
from serve_app.api.errors import from_validation_error
from serve_app.cache import BoundedCache
from serve_app.config import AppConfig, ModelConfig
from serve_app.constraints import AnyConstraint, Plan, check_max_new_tokens, installed_backends, plan_constraint
from serve_app.constraints.kinds import SOURCE_FIELD
from serve_app.errors import (
    ConstraintError,
    InvalidRequestError,
    LimitExceededError,
    ModelNotFoundError,
    ServeAppError,
)
from serve_app.generation import GenerationRequest

logger = logging.getLogger(__name__)
_Body = TypeVar("_Body", bound=BaseModel)
# Constraint verdicts kept per router (a verdict is a few hundred bytes).
MAX_VERDICTS = 1024
PASSED = "passed"


@dataclass(frozen=True)
class Intake:
    model: ModelConfig
    body: Any
    rows: list[GenerationRequest]


class RequestChecker:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.installed = installed_backends()
        # Refusals, and PASSED for a constraint that passed (a plan holds the normalised schema,
        # up to max_schema_bytes each: not worth keeping at the router).
        self.verdicts: BoundedCache[str, ServeAppError | str] = BoundedCache(MAX_VERDICTS)

    def prepare(self, raw: bytes, body_type: type[_Body]) -> Intake:
        return self.prepare_body(self.parse(raw, body_type))

    def prepare_value(self, data: Any, body_type: type[_Body]) -> Intake:
        """`prepare` for a body already parsed from JSON (a batch line's `body`)."""
        return self.prepare_body(self.validate(data, body_type))

    def prepare_body(self, body: Any) -> Intake:
        try:
            return self._prepare(body)
        except ServeAppError as error:
            raise as_sent(error, body) from None

    def _prepare(self, body: Any) -> Intake:
        model = self.model(body.model)
        try:
            tool_parameters: Callable[[bool, bool], list[tuple[AnyConstraint, str]]] = getattr(
                body, "tool_parameter_constraints", lambda *_: [])
            for constraint, source in tool_parameters(model.strict_by_default, model.tool_calls.constrained_auto):
                self.check_constraint(model, constraint, source)
            rows = body.generation_requests(strict_default=model.strict_by_default)
            if not model.tool_calls.constrained_auto:  # calls under tool_choice "auto" validated afterwards only
                rows = [row.model_copy(update={"constraint": None, "tool_call_auto": False})
                        if row.tool_call_auto else row for row in rows]
        except ValidationError as error:
            raise from_validation_error(error) from None
        self.check_rows(model, rows, body.constraint_source())
        return Intake(model, body, rows)

    def parse(self, raw: bytes, body_type: type[_Body]) -> _Body:
        return self.validate(load_json(raw, self.config.server.max_json_depth), body_type)

    def validate(self, data: Any, body_type: type[_Body]) -> _Body:
        if not isinstance(data, dict):
            raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
        depth = self.config.server.max_json_depth
        if isinstance(data.get("guided_json"), str):  # a schema sent as a string: the same rules
            data["guided_json"] = load_json(data["guided_json"], depth, "guided_json")
        outputs = data.get("structured_outputs")
        if isinstance(outputs, dict) and isinstance(outputs.get("json"), str):
            outputs["json"] = load_json(outputs["json"], depth, "structured_outputs.json")
        try:
            return body_type.model_validate(data)
        except ValidationError as error:
            raise from_validation_error(error) from None

    def model(self, name: str) -> ModelConfig:
        try:
            return self.config.model(name)
        except KeyError:
            known = ", ".join(m.name for m in self.config.models)
            raise ModelNotFoundError(f"model {name!r} not found; known models: {known}", param="model",
                                     code="model_not_found") from None

    def check_rows(self, model: ModelConfig, rows: list[GenerationRequest], source: str | None = None) -> None:
        """What can be checked without the tokenizer: the constraint, then max_tokens."""
        if rows[0].constraint is not None:
            self.check_constraint(model, rows[0].constraint, source)
        if rows[0].sampling.max_new_tokens is not None:
            check_max_new_tokens(rows[0].sampling.max_new_tokens, model.limits, model.name)

    def check_constraint(self, model: ModelConfig, constraint: AnyConstraint, source: str | None = None) -> None:
        """Plan the constraint as the engine will (its 4xx if it cannot be); cached per router."""
        key = f"{model.name}|{source}|{constraint.cache_key()}"
        verdict = self.verdicts.get_or_build(key, lambda: self._verdict(model, constraint, source))
        if isinstance(verdict, ServeAppError):
            raise verdict

    def _verdict(self, model: ModelConfig, constraint: AnyConstraint, source: str | None) -> ServeAppError | str:
        planned = plan_or_error(model, constraint, source, self.installed)
        return planned if isinstance(planned, ServeAppError) else PASSED


def as_sent(error: ServeAppError, body: Any) -> ServeAppError:
    """`error` naming the field as the request sent it: engines and limits say `max_tokens`,
    `messages` or the constraint's kind whatever the route; the client sent `max_completion_tokens`,
    `prompt`, or `response_format.json_schema`."""
    param, renamed = error.param, _own_name(error.param, body)
    if renamed is not None and renamed != param:
        return _renamed(error, renamed, error.message.replace(str(param), renamed, 1))
    source = body.constraint_source() if param in SOURCE_FIELD and hasattr(body, "constraint_source") else None
    if source and not error.message.startswith(source):
        return _renamed(error, source, f"{source}: {error.message}")
    return error


def _own_name(param: str | None, body: Any) -> str | None:
    """The body's name for the field an engine calls `param` (a route's SENT_AS table first)."""
    if param in getattr(body, "SENT_AS", {}):
        return str(body.SENT_AS[param])
    if param == "max_tokens" and getattr(body, "max_completion_tokens", None) is not None \
            and getattr(body, "max_tokens", None) is None:
        return "max_completion_tokens"
    if param in ("messages", "prompt"):
        return "prompt" if getattr(body, "prompt", None) is not None else "messages"
    return None


def _renamed(error: ServeAppError, param: str, message: str) -> ServeAppError:
    """A copy with another param and message (of the replica's own error where Ray wrapped it)."""
    cause = getattr(error, "cause", None)
    out = copy.copy(cause if isinstance(cause, ServeAppError) else error)
    out.param, out.message, out.args = param, message, (message, param, out.code)
    return out


def plan_or_error(model: ModelConfig, constraint: AnyConstraint, source: str | None,
                  installed: tuple[str, ...]) -> Plan | ServeAppError:
    """The plan, or the error that refuses the constraint (a checker's own failure on odd input
    is that input's 400, never a 500)."""
    try:
        return plan_constraint(constraint, model.limits, model.backends, installed, source)
    except ServeAppError as error:
        return error
    except RecursionError:
        return LimitExceededError(f"{constraint.type} nests too deeply to check", param=constraint.type,
                                  code="max_schema_depth")
    except Exception as error:  # noqa: BLE001
        logger.warning("checking a %s constraint failed", constraint.type, exc_info=True)
        return ConstraintError(f"{constraint.type}: cannot be checked ({type(error).__name__})",
                               param=constraint.type, code="unsupported")
