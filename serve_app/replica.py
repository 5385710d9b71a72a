"""The model-replica deployment: load once where Ray placed us, batch, generate, report.

Construction reads the GPUs Ray assigned, plans for exactly those, loads the model, precompiles
the constraint registry, and only then returns: Serve sends no traffic before that.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ray import serve

from serve_app.config import ModelConfig
from serve_app.registry import HEARTBEAT_S, get_registry

logger = logging.getLogger(__name__)

# How long the batcher waits for company after the first request of a batch arrives.
BATCH_WAIT_S = 0.005


def actor_options(model: ModelConfig) -> dict[str, Any]:
    """Ray resources derived from the model's placement: a GPU share, N GPUs, or none."""
    options: dict[str, Any] = {"num_cpus": model.placement.num_cpus}
    if model.placement.gpus_per_replica > 0:
        options["num_gpus"] = model.placement.gpus_per_replica
    return options


def deployment_name(model_name: str) -> str:
    return f"model-{model_name}"


class ModelReplica:
    def __init__(self, model_config: dict[str, Any]) -> None:
        import ray

        from serve_app.engine.engine import Engine
        from serve_app.engine.placement import GIB, detect_gpus

        self.config = ModelConfig.model_validate(model_config)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        gpus = detect_gpus(self.gpu_ids, assumed_bytes=16 * GIB)
        self.engine = Engine.from_config(self.config, gpus)
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._batcher: asyncio.Task[None] | None = None
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self._registry = get_registry()
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True, name="registry-heartbeat").start()

    # -- lifecycle -----------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply sampling defaults and limits in place: no reload, same process."""
        update = {key: value for key, value in (user_config or {}).items() if key in ("sampling", "limits")}
        if update:
            merged = self.config.model_dump(by_alias=True) | update
            self.config = ModelConfig.model_validate(merged)
            self.engine.config = self.config
            logger.info("reconfigured %s: %s", self.config.name, sorted(update))

    def check_health(self) -> None:
        if self.engine.model is None:
            raise RuntimeError("model is not loaded")

    def __del__(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "app": self.app_name, "model": self.config.name,
                "assigned_gpu_ids": self.gpu_ids, **self.engine.status()}

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            try:
                self._registry.report.remote(self.replica_id, self.status())
            except Exception:  # the registry restarting must not take the replica down
                logger.warning("could not report to the replica registry", exc_info=True)
            self._stop.wait(HEARTBEAT_S)

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate for one HTTP request's rows (n choices); concurrent calls share batches."""
        from serve_app.engine.types import GenerationRequest

        parsed = [GenerationRequest.model_validate(r) for r in requests]
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in parsed]
        self._ensure_batcher()
        assert self._queue is not None
        for request, future in zip(parsed, futures, strict=True):
            self._queue.put_nowait((request, future))
        results = await asyncio.gather(*futures)
        return [r.model_dump() for r in results]

    def _ensure_batcher(self) -> None:
        if self._batcher is None or self._batcher.done():
            self._queue = asyncio.Queue()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(BATCH_WAIT_S)
            cap = max(1, self.engine.loaded.plan.max_batch_size)
            while len(batch) < cap and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        """Each row validates (tokens, compile) on its own, so one bad row fails alone."""
        good = []
        for request, future in batch:
            try:
                await asyncio.to_thread(self.engine.prepare, request)
                good.append((request, future))
            except Exception as error:
                future.set_exception(error)
        if not good:
            return
        try:
            results = await asyncio.to_thread(self.engine.generate, [r for r, _ in good])
        except Exception as error:
            for _, future in good:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(good, results, strict=True):
            if not future.done():
                future.set_result(result)
