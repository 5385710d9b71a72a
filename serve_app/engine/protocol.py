"""What a model replica needs from an engine. Both engines (transformers_engine.py, the default,
and vllm_engine.py) share their request half (requests.py: preparing rows, results, logprobs)
and are chosen per model by `engine:` in the config (factory.py). Engines know nothing about Ray."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from serve_app.config import ModelConfig
from serve_app.constraints import AnyConstraint
from serve_app.engine.requests import Enforcement, Entries, Notify, PreparedRow, Submission
from serve_app.engine.stream import RowOutput
from serve_app.generation import GenerationRequest, GenerationResult, TokenLogprobs
from serve_app.status import ReplicaStatus


class Engine(Protocol):
    config: ModelConfig

    def prepare(self, request: GenerationRequest) -> PreparedRow:
        """Check a request and enforce its constraint (raises the 4xx errors); no generation."""
        ...

    def submit_prepared(self, prepared: PreparedRow, notify: Notify | None = None,
                        deltas: bool = True) -> Submission:
        """Queue a prepared row; `notify` receives ("delta", text) (only with `deltas`),
        ("logprobs", entries), then ("done", output) or ("error", e)."""
        ...

    def submit(self, request: GenerationRequest, notify: Notify | None = None) -> Submission:
        """`prepare` and `submit_prepared` in one call."""
        ...

    def result(self, submission: Submission, output: RowOutput) -> GenerationResult:
        """The result of a finished submission, its output checked against the constraint."""
        ...

    def logprobs(self, entries: Entries) -> list[TokenLogprobs]:
        """A row's ("logprobs", entries) event, with each token's text."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for all requests together and wait for them."""
        ...

    def enforce(self, constraint: AnyConstraint) -> Enforcement:
        """How this engine enforces one constraint (compiled and cached where it compiles)."""
        ...

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        """Enforce the named constraints before serving."""
        ...

    def reconfigure(self, config: ModelConfig) -> None:
        """Apply sampling defaults, limits and the constraint registry in place."""
        ...

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) rows."""
        ...

    def status(self) -> ReplicaStatus:
        """What /v1/replicas shows: placement, cache, queue, counters."""
        ...

    def check_health(self) -> None:
        """Raise if this engine cannot serve (Serve then replaces the replica)."""
        ...

    def close(self) -> None:
        """Stop generating; unfinished rows get a 503 error."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *_: object) -> None: ...
