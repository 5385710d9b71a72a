"""The front half every engine shares: from a `GenerationRequest` to a prepared row, and from a
finished row to a `GenerationResult`. An engine is a runner behind it: it says how a constraint
is enforced there (`enforce`) and turns a prepared row into a `Stream` (`run`).

    prepare:  max_tokens within the model's limit -> the prompt rendered and tokenized -> prompt
              and context-length checks -> the constraint enforced (the plan, cached; compiled
              where the engine compiles) -> the minimum budget -> the Row (sampling defaults merged)
    result:   the output checked against the constraint, with one validity rule for every engine:
              valid only when it finished (`stop`) and the check says so (a check that cannot
              finish is never valid)
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from serve_app.cache import BoundedCache
from serve_app.config import ModelConfig
from serve_app.constraints import AnyConstraint, Plan, check_max_new_tokens, plan_constraint
from serve_app.constraints.budget import Budget, least_chars, minimum_budget
from serve_app.constraints.checks import ValueChecks
from serve_app.constraints.json_completion import JsonCloser
from serve_app.constraints.row_checks import RowChecker
from serve_app.engine.backends import Matcher
from serve_app.engine.chat import chat_prompt_ids
from serve_app.engine.prelude import PreludeMaker, park
from serve_app.engine.row_closing import RowCloser, ShortestEncoder
from serve_app.engine.stream import Row, RowOutput, Stream
from serve_app.errors import InvalidRequestError, LimitExceededError, ServeAppError
from serve_app.generation import GenerationRequest, GenerationResult, TokenLogprob, TokenLogprobs, Usage

# A logprob of -inf (a token the constraint forbade) is not JSON; OpenAI reports -9999.0.
logger = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0
# Checked keywords listed in a response; a large schema can have hundreds.
MAX_LISTED_CHECKS = 16
# Plans (and refusals) kept per replica: planning a large schema is not free.
MAX_PLANS = 512
# Failures that say how long something took, not what the constraint is: never cached, or one
# slow moment would refuse a popular schema until restart.
TRANSIENT_FAILURES = frozenset({"compile_timeout_s"})

Notify = Callable[[tuple[str, Any]], None]
Entries = list[tuple[int, float, list[tuple[int, float]]]]


@dataclass(frozen=True)
class Enforcement:
    """How one constraint is enforced by an engine, shared by every row that uses it."""

    plan: Plan
    backend: str | None  # what enforces it (a cascade backend, or vLLM's)
    approximated: tuple[str, ...] = ()  # what is not enforced while generating (the output is checked)
    new_matcher: Callable[[], Matcher] | None = None  # None: the engine masks tokens itself
    closer: JsonCloser | None = None  # shortest completions, for closing JSON within max_tokens
    checks: ValueChecks | None = None  # keywords checked while generating
    min_tokens: int | None = None  # fewest tokens of a complete output (a 400 below it)

    @property
    def kind(self) -> str:
        return self.plan.constraint.type


@dataclass(frozen=True)
class PreparedRow:
    request: GenerationRequest
    row: Row
    enforcement: Enforcement | None


@dataclass(frozen=True)
class Submission:
    prepared: PreparedRow
    stream: Stream


class EngineFront(ABC):
    """The Engine protocol's request half (engine/protocol.py), for an engine that implements
    `enforce` and `run`. Subclasses set `config`, `tokenizer` and `context_length`."""

    config: ModelConfig
    tokenizer: Any
    context_length: int | None
    installed: tuple[str, ...]  # the backends plans may name (the cascade's, or vLLM's)
    eos_ids: set[int]
    runs_preludes = True  # our row policies run every token (engine/prelude.py: reasoning, calls)

    def __init__(self) -> None:
        self.plans: BoundedCache[str, Plan | ServeAppError] = BoundedCache(MAX_PLANS)
        self.least_chars: BoundedCache[str, int] = BoundedCache(MAX_PLANS)  # per constraint: a walk of its schema

    # -- what an engine provides ------------------------------------------------------------------

    @abstractmethod
    def enforce(self, constraint: AnyConstraint) -> Enforcement:
        """How this engine enforces `constraint` (raises its 4xx when it cannot)."""

    @abstractmethod
    def shortest_encoder(self) -> ShortestEncoder:
        """Text to the fewest tokens (what the minimum budget counts)."""

    @abstractmethod
    def run(self, prepared: PreparedRow, notify: Notify | None, deltas: bool) -> Stream:
        """Start generating a prepared row; its stream receives the events."""

    # -- preparing ---------------------------------------------------------------------------------

    def plan(self, constraint: AnyConstraint) -> Plan:
        """The same plan the router made (serve_app/constraints/plan.py), cached with its refusals."""
        planned = self.plans.get_or_build(constraint.cache_key(), lambda: self._plan_or_error(constraint))
        if isinstance(planned, ServeAppError):
            if planned.code in TRANSIENT_FAILURES:
                self.plans.pop(constraint.cache_key())
            raise planned
        return planned

    def _plan_or_error(self, constraint: AnyConstraint) -> Plan | ServeAppError:
        try:
            return plan_constraint(constraint, self.config.limits, self.config.backends, self.installed)
        except ServeAppError as error:
            return error

    def budget(self, plan: Plan, encode: Callable[[str], list[int]], separators: tuple[str, str]) -> Budget:
        return minimum_budget(plan, encode, separators)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return chat_prompt_ids(self.tokenizer, request.messages, request.tools, request.chat_template_kwargs,
                                   self.config.loading.control_tokens_in_messages)
        return list(self.tokenizer(request.prompt)["input_ids"])

    def prepare(self, request: GenerationRequest) -> PreparedRow:
        """Check a request's limits and enforce its constraint, raising what `generate` would."""
        max_new = request.sampling.max_new_tokens or self.config.sampling.max_new_tokens
        check_max_new_tokens(max_new, self.config.limits, self.config.name)
        ids = self.prompt_ids(request)
        self.check_prompt(len(ids), max_new)
        constraint = self.applied_constraint(request)
        try:
            enforcement = self.enforce_within(constraint, max_new) if constraint is not None else None
        except InvalidRequestError as error:
            if not (request.tool_call_auto and error.code == "max_tokens_too_small"):
                raise
            enforcement = None  # no call fits: the answer is text (a call in it is only validated)
        row = self.new_row(request, ids, max_new, enforcement)
        if self.runs_preludes:
            preludes = self.preludes.make(request, ids, max_new, enforcement.min_tokens if enforcement else None,
                                          enforcement is not None)
            park(row, preludes, self.preludes)
        return PreparedRow(request, row, enforcement)

    def enforce_within(self, constraint: AnyConstraint, max_new: int) -> Enforcement:
        self.check_least_budget(constraint, max_new)
        enforcement = self.enforce(constraint)
        check_budget(enforcement, max_new)
        return enforcement

    def applied_constraint(self, request: GenerationRequest) -> AnyConstraint | None:
        """The request's constraint as this engine applies it: a call the answer may start (tool_choice
        "auto") is left to validation where calls are not generated under their schema."""
        if request.tool_call_auto and not (self.config.tool_calls.constrained_auto and self.runs_preludes):
            return None
        return request.constraint

    @cached_property
    def preludes(self) -> PreludeMaker:
        return PreludeMaker(self.tokenizer, self.config, self.eos_ids)

    def check_least_budget(self, constraint: AnyConstraint, max_new: int) -> None:
        """The budget against a bound counted without compiling or encoding (characters over the
        longest token): a refusal of a huge `const` or `minLength` takes milliseconds, not seconds."""
        chars = self.least_chars.get_or_build(constraint.cache_key(), lambda: least_chars(self.plan(constraint)))
        least = -(-chars // max(1, self.shortest_encoder().longest))
        if max_new < least:
            raise too_small(constraint.type, max_new, f"at least {least}")

    def check_prompt(self, prompt_tokens: int, max_new: int) -> None:
        if prompt_tokens == 0:  # found by fuzzing: a model cannot continue from nothing
            raise InvalidRequestError("prompt is empty (it has no tokens)", param="prompt", code="empty_prompt")
        limit = self.config.limits.max_prompt_tokens
        if prompt_tokens > limit:
            raise LimitExceededError(f"prompt has {prompt_tokens} tokens; the limit is {limit}",
                                     param="messages", code="max_prompt_tokens")
        if self.context_length and prompt_tokens + max_new > self.context_length:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new}) exceeds the model's "
                f"context length of {self.context_length}", param="max_tokens", code="context_length")

    def new_row(self, request: GenerationRequest, ids: list[int], max_new: int,
                enforcement: Enforcement | None) -> Row:
        pick = self.config.sampling.merged(request.sampling)  # the request's values, else the defaults
        matcher = enforcement.new_matcher() if enforcement is not None and enforcement.new_matcher else None
        closer = enforcement.closer if enforcement is not None and pick["close_json"] else None
        checks = enforcement.checks if enforcement is not None else None
        return Row(ids, max_new, pick["temperature"], pick["top_p"], request.sampling.seed, list(request.sampling.stop),
                   matcher, closer=RowCloser(closer) if closer is not None else None,
                   repetition_penalty=pick["repetition_penalty"], frequency_penalty=pick["frequency_penalty"],
                   presence_penalty=pick["presence_penalty"], no_repeat_ngram_size=pick["no_repeat_ngram_size"],
                   top_k=max(0, pick["top_k"]), min_p=pick["min_p"], logprobs=request.sampling.logprobs,
                   checker=RowChecker(checks) if checks is not None else None,
                   logit_bias=self.logit_bias(request.sampling.logit_bias))

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """A request's logit_bias by token id; a token the model does not have is a 400."""
        if not bias:
            return None
        size = len(self.tokenizer)
        unknown = sorted(int(token) for token in bias if int(token) >= size)
        if unknown:
            raise InvalidRequestError(f"logit_bias: token {unknown[0]} is not in the model's vocabulary ({size} "
                                      "tokens)", param="logit_bias", code="invalid_value")
        return {int(token): value for token, value in bias.items()}

    # -- running -----------------------------------------------------------------------------------

    def submit_prepared(self, prepared: PreparedRow, notify: Notify | None = None,
                        deltas: bool = True) -> Submission:
        """Queue a prepared row; `notify` receives ("delta", text) (only with `deltas`),
        ("logprobs", entries), then ("done", output) or ("error", e)."""
        return Submission(prepared, self.run(prepared, notify, deltas))

    def submit(self, request: GenerationRequest, notify: Notify | None = None) -> Submission:
        return self.submit_prepared(self.prepare(request), notify)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for all requests together (validated first: one bad request fails the call)."""
        prepared = [self.prepare(request) for request in requests]
        submissions = [self.submit_prepared(p, deltas=False) for p in prepared]
        return [self.result(s, s.stream.result()) for s in submissions]

    # -- results -----------------------------------------------------------------------------------

    def result(self, submission: Submission, out: RowOutput) -> GenerationResult:
        request, row = submission.prepared.request, submission.prepared.row
        enforcement = submission.prepared.enforcement
        completion_tokens = len(out.token_ids) + out.prelude_tokens
        prompt_tokens = len(row.prompt_ids) - out.prelude_tokens  # a prelude's tokens joined the context
        applied = None if out.unconstrained or enforcement is None else request.constraint
        return GenerationResult(
            text=out.text, finish_reason=out.finish_reason,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens, reasoning_tokens=out.reasoning_tokens),
            valid=is_valid(applied, out), closed_early=out.closed_early, reasoning=out.reasoning,
            preamble=out.preamble if request.tool_call_auto else None,
            backend=enforcement.backend if enforcement is not None else None,
            approximated=list(enforcement.approximated) if enforcement is not None else [],
            rewrites=list(enforcement.plan.rewrites) if enforcement is not None else [],
            checks=({"keywords": listed(enforcement.checks.sites), **row.checker.stats.as_dict()}
                    if row.checker is not None and enforcement is not None and enforcement.checks
                    and (enforcement.checks.sites or row.checker.stats.violations) else None),
            token_ids=out.token_ids,
            logprobs=self.logprobs(out.logprobs) if row.logprobs is not None else None,
            timings={"total_s": out.total_s, "first_token_s": out.first_token_s or 0.0,
                     **({"queue_s": out.queue_s} if out.queue_s is not None else {})})

    def logprobs(self, entries: Entries) -> list[TokenLogprobs]:
        """A row's (token, logprob, alternatives) entries, with each token's text."""
        return [TokenLogprobs(**self._token(token, logprob),
                              top_logprobs=[TokenLogprob(**self._token(t, lp)) for t, lp in top])
                for token, logprob, top in entries]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = str(self.tokenizer.decode([token]))
        raw = self._raw_bytes.decode_bytes([token]) if self._raw_bytes is not None else text.encode("utf-8")
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB) if math.isfinite(logprob) else MIN_LOGPROB,
                "bytes": list(raw)}

    @cached_property
    def _raw_bytes(self) -> Any:
        """Each token's own bytes (a token may hold part of a character: its text is then U+FFFD, its
        bytes are not), from llguidance's reading of the tokenizer; None where it cannot read it."""
        try:
            import llguidance.hf

            return llguidance.hf.from_tokenizer(self.tokenizer)
        except Exception:  # noqa: BLE001 - logprob bytes then come from the token's text
            logger.warning("cannot read the tokenizer's token bytes; logprob bytes are the text's", exc_info=True)
            return None


def check_budget(enforcement: Enforcement, max_new: int) -> None:
    least = enforcement.min_tokens
    if least is not None and max_new < least:
        raise too_small(enforcement.kind, max_new, str(least))


def too_small(kind: str, max_new: int, least: str) -> InvalidRequestError:
    return InvalidRequestError(f"max_tokens {max_new} is too small for this {kind} constraint: its shortest "
                               f"valid output takes {least} tokens", param="max_tokens", code="max_tokens_too_small")


def is_valid(constraint: AnyConstraint | None, out: RowOutput) -> bool | None:
    """None without a constraint; else True only for a finished output the check accepts. A cut
    output is never valid, even if it parses; a check that cannot finish (a slow pattern) is not
    a pass."""
    if constraint is None:
        return None
    return out.finish_reason == "stop" and constraint.is_satisfied_by(out.text) is True


def listed(sites: tuple[str, ...]) -> list[str]:
    shown = list(sites[:MAX_LISTED_CHECKS])
    return shown + [f"... and {len(sites) - len(shown)} more"] if len(sites) > len(shown) else shown
