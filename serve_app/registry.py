"""A small named Ray actor where model replicas report their status (placement, GPU ids,
fallback, cache stats) with a heartbeat, so the router can answer /v1/replicas and /readyz
without probing replicas through the load-balanced handle."""

from __future__ import annotations

import time
from typing import Any

import ray

REGISTRY_NAME = "serve_app_replica_registry"
REGISTRY_NAMESPACE = "serve_app"
HEARTBEAT_S = 2.0
STALE_AFTER_S = 3 * HEARTBEAT_S


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}

    def report(self, replica_id: str, status: dict[str, Any]) -> None:
        self._entries[replica_id] = {**status, "last_seen": time.time()}

    def remove(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def live(self, app_name: str) -> list[dict[str, Any]]:
        now = time.time()
        return [e for e in self._entries.values()
                if e.get("app") == app_name and now - e["last_seen"] < STALE_AFTER_S]


def get_registry() -> Any:
    return ReplicaRegistry.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached",
    ).remote()
