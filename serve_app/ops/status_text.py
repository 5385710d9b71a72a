"""`serve-app status` as lines: apps, deployments (with Serve's notes), replicas (placement, fallback)."""

from __future__ import annotations

from typing import Any

from serve_app.ops import one_line
from serve_app.status import ReplicaStatus, read_statuses


def replica_line(replica: ReplicaStatus) -> str:
    gpus = ",".join(replica.assigned_gpu_ids) or "-"
    fallback = f"yes ({replica.fallback_reason})" if replica.fell_back_to_cpu else "no"
    return (f"    replica {replica.replica_id} model={replica.model} engine={replica.engine} version={replica.version} "
            f"config={replica.config_hash} device={replica.plan.get('device', '?')} dtype={replica.dtype} "
            f"gpus={gpus} cpu_fallback={fallback}")


def deployment_lines(name: str, deployment: dict[str, Any]) -> list[str]:
    states: dict[str, int] = {}
    for replica in deployment.get("replicas", []):
        states[replica.get("state", "?")] = states.get(replica.get("state", "?"), 0) + 1
    counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items())) or "no replicas"
    lines = [f"  deployment {name}: {deployment.get('status')} ({counts})"]
    if deployment.get("message"):
        # e.g. replicas waiting for GPUs the cluster does not have: Serve only says so here.
        lines.append(f"    note: {one_line(deployment['message'])}")
    return lines


def format_status(status: dict[str, Any]) -> str:
    if not status["applications"]:
        return "no Serve applications on this cluster"
    lines = []
    for name, app in status["applications"].items():
        lines.append(f"app {name}: {app.get('status')}  route {app.get('route_prefix')}")
        if app.get("message"):
            lines.append(f"  note: {one_line(app['message'])}")
        for deployment_name, deployment in app.get("deployments", {}).items():
            lines += deployment_lines(deployment_name, deployment)
        replicas = app["app_replicas"]
        lines += [replica_line(r) for r in read_statuses(replicas)] if isinstance(replicas, list) else \
            [f"  replicas: {replicas}"]
    return "\n".join(lines)
