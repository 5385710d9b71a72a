"""`build_app(args)`: typed config -> Ray Serve application (the YAMLs' ``import_path``).

One deployment per model (`model-<name>`) plus the `router` ingress. Deployment options are
derived from the config here, in one place.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.autoscaling import POLICY_PATH
from serve_app.config import RECONFIGURABLE, AppConfig, ModelConfig, ServerConfig, parse_config
from serve_app.replica import ModelReplica, actor_options, deployment_name
from serve_app.router import Router

# A replica is busy with one batch at a time; more ongoing requests wait in its own queue.
MAX_ONGOING_PER_REPLICA = 64
# How often Serve calls a replica's check_health (a stuck replica is replaced after a few misses).
HEALTH_CHECK_PERIOD_S = 10


def user_config(model: ModelConfig) -> dict[str, Any]:
    """What a replica applies in place through `reconfigure`, without reloading the model."""
    dumped = model.model_dump(mode="json", by_alias=True)
    return {key: dumped[key] for key in RECONFIGURABLE}


def deployment_options(model: ModelConfig, server: ServerConfig | None = None) -> dict[str, Any]:
    scaling = model.autoscaling
    options: dict[str, Any] = {
        "name": deployment_name(model.name),
        "logging_config": (server or ServerConfig()).logging.serve_options(),
        "ray_actor_options": actor_options(model),
        "max_ongoing_requests": MAX_ONGOING_PER_REPLICA,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": model.graceful_shutdown_timeout_s,
        "user_config": user_config(model),
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": max(1, scaling.min_replicas),
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s, "metrics_interval_s": scaling.metrics_interval_s,
            "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {
                "target_queue_depth": scaling.target_queue_depth, "smoothing": scaling.smoothing}},
        }
    return options


ROUTER_NAME = "router"


def router_options(server: ServerConfig) -> dict[str, Any]:
    return {"name": ROUTER_NAME, "num_replicas": server.router_replicas,
            "ray_actor_options": {"num_cpus": server.router_num_cpus},
            "max_ongoing_requests": server.router_max_ongoing_requests,
            "logging_config": server.logging.serve_options()}


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    config = args if isinstance(args, AppConfig) else parse_config(args)
    handles = {}
    for model in config.models:
        options = deployment_options(model, config.server)
        deployment = serve.deployment(ModelReplica).options(**options)  # type: ignore[attr-defined]
        handles[model.name] = deployment.bind(model.model_dump(mode="json", by_alias=True))
    router: Any = Router.options(**router_options(config.server))  # type: ignore[attr-defined]
    return router.bind(config.model_dump(mode="json", by_alias=True), handles)
