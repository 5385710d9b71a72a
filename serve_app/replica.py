"""The model-replica deployment: load once where Ray placed us, batch, generate, report.

Construction reads the GPUs Ray assigned, plans for exactly those, loads the model, precompiles
the constraint registry, and only then returns: Serve sends no traffic before that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import psutil
from ray import serve

from serve_app.config import RECONFIGURABLE, ModelConfig
from serve_app.generation import GenerationRequest
from serve_app.logs import under_serve_logger
from serve_app.metrics import ClusterMetrics
from serve_app.registry import HEARTBEAT_S, get_registry
from serve_app.status import ReplicaStatus

if TYPE_CHECKING:
    from serve_app.engine.protocol import Engine
    from serve_app.engine.requests import PreparedRow, Submission

logger = logging.getLogger(__name__)
# Without CUDA, the GPUs Ray assigns are logical: plan for them as 16 GiB cards (a T4's size),
# then load on CPU (placement tests run this way on machines without GPUs).
LOGICAL_GPU_BYTES = 16 * 2**30


def actor_options(model: ModelConfig) -> dict[str, Any]:
    """Ray resources derived from the model's placement: a GPU share, N GPUs, or none."""
    options: dict[str, Any] = {"num_cpus": model.placement.num_cpus}
    if model.placement.gpus_per_replica > 0:
        options["num_gpus"] = model.placement.gpus_per_replica
    return options


def placed_engine(config: ModelConfig) -> tuple[Engine, list[str]]:
    """The engine for the GPUs Ray assigned to this actor (none: CPU), and their ids: a serving
    replica and a batch job's engine actor are placed and loaded the same way."""
    import ray

    from serve_app.engine.factory import create_engine
    from serve_app.engine.placement import detect_gpus

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    return create_engine(config, detect_gpus(gpu_ids, assumed_bytes=LOGICAL_GPU_BYTES)), gpu_ids


def deployment_name(model_name: str) -> str:
    return f"model-{model_name}"


class ModelReplica:
    def __init__(self, model_config: dict[str, Any]) -> None:
        under_serve_logger()
        started = time.perf_counter()
        self.config = ModelConfig.model_validate(model_config)
        self.engine, self.gpu_ids = placed_engine(self.config)
        self._preparing = 0  # rows being validated/compiled, not yet in the decode loop
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self._registry = get_registry()
        self.metrics = ClusterMetrics()
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True, name="registry-heartbeat").start()
        status = self.engine.status()
        logger.info("replica %s of %s ready in %.1f s: %s, %d named constraints compiled", self.replica_id,
                    self.config.name, time.perf_counter() - started, status.plan.get("reason", "?"),
                    len(self.config.constraints))

    # -- lifecycle -----------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply sampling defaults, limits and the constraint registry in place: no reload, same
        process. The new registry is compiled before this returns, so Serve routes no request to
        this replica (at start) or finishes the rollout (later) before it is warm."""
        unknown = set(user_config or {}) - set(RECONFIGURABLE)
        if unknown:
            raise ValueError(f"user_config keys not reconfigurable in place: {sorted(unknown)}")
        update = {key: value for key, value in (user_config or {}).items() if key in RECONFIGURABLE}
        if update:
            config = ModelConfig.model_validate(self.config.model_dump(mode="json", by_alias=True) | update)
            self.engine.reconfigure(config)
            self.engine.precompile(config.constraints.values())
            self.config = config
            logger.info("reconfigured %s: %s", self.config.name, sorted(update))

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop reporting, leave the registry (so
        /readyz and /metrics stop counting it at once), stop the decode thread."""
        if hasattr(self, "_stop"):
            logger.info("replica %s of %s stopping", self.replica_id, self.config.name)
            self._stop.set()
            try:
                self._registry.remove.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - the registry may be gone with the cluster
                logger.debug("could not leave the replica registry", exc_info=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def served_by(self) -> dict[str, str]:
        """Stamped on every result: which replica, code version and config answered."""
        digest = hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()[:12]
        return {"replica_id": self.replica_id, "version": self.config.version, "config_hash": digest}

    def status(self) -> ReplicaStatus:
        return self.engine.status().model_copy(update={
            "replica_id": self.replica_id, "app": self.app_name, "assigned_gpu_ids": self.gpu_ids,
            "rss_bytes": psutil.Process().memory_info().rss,
            "version": self.config.version, "config_hash": self.served_by()["config_hash"]})

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            self.metrics.queue(self.config.name, *self.engine.queue_depth())
            try:
                self._registry.report.remote(self.replica_id, self.status().model_dump(mode="json"))
            except Exception:  # the registry restarting must not take the replica down
                logger.warning("could not report to the replica registry", exc_info=True)
            self._stop.wait(HEARTBEAT_S)

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One HTTP request's rows (n choices); they join the running batch between steps."""
        results: list[dict[str, Any] | None] = [None] * len(requests)
        events = self._events(requests, deltas=False)
        try:
            async for event in events:
                if "done" in event:
                    results[event["index"]] = event["done"]
        finally:
            await events.aclose()  # on cancellation (client gone) this cancels the rows now
        return [r for r in results if r is not None]

    async def generate_stream(self, requests: list[dict[str, Any]]) -> AsyncGenerator[dict[str, Any], None]:
        """Yield ``{"index", "delta"}`` as text is generated and ``{"index", "done"}`` per row.

        If the caller goes away (client disconnect), the rows are cancelled in the decode loop."""
        events = self._events(requests, deltas=True)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def _events(self, requests: list[dict[str, Any]], deltas: bool) -> AsyncGenerator[dict[str, Any], None]:
        """The rows' events; without `deltas` only the final ones (no wake-up of this event loop
        per generated token, which would take the GIL from the decode thread)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, tuple[str, Any]]] = asyncio.Queue()

        def notifier(index: int) -> Callable[[tuple[str, Any]], None]:
            def notify(event: tuple[str, Any]) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            return notify

        prepared = await self._prepare(requests)
        submissions = [self.engine.submit_prepared(p, notifier(i), deltas=deltas) for i, p in enumerate(prepared)]
        try:
            async for event in self._relay(events, submissions, deltas):
                yield event
        finally:
            for submission in submissions:
                submission.stream.cancel()  # a no-op for finished rows

    async def _prepare(self, requests: list[dict[str, Any]]) -> list[PreparedRow]:
        """Validation and the constraint's compile, off the event loop; a bad row raises before any
        starts. Rows are submitted after this await: a caller gone during the compile (a client
        disconnect cancels the coroutine) leaves nothing in the decode loop."""
        parsed = [GenerationRequest.model_validate(r) for r in requests]
        self._preparing += len(parsed)
        try:
            return await asyncio.to_thread(lambda: [self.engine.prepare(r) for r in parsed])
        finally:
            self._preparing -= len(parsed)

    async def _relay(self, events: asyncio.Queue[tuple[int, tuple[str, Any]]], submissions: list[Submission],
                     deltas: bool) -> AsyncGenerator[dict[str, Any], None]:
        pending, served_by = len(submissions), self.served_by()
        logprobs: dict[int, list[dict[str, Any]]] = {}  # entries that go with each row's next delta
        while pending:
            index, (kind, value) = await events.get()
            if kind == "logprobs":
                if deltas:  # without deltas the result carries them all
                    logprobs[index] = [e.model_dump() for e in self.engine.logprobs(value)]
            elif kind == "delta":
                extra = {"logprobs": logprobs.pop(index)} if index in logprobs else {}
                yield {"index": index, "delta": value, **extra}
            elif kind == "reasoning":
                yield {"index": index, "reasoning": value}
            elif kind == "error":
                raise value
            else:
                pending -= 1
                result = self.engine.result(submissions[index], value)
                self.metrics.row_finished(self.config.name, result)
                yield {"index": index, "done": result.model_copy(update={"served_by": served_by}).model_dump()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Polled by Serve; `queue_depth` drives serve_app.autoscaling.QueueDepthPolicy."""
        waiting, running = self.engine.queue_depth()
        waiting += self._preparing
        return {"queue_depth": float(waiting + running), "waiting": float(waiting), "running": float(running)}
