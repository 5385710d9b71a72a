"""`make serve`: start a local Ray cluster and serve a Ray Serve config file on 127.0.0.1:8000.

    python -m serve_app.serve [configs/local.yaml] [--port 8000]
    python -m serve_app.serve --model HF_ID_OR_DIR [--gpus N] [--dtype D]    (no config file)

Prepares built-in models, deploys the config's first application, waits until every model has a
warm replica (printing each deployment's state as it changes; `--timeout-s`), prints the URL and
a curl example, and shuts everything down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import time
from typing import Any

from serve_app.config import ConfigError, first_application, parse_config, read_yaml
from serve_app.models import BUILTIN_PREFIX, prepare
from serve_app.readiness import NotReadyError, wait_until_ready

READY_TIMEOUT_S = 600


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def example(base: str, model: str) -> str:
    import json

    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Invent a person."}],
                       "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person}}})
    return f"curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{body}'"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Serve one model without a config file (`serve-app run|build --model ...`)."""
    parser.add_argument("--model", help="a Hugging Face id, a local directory, a .gguf file or builtin:<name>, "
                        "instead of CONFIG")
    parser.add_argument("--name", help="the model's name in the API (default: from --model)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per replica: 0 (CPU), a share (0.5) or N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--replicas", type=int, default=1)


def model_application(args: argparse.Namespace) -> dict[str, Any]:
    """The application `--model` and its options describe, as a config file would."""
    model: dict[str, Any] = {"name": args.name or model_name(args.model), "source": args.model,
                             "engine": args.engine, "dtype": args.dtype,
                             "placement": {"gpus_per_replica": int(args.gpus) if float(args.gpus).is_integer()
                                           else args.gpus},
                             "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas}}
    return {"name": "serve_app", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"models": [model]}}


def model_name(source: str) -> str:
    """An API name from a source: its last path part, file suffix dropped, odd characters as '-'."""
    last = source.removeprefix(BUILTIN_PREFIX).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", last).lstrip("._:-")[:128]
    return name or "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.serve")
    parser.add_argument("config", nargs="?", default=None, help="default: configs/local.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for ready")
    add_model_options(parser)
    args = parser.parse_args(argv)
    if args.model and args.config:
        print("error: give CONFIG or --model, not both", file=sys.stderr)
        return 2
    try:
        if args.model:
            application = model_application(args)
        else:
            application = first_application(read_yaml(args.config or "configs/local.yaml"))
        config = parse_config(application.get("args", {}))
    except (ConfigError, KeyError, IndexError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if port_in_use(args.host, args.port):
        # Serve would silently share the port with whatever is there (SO_REUSEPORT).
        print(f"error: {args.host}:{args.port} is already in use; stop that server or pass --port", file=sys.stderr)
        return 2
    for model in config.models:
        if model.source.startswith(BUILTIN_PREFIX):
            prepare(model.source.removeprefix(BUILTIN_PREFIX))
    return _serve(config, application, args.host, args.port, args.timeout_s)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def deployment_progress(app_name: str) -> str | None:
    """One line: each deployment of the app, its state and its replicas' states."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the controller busy starting: no line this time
        return None
    if app is None:
        return None
    if _word(app.status) == "deploy_failed":
        raise NotReadyError(f"app {app_name} failed to deploy: {' '.join(str(app.message).split())[:500]}")
    parts = []
    for name, deployment in sorted(app.deployments.items()):
        replicas = ", ".join(f"{count} {_word(state)}" for state, count in sorted(
            deployment.replica_states.items(), key=lambda item: _word(item[0])))
        parts.append(f"{name}: {_word(deployment.status)}" + (f" ({replicas})" if replicas else ""))
    return "waiting: " + "; ".join(parts) if parts else None


def _word(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def _serve(config: Any, application: dict[str, Any], host: str, port: int, timeout_s: float = READY_TIMEOUT_S) -> int:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.guard import proxy_env

    # Before Ray starts: its HTTP proxy reads these when it starts (the body limit as it streams in).
    os.environ.update(proxy_env(config.server.max_body_bytes))
    # Ray starts its workers at niceness 15; on a machine that only serves, a replica would then
    # yield its cores to anything else on it (one run each at 16 clients on 2 cores: 181 vs 200
    # tokens/s, within run-to-run spread).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", include_dashboard=False)
    # Ctrl-C and SIGTERM both shut down cleanly (a shell's background job would ignore SIGINT).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        prefix = application.get("route_prefix", "/")
        name = application.get("name", "serve_app")
        # Deployed without waiting here: the wait below shows progress and has a timeout.
        serve.run_many([serve.RunTarget(build_app(config), name=name, route_prefix=prefix)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        base = f"http://{host}:{port}{prefix.rstrip('/')}"
        wait_until_ready(f"{base}/readyz", timeout_s, progress=lambda: deployment_progress(name))
        print(f"\nserve_app is ready on {base}  (models: {', '.join(m.name for m in config.models)})")
        print(f"try:\n  {example(base, config.models[0].name)}\nCtrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
    except NotReadyError as error:
        print(f"error: {error} (the last state is above; --timeout-s waits longer)", file=sys.stderr, flush=True)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
