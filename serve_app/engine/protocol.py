"""What a model replica needs from an engine. The transformers engine (transformers_engine.py)
is the one there is today; an engine is chosen per model by `engine:` in the config
(factory.py). Engines know nothing about Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from serve_app.config import ModelConfig
from serve_app.constraints import AnyConstraint
from serve_app.generation import GenerationRequest, GenerationResult, TokenLogprobs

Notify = Callable[[tuple[str, Any]], None]


class Engine(Protocol):
    config: ModelConfig

    def prepare(self, request: GenerationRequest) -> Any:
        """Check a request and compile its constraint (raises the 4xx errors); no generation."""

    def submit_prepared(self, request: GenerationRequest, prepared: Any, notify: Notify | None = None,
                        deltas: bool = True) -> Any:
        """Queue a prepared request; `notify` receives ("delta", text) (only with `deltas`), ("done",
        output) or ("error", e)."""

    def submit(self, request: GenerationRequest, notify: Notify | None = None) -> Any:
        """`prepare` and `submit_prepared` in one call."""

    def result(self, submission: Any, output: Any) -> GenerationResult:
        """The result of a finished submission, its output checked against the constraint."""

    def logprobs(self, entries: Any) -> list[TokenLogprobs]:
        """A row's ("logprobs", entries) event, with each token's text."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for all requests together and wait for them."""

    def compile(self, constraint: AnyConstraint) -> Any:
        """Compile (cached) one constraint."""

    def precompile(self, constraints: Iterable[AnyConstraint]) -> None:
        """Compile the named constraints before serving."""

    def reconfigure(self, config: ModelConfig) -> None:
        """Apply sampling defaults, limits and the constraint registry in place."""

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) rows."""

    def status(self) -> dict[str, Any]:
        """What /v1/replicas shows: placement, cache, queue, counters."""

    def check_health(self) -> None:
        """Raise if this engine cannot serve (Serve then replaces the replica)."""

    def close(self) -> None:
        """Stop generating; unfinished rows get a 503 error."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, *_: object) -> None: ...
