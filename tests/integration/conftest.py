"""One real local Ray cluster (with 4 logical GPUs) and Serve on a private port, shared by the
integration tests; the apps are deployed once per session. Their models sample greedily unless a
request says otherwise (and a test that samples gives a seed): no test can fail by chance."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from serve_app.readiness import wait_until_ready

API_KEY = "sk-test-0123456789"
MAIN_APP = {"server": {"api_keys": [API_KEY], "max_body_bytes": 256 * 1024, "logging": {"encoding": "JSON"}},
            "models": [
    {"name": "tiny", "source": "builtin:tiny-random-llama",
     "placement": {"num_cpus": 0.5},
     "autoscaling": {"min_replicas": 2, "max_replicas": 2},
     "limits": {"max_new_tokens": 128}, "sampling": {"temperature": 0},
     "constraints": {"yes_no": {"type": "choice", "choices": ["yes", "no"]}}},
    {"name": "tiny-small", "source": "builtin:tiny-random-llama",
     "placement": {"num_cpus": 0.5},
     "limits": {"max_new_tokens": 32, "max_schema_bytes": 256, "max_pending_requests": 2},
     "sampling": {"temperature": 0}},
    {"name": "thinker", "source": "builtin:tiny-thinking-llama",
     "placement": {"num_cpus": 0.5},
     "limits": {"max_new_tokens": 128}, "sampling": {"temperature": 0}},
    {"name": "guarded", "source": "builtin:tiny-random-llama",
     "placement": {"num_cpus": 0.5},
     "limits": {"max_new_tokens": 16, "compile_timeout_s": 3, "max_grammar_bytes": 4096},
     "sampling": {"temperature": 0},
     "backends": {"regex": "outlines_core"}},
]}
GPU_APP = {"models": [
    {"name": "half", "source": "builtin:tiny-random-llama",
     "placement": {"gpus_per_replica": 0.5, "num_cpus": 0.5},
     "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
    {"name": "double", "source": "builtin:tiny-random-llama",
     "placement": {"gpus_per_replica": 2, "num_cpus": 0.5}},
]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 240) -> None:
    wait_until_ready(url, timeout_s)


def fresh_replicas(client: httpx.Client, model: str, after: float | None = None, prefix: str = "",
                   timeout_s: float = 120) -> list[dict]:
    """The model's replicas as they reported after `after` (default: now), so that whatever
    finished before it is in the numbers: heartbeats arrive every 2 s, and a count read without
    waiting for one can be stale. Waits on the reports themselves, not on a fixed sleep."""
    since = time.time() if after is None else after
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [r for r in client.get(f"{prefix}/v1/replicas").json()["replicas"] if r["model"] == model]
        if found and all(r["last_seen"] > since for r in found):
            return found
        time.sleep(0.2)
    raise TimeoutError(f"no report from every {model} replica after {since} within {timeout_s} s")


@pytest.fixture(scope="session")
def serve_cluster(tiny_model_dir):
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.guard import proxy_env

    os.environ.update(proxy_env(MAIN_APP["server"]["max_body_bytes"]))  # read by Serve's proxy at its start
    # An isolated cluster: a bare ray.init() would join any `ray start` cluster on this machine,
    # and two Serve instances on one port silently split traffic.
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    serve.run(build_app(MAIN_APP), name="main", route_prefix="/", blocking=False)
    serve.run(build_app(GPU_APP), name="gpus", route_prefix="/gpus", blocking=False)
    wait_ready(f"{base}/readyz")
    wait_ready(f"{base}/gpus/readyz")
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(serve_cluster):
    with httpx.Client(base_url=serve_cluster, timeout=120, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        yield http
