"""`make serve`: start a local Ray cluster and serve a Ray Serve config file on 127.0.0.1:8000.

    python -m serve_app.serve [configs/local.yaml] [--port 8000]

Prepares built-in models, deploys the config's first application, waits until every model has a
warm replica, prints the URL and a curl example, and shuts everything down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from typing import Any

from serve_app.config import ConfigError, first_application, parse_config, read_yaml
from serve_app.models import BUILTIN_PREFIX, prepare
from serve_app.readiness import wait_until_ready

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.serve")
    parser.add_argument("config", nargs="?", default="configs/local.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        application = first_application(read_yaml(args.config))
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
    return _serve(config, application, args.host, args.port)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _serve(config: Any, application: dict[str, Any], host: str, port: int) -> int:
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
        serve.run(build_app(config), name=application.get("name", "serve_app"), route_prefix=prefix)
        base = f"http://{host}:{port}{prefix.rstrip('/')}"
        wait_until_ready(f"{base}/readyz", READY_TIMEOUT_S)
        print(f"\nserve_app is ready on {base}  (models: {', '.join(m.name for m in config.models)})")
        print(f"try:\n  {example(base, config.models[0].name)}\nCtrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
