"""A KubeRay RayService manifest for a config: the head (GCS, dashboard, routers), a worker group
per model shaped by its placement, token auth and the models volume; refused when its pods cannot
hold every replica at its maximum."""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from serve_app.config import ModelConfig, read_yaml
from serve_app.ops import CliError
from serve_app.ops.serve_config import dump_yaml, our_configs, serve_config

# KubeRay's Serve service targets the proxies on 8000; inside a pod they must listen on all interfaces.
KUBERAY_HTTP_OPTIONS = {"host": "0.0.0.0", "port": 8000}


HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}


MODELS_MOUNT = "/models"


# A common cloud ratio (4 GiB per vCPU); GPU pods also hold the weights in RAM while loading.
MEMORY_GIB_PER_CPU = 4


def pod_shape(model: ModelConfig) -> tuple[int, int]:
    """(GPUs per pod, replicas per pod): a GPU share packs replicas onto one card, N GPUs take a pod."""
    gpus = model.placement.gpus_per_replica
    if gpus == 0:
        return 0, 1
    if gpus < 1:
        return 1, math.floor(1 / gpus)
    return int(gpus), 1


def container_env(max_body_bytes: int) -> list[dict[str, str]]:
    """Every pod runs a Serve proxy: each enforces the body limit as the body streams in."""
    from serve_app.guard import proxy_env

    return [{"name": k, "value": v} for k, v in proxy_env(max_body_bytes).items()]


def worker_group(model: ModelConfig, image: str, max_body_bytes: int) -> dict[str, Any]:
    gpus, per_pod = pod_shape(model)
    cpus = model.placement.num_cpus * per_pod
    limits: dict[str, Any] = {"cpu": f"{cpus:g}", "memory": f"{math.ceil(cpus * MEMORY_GIB_PER_CPU)}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    scaling = model.autoscaling
    return {
        "groupName": (re.sub(r"[^a-z0-9-]+", "-", model.name.lower()).strip("-")[:40] or "model") + "-workers",
        "replicas": math.ceil(scaling.min_replicas / per_pod),
        "minReplicas": math.ceil(scaling.min_replicas / per_pod),
        "maxReplicas": math.ceil(scaling.max_replicas / per_pod),
        "rayStartParams": {},
        "template": {"spec": {"containers": [
            {"name": "ray-worker", "image": image, "env": container_env(max_body_bytes),
             "resources": {"limits": limits, "requests": dict(limits)}}]}},
    }


def secret_env(name: str) -> list[dict[str, Any]]:
    """Ray's token auth on every pod (the dashboard and job API refuse requests without the token),
    and the hub token for gated models; both from Secrets the operator creates (docs/operations.md)."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": f"{name}-ray-token", "key": "token"}}},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": f"{name}-hf-token", "key": "token",
                                                                "optional": True}}}]


def model_volume(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the model directories (configs name sources under /models), read-only."""
    return ([{"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models", "readOnly": True}}],
            [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}])


def router_cpus(built: dict[str, Any]) -> float:
    """CPUs every router replica of every app reserves (the head runs them)."""
    total = 0.0
    for app in built["applications"]:
        for deployment in app.get("deployments", []):
            if deployment.get("name") == "router":
                cpus = deployment.get("ray_actor_options", {}).get("num_cpus", 0.25)
                total += float(cpus) * int(deployment.get("num_replicas", 1))
    return total


def head_group(image: str, max_body_bytes: int, name: str, cpus: float) -> dict[str, Any]:
    ports = [{"containerPort": port, "name": name} for name, port in
             (("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000))]
    env = [*container_env(max_body_bytes), *secret_env(name),
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    return {
        # The head keeps the GCS, dashboard, Serve controller, a proxy and the routers (their CPUs
        # are what it offers Ray); model replicas run on the worker groups. The dashboard listens on
        # the pod's own IP (kubectl port-forward reaches it), behind Ray's token auth.
        "rayStartParams": {"num-cpus": str(math.ceil(cpus)), "dashboard-host": "$(POD_IP)"},
        "template": {"spec": {"containers": [
            {"name": "ray-head", "image": image, "ports": ports, "env": env,
             "resources": {"limits": HEAD_RESOURCES, "requests": dict(HEAD_RESOURCES)}}]}},
    }


def rayservice(built: dict[str, Any], name: str, image: str) -> dict[str, Any]:
    configs = our_configs(built)
    models = [model for config in configs for model in config.models]
    max_body = max(config.server.max_body_bytes for config in configs)  # one proxy serves every app
    serve_v2 = {**built, "http_options": KUBERAY_HTTP_OPTIONS}
    autoscales = any(m.autoscaling.min_replicas != m.autoscaling.max_replicas for m in models)
    volumes, mounts = model_volume(name)
    workers = [worker_group(model, image, max_body) for model in models]
    for group in workers:
        spec = group["template"]["spec"]
        spec["volumes"] = volumes
        container = spec["containers"][0]
        container["env"] = [*container["env"], *secret_env(name)]
        container["volumeMounts"] = mounts
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name},
        "spec": {
            "serveConfigV2": dump_yaml(serve_v2),
            "rayClusterConfig": {
                "rayVersion": ray_version(), "enableInTreeAutoscaling": autoscales,
                "headGroupSpec": head_group(image, max_body, name, router_cpus(built)),
                "workerGroupSpecs": workers,
            },
        },
    }


def unschedulable(manifest: dict[str, Any]) -> list[str]:
    """Which actors of the manifest's apps, every deployment at its most replicas, find no room in
    the pods it declares (the head, and each worker group at maxReplicas), packed largest first
    as Ray's scheduler may at worst; empty when everything fits."""
    cluster = manifest["spec"]["rayClusterConfig"]
    pods: list[list[float]] = []  # [cpus, gpus] left per pod
    head = cluster["headGroupSpec"]
    pods.append([float(head["rayStartParams"].get("num-cpus", _quantity(head, "cpu"))), 0.0])
    for group in cluster["workerGroupSpecs"]:
        cpus = float(group.get("rayStartParams", {}).get("num-cpus", _quantity(group, "cpu")))
        pods += [[cpus, float(_quantity(group, "nvidia.com/gpu"))] for _ in range(int(group["maxReplicas"]))]
    actors = []
    for app in yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]:
        for deployment in app.get("deployments", []):
            options = deployment.get("ray_actor_options", {})
            scaling = deployment.get("autoscaling_config") or {}
            count = int(scaling.get("max_replicas", deployment.get("num_replicas", 1)))
            actors += [(f"{app['name']}/{deployment['name']}#{i}", float(options.get("num_cpus", 1)),
                        float(options.get("num_gpus", 0))) for i in range(count)]
    missing = []
    for actor, cpus, gpus in sorted(actors, key=lambda a: (a[2], a[1]), reverse=True):
        pod = next((p for p in pods if p[0] + 1e-9 >= cpus and p[1] + 1e-9 >= gpus), None)
        if pod is None:
            missing.append(f"{actor} ({cpus:g} CPU, {gpus:g} GPU)")
        else:
            pod[0] -= cpus
            pod[1] -= gpus
    return missing


def _quantity(group: dict[str, Any], resource: str) -> float:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return float(str(limits.get(resource, 0)))


def kuberay_manifest(config: str, name: str, image: str) -> str:
    manifest = rayservice(serve_config(read_yaml(config)), name, image)
    missing = unschedulable(manifest)
    if missing:
        raise CliError(f"the manifest's pods cannot hold every replica at its maximum: no room for {missing[0]}"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    header = (f"# Generated by `serve-app kuberay {config}`; regenerate instead of editing.\n"
              f"# The image must contain serve_app (e.g. FROM {image} + `pip install .`); models are read from the\n"
              f"# PersistentVolumeClaim {name}-models at {MODELS_MOUNT}; Secrets {name}-ray-token (Ray's token auth)\n"
              f"# and, for gated models, {name}-hf-token (key `token`). See docs/operations.md.\n")
    return header + dump_yaml(manifest)


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")
