"""Queue-depth autoscaling, as a policy for Ray Serve's own autoscaler.

Ray Serve's default policy scales on ongoing requests, a poor signal for LLMs whose requests
differ 100x in length. Each model replica reports its own queue (`record_autoscaling_stats`:
rows waiting for the decode loop + rows running in it); Serve aggregates it over
`look_back_period_s` and calls this policy about every 0.1 s.

    depth     = sum over replicas of queue_depth + requests queued at handles
    smoothed  = smoothing * depth + (1 - smoothing) * previous smoothed   (an EMA)
    desired   = ceil(smoothed / target_queue_depth)

Serve then applies min/max replicas and the upscale/downscale delays from the config. Kept in
the installed package: a policy given by import path must be importable wherever
`serve status` runs.
"""

from __future__ import annotations

import math
from typing import Any

POLICY_PATH = "serve_app.autoscaling:QueueDepthPolicy"
QUEUE_DEPTH_METRIC = "queue_depth"


def _value(maybe_callable: Any) -> Any:
    return maybe_callable() if callable(maybe_callable) else maybe_callable


def total_queue_depth(ctx: Any) -> float:
    """Rows waiting or running in every replica, plus requests still queued at the handles."""
    per_replica = (_value(ctx.aggregated_metrics) or {}).get(QUEUE_DEPTH_METRIC, {})
    queued_at_handles = _value(ctx.total_queued_requests) or 0.0
    return float(sum(per_replica.values())) + float(queued_at_handles)


def desired_replicas(depth: float, target_queue_depth: float) -> int:
    return max(0, math.ceil(depth / target_queue_depth - 1e-9))


class QueueDepthPolicy:
    """Instantiated once by Serve with ``policy_kwargs``; called with an AutoscalingContext."""

    def __init__(self, target_queue_depth: float = 4.0, smoothing: float = 0.5) -> None:
        if target_queue_depth <= 0 or not 0 < smoothing <= 1:
            raise ValueError("target_queue_depth must be > 0 and 0 < smoothing <= 1")
        self.target_queue_depth = target_queue_depth
        self.smoothing = smoothing

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        depth = total_queue_depth(ctx)
        previous = ctx.policy_state.get("smoothed_depth", depth)
        smoothed = self.smoothing * depth + (1 - self.smoothing) * previous
        desired = desired_replicas(smoothed, self.target_queue_depth)
        return desired, {"smoothed_depth": smoothed, "queue_depth": depth}
