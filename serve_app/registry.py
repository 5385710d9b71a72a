"""A small named Ray actor where model replicas report their status (placement, GPU ids,
fallback, cache stats) with a heartbeat, so the router can answer /v1/replicas and /readyz
without probing replicas through the load-balanced handle.

The registry executes calls out of order. A Ray actor that keeps its callers' order waits for a
call that was cancelled before it was sent (a /readyz whose client went away while the call
waited) and, in Ray 2.60, goes on waiting while the same caller keeps calling: one cancelled
probe used to leave /readyz, /metrics and /v1/replicas hanging for good. Nothing here needs the
order: a report after its replica's removal is ignored."""

from __future__ import annotations

import time
from typing import Any

import ray

REGISTRY_NAME = "serve_app_replica_registry"
REGISTRY_NAMESPACE = "serve_app"
HEARTBEAT_S = 2.0
STALE_AFTER_S = 3 * HEARTBEAT_S
# Removed replicas are remembered this long, so that a heartbeat that overtook its removal
# cannot bring one back; replica ids are never reused.
FORGET_REMOVED_AFTER_S = 60 * HEARTBEAT_S


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._removed: dict[str, float] = {}

    def report(self, replica_id: str, status: dict[str, Any]) -> None:
        if replica_id not in self._removed:
            self._entries[replica_id] = {**status, "last_seen": time.time()}

    def remove(self, replica_id: str) -> None:
        now = time.time()
        self._entries.pop(replica_id, None)
        self._removed = {r: at for r, at in self._removed.items() if now - at < FORGET_REMOVED_AFTER_S}
        self._removed[replica_id] = now

    def live(self, app_name: str) -> list[dict[str, Any]]:
        now = time.time()
        return [e for e in self._entries.values()
                if e.get("app") == app_name and now - e["last_seen"] < STALE_AFTER_S]


def get_registry() -> Any:
    return ReplicaRegistry.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached",
        allow_out_of_order_execution=True,
    ).remote()
