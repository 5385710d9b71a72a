"""Runs inside a Ray job (`serve-app submit CONFIG`): deploy the app, wait until it is ready, exit.

    python -m serve_app.job CONFIG [--timeout-s 600]      (cluster/job_entrypoint.py is the same)

The app is deployed the way `serve deploy` does it (the dashboard's REST API, declarative), not with
`serve.run`: so a later `serve-app deploy` / `serve deploy` / RayService update rolls it out like
any other config, and the config's `user_config` changes apply in place. The app stays deployed
after this job exits (the Serve controller outlives jobs); the job's exit code says whether it
became ready. Unless the config sets its own `runtime_env.working_dir`, the app's replicas get the
job's uploaded working dir, so the code that was submitted is the code that serves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from serve_app.config import ConfigError, read_yaml
from serve_app.ops import CliError
from serve_app.ops.dashboard import deploy_config, http_base, serve_client, wait_http_ready, wait_running
from serve_app.ops.serve_config import serve_config


def with_job_working_dir(built: dict[str, Any], working_dir: str | None) -> dict[str, Any]:
    if not working_dir:
        return built
    for app in built["applications"]:
        app["runtime_env"] = {"working_dir": working_dir, **app.get("runtime_env", {})}
    return built


def deploy_and_wait(config: str, timeout_s: float) -> None:
    import ray

    context = ray.init()  # the job's own cluster (RAY_ADDRESS is set by the job supervisor)
    dashboard = f"http://{context.dashboard_url}"
    built = with_job_working_dir(serve_config(read_yaml(config)),
                                 ray.get_runtime_context().runtime_env.get("working_dir"))
    deploy_config(dashboard, built)
    names = [app["name"] for app in built["applications"]]
    print(f"deployed {', '.join(names)} through {dashboard}; waiting until RUNNING", flush=True)
    wait_running(dashboard, names, timeout_s)
    details = serve_client(dashboard).get_serve_details()
    for app in built["applications"]:
        url = f"{http_base(details, dashboard, app.get('route_prefix') or '/')}/readyz"
        wait_http_ready(url, timeout_s)
        print(f"{app['name']} is ready: {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.job")
    parser.add_argument("config")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    try:
        deploy_and_wait(args.config, args.timeout_s)
    except (ConfigError, CliError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
