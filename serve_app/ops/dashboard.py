"""The Ray dashboard's REST API, as `serve deploy` and `serve status` use it, and the app's own
routes behind it (/v1/replicas, /readyz)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from serve_app.ops import CliError, one_line
from serve_app.readiness import NotReadyError, wait_until_ready

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


HTTP_TIMEOUT_S = 10


POLL_S = 1.0


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
