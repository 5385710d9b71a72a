"""`serve-app`: thin commands over Ray's own tools for running this app on a Ray cluster.

    serve-app run CONFIG [--port 8000]              local Ray + Serve in the foreground (`make serve`)
    serve-app run --model HF_ID_OR_DIR [--gpus N]   the same for one model, no config file
    serve-app build CONFIG | --model ...            print the complete Ray Serve config `serve deploy` takes
    serve-app deploy CONFIG --address URL [--wait]  build, then PUT it to the dashboard as `serve deploy` does
    serve-app status --address URL [--json] [--api-key KEY]  apps, deployments, replicas: placement, fallback
    serve-app submit CONFIG --address URL           run `python -m serve_app.job CONFIG` as a Ray job
    serve-app configs                               the configs shipped with the package, usable by name
    serve-app kuberay CONFIG                        print a KubeRay RayService manifest

CONFIG is one of `configs/*.yaml` (a Ray Serve config whose `args` are ours) or a bare ``models:``
file. Under `serve deploy`, Ray Serve takes an application's code version from its ``import_path``,
``runtime_env`` and ``args``: any change of ``args`` rebuilds the app and replaces every replica,
while a change of a deployment's ``user_config`` alone is applied in place by ``reconfigure``. So
`build` moves what replicas apply in place (sampling defaults, the constraint registry) out of
``args`` into each model deployment's ``user_config``; ``limits`` are in both, because the router
validates requests against them too (changing a limit rolls the app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from serve_app.config import (
    IN_PLACE_ONLY,
    AppConfig,
    ConfigError,
    ModelConfig,
    ServerConfig,
    parse_config,
    read_yaml,
)
from serve_app.readiness import NotReadyError, wait_until_ready

IMPORT_PATH = "serve_app.app:build_app"
DEFAULT_APPLICATION = {"name": "serve_app", "route_prefix": "/", "import_path": IMPORT_PATH}
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ENTRYPOINT = "serve_app.job"  # `python -m serve_app.job CONFIG` (cluster/job_entrypoint.py is the same)
# Never uploaded with a job's working dir (virtualenvs alone can be gigabytes), whatever
# .gitignore says: secrets (env files, keys, certificates, cloud credentials) stay on this machine.
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
                   ".ruff_cache", "bench/out",
                   ".env", ".env.*", "**/.env", "**/.env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
                   "*.keystore", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".netrc", ".npmrc", ".pypirc",
                   ".aws", ".ssh", ".gnupg", ".docker", ".kube", "*credentials*.json", "*.tfstate", "*.tfvars"]
HTTP_TIMEOUT_S = 10
POLL_S = 1.0
# KubeRay's Serve service targets the proxies on 8000; inside a pod they must listen on all interfaces.
KUBERAY_HTTP_OPTIONS = {"host": "0.0.0.0", "port": 8000}
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
MODELS_MOUNT = "/models"
# A common cloud ratio (4 GiB per vCPU); GPU pods also hold the weights in RAM while loading.
MEMORY_GIB_PER_CPU = 4


class CliError(Exception):
    """Shown to the user as one line, exit code 1."""


# -- build -------------------------------------------------------------------------------------


def app_args(config: AppConfig) -> dict[str, Any]:
    """What replicas and router need at construction; unset fields stay unset, so `args` read like the input."""
    dumped = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    dumped["models"] = [{key: value for key, value in model.items() if key not in IN_PLACE_ONLY}
                        for model in dumped["models"]]
    return dumped


def deployment_override(model: ModelConfig, server: ServerConfig) -> dict[str, Any]:
    """Serve's per-deployment options for one model, in the config schema's terms."""
    from serve_app.app import deployment_options  # here: `status` and `submit` need none of the app's code

    options = deployment_options(model, server)
    # Under `serve deploy` the code version comes from `args` (where ModelConfig.version is), not from
    # the deployment's `version` option, which the config schema does not even accept.
    options.pop("version", None)
    return options


def merge_overrides(derived: list[dict[str, Any]], given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config file's own `deployments` entries win, key by key, over what we derive."""
    by_name = {entry["name"]: entry for entry in given}
    merged = [{**entry, **by_name.pop(entry["name"], {})} for entry in derived]
    return merged + list(by_name.values())


def build_application(application: dict[str, Any]) -> dict[str, Any]:
    if application.get("import_path", IMPORT_PATH) != IMPORT_PATH:
        return application  # someone else's app in the same file: pass it through untouched
    config = parse_config(application.get("args", {}))
    from serve_app.app import router_options

    # The router too, with the options the config gives it (else Serve keeps the decorator's).
    derived = [router_options(config.server)] + [deployment_override(model, config.server) for model in config.models]
    return {**DEFAULT_APPLICATION, **application,
            "args": app_args(config),
            "deployments": merge_overrides(derived, application.get("deployments", []))}


def serve_config(data: dict[str, Any]) -> dict[str, Any]:
    """Ours or a Ray Serve config file -> a complete Ray Serve config, validated by Ray's own schema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    top = dict(data) if "applications" in data else {"applications": [{**DEFAULT_APPLICATION, "args": data}]}
    top["applications"] = [build_application(app) for app in top["applications"]]
    try:
        ServeDeploySchema.model_validate(top)
    except ValidationError as error:
        raise ConfigError(f"not a valid Ray Serve config: {error}") from None
    return top


def our_configs(built: dict[str, Any]) -> list[AppConfig]:
    return [parse_config(app["args"]) for app in built["applications"] if app.get("import_path") == IMPORT_PATH]


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=100)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (RayService's serveConfigV2) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _represent_str)


# -- the cluster: dashboard REST API (what `serve deploy` / `serve status` use) ------------------


def use_local_token() -> None:
    """Send the local Ray auth token (~/.ray/auth_token) as `ray start` uses it: `ray start` turns
    token auth on whenever that file exists, but Ray's HTTP clients send the token only when this
    process is in token mode. An explicit RAY_AUTH_MODE is respected."""
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:  # a Ray without token auth
        return
    logger = logging.getLogger(setup.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "token auth is enabled" notice would break our one-line output
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def serve_client(address: str) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    use_local_token()
    return ServeSubmissionClient(address)


def deploy_config(address: str, built: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    # Exactly what `serve deploy` sends: Ray's schema, dumped without the defaults it filled in.
    serve_client(address).deploy_applications(ServeDeploySchema.model_validate(built).model_dump(exclude_unset=True))


def wait_running(address: str, names: list[str], timeout_s: float) -> None:
    """Until every named app is RUNNING; a failed deploy or the timeout is an error."""
    client, deadline = serve_client(address), time.monotonic() + timeout_s
    shown, states = "", {}
    while time.monotonic() < deadline:
        apps = client.get_serve_details().get("applications", {})
        states = {name: apps.get(name, {}).get("status", "NOT_STARTED") for name in names}
        line = f"waiting: {', '.join(f'{name} {state.lower()}' for name, state in states.items())}"
        if line != shown:
            print(line, file=sys.stderr, flush=True)
            shown = line
        failed = [name for name, state in states.items() if state == "DEPLOY_FAILED"]
        if failed:
            raise CliError(f"app {failed[0]} failed to deploy: {one_line(apps[failed[0]].get('message', ''))}")
        if all(state == "RUNNING" for state in states.values()):
            return
        time.sleep(POLL_S)
    raise CliError(f"apps {', '.join(names)} not RUNNING after {timeout_s:.0f} s: {states}")


def http_base(details: dict[str, Any], dashboard: str, route_prefix: str) -> str:
    options = details.get("http_options") or {}
    host = options.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = dashboard.split("://", 1)[-1].rsplit(":", 1)[0]  # the proxies run on the head node too
    return f"http://{host}:{options.get('port', 8000)}{route_prefix.rstrip('/')}"


def get_json(url: str, api_key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def default_api_key() -> str | None:
    """The first key of SERVE_APP_API_KEYS, the variable the router reads its keys from."""
    keys = [k.strip() for k in os.environ.get("SERVE_APP_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def wait_http_ready(url: str, timeout_s: float) -> None:
    try:
        wait_until_ready(url, timeout_s, POLL_S)
    except NotReadyError as error:
        raise CliError(str(error)) from None


# -- status ------------------------------------------------------------------------------------


def app_replicas(details: dict[str, Any], dashboard: str, app: dict[str, Any],
                 api_key: str | None = None) -> list[dict[str, Any]] | str:
    """Our app's own view of its replicas (placement, GPU ids, fallback), or why it is unavailable."""
    if app.get("route_prefix") is None:
        return "no HTTP route"
    try:
        url = f"{http_base(details, dashboard, app['route_prefix'])}/v1/replicas"
        return list(get_json(url, api_key)["replicas"])
    except urllib.error.HTTPError as error:
        if error.code == 401:
            return "unavailable (the app wants an API key: pass --api-key or set SERVE_APP_API_KEYS)"
        return f"unavailable (HTTP {error.code})"
    except (OSError, ValueError, KeyError) as error:
        return f"unavailable ({one_line(str(error))})"


def collect_status(address: str, api_key: str | None = None) -> dict[str, Any]:
    details = serve_client(address).get_serve_details()
    apps = details.get("applications", {})
    return {"http_options": details.get("http_options"),
            "applications": {name: {**app, "app_replicas": app_replicas(details, address, app, api_key)}
                             for name, app in apps.items()}}


def replica_line(replica: dict[str, Any]) -> str:
    gpus = ",".join(replica.get("assigned_gpu_ids") or []) or "-"
    plan = replica.get("plan") or {}
    fallback = f"yes ({replica.get('fallback_reason')})" if replica.get("fell_back_to_cpu") else "no"
    return (f"    replica {replica.get('replica_id')} model={replica.get('model')} version={replica.get('version')} "
            f"config={replica.get('config_hash')} device={plan.get('device', '?')} dtype={replica.get('dtype')} "
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
        lines += [replica_line(r) for r in replicas] if isinstance(replicas, list) else [f"  replicas: {replicas}"]
    return "\n".join(lines)


# -- submit ------------------------------------------------------------------------------------


def job_request(config: str, working_dir: str) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env: the working dir travels with the job (uploaded to the head).
    A shipped config (`serve-app configs`) outside the working dir travels alone, in a folder of
    its own: the cluster's own serve_app (its image) serves it."""
    root, path = Path(working_dir).resolve(), Path(config).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        if path.parent != shipped_configs_dir().resolve():
            raise CliError(f"config {config} must be inside the working dir {root} (it is uploaded with it)") from None
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="serve-app-job-"))
        relative = Path(path.name)
        (root / relative).write_text(path.read_text())
    # `python` is the cluster's interpreter, not ours: the job runs on the head node.
    entrypoint = f"python -m {ENTRYPOINT} {shlex.quote(relative.as_posix())}"
    return entrypoint, {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES}


def shipped_configs_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("serve_app") / "configs"))


def shipped_configs() -> dict[str, Path]:
    folder = shipped_configs_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_config(config: str) -> str:
    """CONFIG as given when that file exists; else a shipped config by name (`local`,
    `local.yaml` or `configs/local.yaml`), so the commands work outside a checkout."""
    if Path(config).exists():
        return config
    stem = Path(config).name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs()
    if stem in shipped and Path(config).parent in (Path("."), Path("configs")):
        return str(shipped[stem])
    return config


def configs(args: argparse.Namespace) -> int:
    for name, path in shipped_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:<16} {path}  {first}")
    return 0


async def follow_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    serve_config(read_yaml(args.config))  # a bad config fails here, not minutes later on the cluster
    entrypoint, runtime_env = job_request(args.config, args.working_dir)
    print(f"uploading {runtime_env['working_dir']} (without virtualenvs, .git, caches, .env files, keys and "
          f"certificates) to run `{entrypoint}`", file=sys.stderr, flush=True)
    use_local_token()
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    asyncio.run(follow_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


# -- kuberay -----------------------------------------------------------------------------------


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


# -- the commands ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from serve_app.serve import main as serve_main

    argv = ["--host", args.host, "--port", str(args.port), "--timeout-s", str(args.timeout_s)]
    return serve_main(argv + model_argv(args) if args.model else [config_of(args), *argv])


def build(args: argparse.Namespace) -> int:
    from serve_app.serve import model_application

    config = config_of(args)
    data = {"applications": [model_application(args)]} if args.model else read_yaml(config)
    print(dump_yaml(serve_config(data)), end="")
    return 0


def config_of(args: argparse.Namespace) -> str:
    """CONFIG, checking that exactly one of CONFIG and --model was given ("" with --model)."""
    if args.model and args.config:
        raise CliError("give CONFIG or --model, not both")
    if not args.model and not args.config:
        raise CliError("give CONFIG (a YAML file) or --model HF_ID_OR_DIR")
    return str(args.config or "")


def model_argv(args: argparse.Namespace) -> list[str]:
    config_of(args)
    argv = ["--model", args.model, "--engine", args.engine, "--gpus", str(args.gpus), "--dtype", args.dtype,
            "--replicas", str(args.replicas)]
    return argv + (["--name", args.name] if args.name else [])


def deploy(args: argparse.Namespace) -> int:
    built = serve_config(read_yaml(args.config))
    deploy_config(args.address, built)
    names = [app["name"] for app in built["applications"]]
    print(f"deploy request for {', '.join(names)} accepted by {args.address}", file=sys.stderr)
    if args.wait:
        wait_running(args.address, names, args.timeout_s)
        print(f"{', '.join(names)} RUNNING", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    result = collect_status(args.address, args.api_key or default_api_key())
    print(json.dumps(result, indent=2, default=str) if args.json else format_status(result))
    return 0


def kuberay(args: argparse.Namespace) -> int:
    print(kuberay_manifest(args.config, args.name, args.image), end="")
    return 0


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("serve_app")
    except PackageNotFoundError:  # run from a checkout without installing
        from serve_app import __version__

        return str(__version__)


def parser() -> argparse.ArgumentParser:
    from serve_app.serve import READY_TIMEOUT_S, add_model_options

    root = argparse.ArgumentParser(prog="serve-app", description=__doc__.split("\n", 1)[0])
    root.add_argument("--version", action="version", version=f"serve-app {package_version()} (ray {ray_version()})")
    commands = root.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("run", help="serve CONFIG (or --model) on a local Ray cluster, in the foreground")
    sub.add_argument("config", nargs="?")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for ready")
    add_model_options(sub)
    sub.set_defaults(handler=run)
    sub = commands.add_parser("build", help="print the complete Ray Serve config built from CONFIG (or --model)")
    sub.add_argument("config", nargs="?")
    add_model_options(sub)
    sub.set_defaults(handler=build)
    sub = commands.add_parser("deploy", help="deploy CONFIG to a running cluster (as `serve deploy`)")
    sub.add_argument("config")
    _address(sub)
    sub.add_argument("--wait", action="store_true", help="return once every app is RUNNING")
    sub.add_argument("--timeout-s", type=float, default=600)
    sub.set_defaults(handler=deploy)
    sub = commands.add_parser("status", help="apps, deployments and replicas (placement, CPU fallback)")
    _address(sub)
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--api-key", help="bearer key for the app's routes (default: first of SERVE_APP_API_KEYS)")
    sub.set_defaults(handler=status)
    sub = commands.add_parser("submit", help=f"run {ENTRYPOINT} CONFIG as a Ray job")
    sub.add_argument("config")
    _address(sub)
    sub.add_argument("--working-dir", default=".", help="uploaded with the job; must hold CONFIG (a shipped config "
                     "travels alone)")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub.set_defaults(handler=submit)
    sub = commands.add_parser("configs", help="list the configs shipped with the package (usable by name)")
    sub.set_defaults(handler=configs)
    sub = commands.add_parser("kuberay", help="print a KubeRay RayService manifest for CONFIG")
    sub.add_argument("config")
    sub.add_argument("--name", default="serve-app")
    sub.add_argument("--image", default=f"rayproject/ray:{ray_version()}-py311-gpu")
    sub.set_defaults(handler=kuberay)
    return root


def _address(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD,
                     help=f"the Ray dashboard's HTTP address (default: $RAY_DASHBOARD_ADDRESS, else "
                     f"{DEFAULT_DASHBOARD})")


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "config", None):
        args.config = resolve_config(args.config)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        head, *problems = str(error).split("\n")
        message = one_line(f"{head} {'; '.join(p.strip() for p in problems)}")
    except CliError as error:
        message = str(error)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # cluster unreachable, HTTP errors from Ray's clients: one line, no traceback
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        message = f"{type(error).__name__}: {one_line(lines[0])}"
    print(f"serve-app: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
