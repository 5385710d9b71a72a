"""Cluster operations against a REAL Ray head (`ray start --head` on 127.0.0.1, its own ports and
temp dir), driven only through the `serve-app` CLI, Ray's dashboard REST API and HTTP.

This pytest process also hosts another Ray cluster (tests/integration/conftest.py), so nothing here
calls `ray.init`, and the head is stopped by killing only its own processes (never `ray stop`).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVE_APP = str(BIN / "serve-app")
APP = "serve_app"
MODEL_DEPLOYMENT = "model-tiny"
# Replica starts take 30-60 s on a busy 2-core box; nothing here asserts on time.
READY_TIMEOUT_S = 420
WORKER_PORTS = 200
CLIENT_THREADS = 3
MAX_REQUESTS = 20_000
MAX_LOOP_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(size: int) -> int:
    """Below Linux's ephemeral range and away from Ray's default worker ports (10002-19999)."""
    for _ in range(200):
        start = random.randrange(20_000, 30_000 - size)
        if all(port_free(p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free port range for Ray workers")


@dataclass
class Head:
    temp_dir: str
    dashboard: str
    http_port: int
    env: dict[str, str]
    token: str
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def dashboard_get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.dashboard}{path}", headers=self.auth, timeout=10)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def head_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    # Token auth, as Ray turns on by default, with this head's own token (every client here gets it).
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    # The job entrypoint runs `python ...` on the head: it must be this virtualenv's interpreter.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def start_command(temp_dir: str, ports: dict[str, int], worker_start: int) -> list[str]:
    return [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
            "--num-cpus=8", "--num-gpus=0",
            f"--min-worker-port={worker_start}", f"--max-worker-port={worker_start + WORKER_PORTS - 1}",
            *[f"--{name}={port}" for name, port in ports.items()]]


def head_processes(head: Head) -> list[psutil.Process]:
    """Every process started for this head: those naming its temp dir, and all their descendants
    (workers rename themselves `ray::...`, but they are children of this head's raylet)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(head.temp_dir in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def signal_all(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            continue


def stop_head(head: Head) -> None:
    """SIGTERM, then SIGKILL whatever of this head is still there (some Ray daemons ignore SIGTERM)."""
    signal_all(head_processes(head), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while head_processes(head) and time.monotonic() < deadline:
        time.sleep(2)
        signal_all(head_processes(head), signal.SIGKILL)


@pytest.fixture(scope="module")
def head(tiny_model_dir: str) -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="rayops")  # short: Ray's unix socket paths must fit 107 bytes
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port"]
    ports = {name: free_port() for name in names}
    head = Head(temp_dir, f"http://127.0.0.1:{ports['dashboard-port']}", free_port(), head_env(token_path),
                token_path.read_text(), ports)
    try:
        started = subprocess.run(start_command(temp_dir, ports, free_port_range(WORKER_PORTS)), env=head.env,
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        wait_for(lambda: head.dashboard_get("/api/version").status_code == 200, 120, "dashboard")
        yield head
    finally:
        stop_head(head)
        assert not head_processes(head), "processes of the test head survived"
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- helpers -----------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached after {timeout_s} s")


def serve_config(http_port: int, *, default_tokens: int = 8, version: str = "1") -> dict[str, Any]:
    model = {"name": "tiny", "source": "builtin:tiny-random-llama", "version": version,
             "placement": {"num_cpus": 0.5}, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
             "limits": {"max_new_tokens": 16}, "sampling": {"max_new_tokens": default_tokens},
             "graceful_shutdown_timeout_s": 30}
    return {"http_options": {"host": "127.0.0.1", "port": http_port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve_app.app:build_app",
                              "args": {"models": [model]}}]}


def write_config(directory: Path, name: str, config: dict[str, Any]) -> str:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def cli(*args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SERVE_APP, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def serve_details(head: Head) -> dict[str, Any]:
    return dict(head.dashboard_get("/api/serve/applications/").json())


def model_replicas(head: Head) -> list[dict[str, Any]]:
    app = serve_details(head).get("applications", {}).get(APP, {})
    return list(app.get("deployments", {}).get(MODEL_DEPLOYMENT, {}).get("replicas", []))


def new_replicas_running(head: Head, old_ids: set[str], count: int) -> bool:
    running = [r for r in model_replicas(head) if r["state"] == "RUNNING" and r["replica_id"] not in old_ids]
    return len(running) >= count


def replaced(head: Head, old_ids: set[str], count: int) -> bool:
    app = serve_details(head).get("applications", {}).get(APP, {})
    replicas = model_replicas(head)  # empty while the app is being rebuilt
    ids = {r["replica_id"] for r in replicas}
    return (app.get("status") == "RUNNING" and len(replicas) == count and not ids & old_ids
            and all(r["state"] == "RUNNING" for r in replicas))


@dataclass
class Outcome:
    started: float
    status: int | None
    body: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class ClientLoop:
    """Threads posting /v1/generate to 127.0.0.1, bounded by a request count and a time limit."""

    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        deadline = time.monotonic() + MAX_LOOP_S
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self.stop.is_set() and time.monotonic() < deadline and len(self.outcomes) < MAX_REQUESTS:
                self.record(self.one(http))

    def one(self, http: httpx.Client) -> Outcome:
        started = time.monotonic()
        try:
            response = http.post("/v1/generate", json={"model": "tiny", "prompt": "x"})
        except httpx.HTTPError as error:
            return Outcome(started, None, error=repr(error))
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        return Outcome(started, response.status_code, body, None if response.status_code == 200 else response.text)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def ok(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self.lock:
            return [o.body for o in self.outcomes if o.status == 200 and o.body and o.started >= since]

    def failures(self) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.status != 200]


def on_every_replica(bodies: list[dict[str, Any]], old_hashes: set[str], ids: set[str]) -> list[dict[str, Any]]:
    """The answers with a new config hash, once each of `ids` has given one (else nothing)."""
    new = [b for b in bodies if b["served_by"]["config_hash"] not in old_hashes]
    return new if served(new, "replica_id") >= ids else []


def served(bodies: list[dict[str, Any]], key: str) -> set[str]:
    return {b["served_by"][key] for b in bodies}


# -- the tests ---------------------------------------------------------------------------------


def test_rollouts_of_user_config_and_version_fail_no_request(head: Head, tmp_path: Path) -> None:
    config_a = write_config(tmp_path, "a.yaml", serve_config(head.http_port, default_tokens=8))
    config_b = write_config(tmp_path, "b.yaml", serve_config(head.http_port, default_tokens=2))
    config_c = write_config(tmp_path, "c.yaml", serve_config(head.http_port, default_tokens=2, version="2"))
    deployed = cli("deploy", config_a, "--address", head.dashboard, "--wait", env=head.env, timeout=READY_TIMEOUT_S)
    assert deployed.returncode == 0, deployed.stderr
    wait_for(lambda: httpx.get(f"{head.base}/readyz", timeout=5).status_code == 200, READY_TIMEOUT_S, "A ready")
    original_ids = {r["replica_id"] for r in model_replicas(head)}
    loop = ClientLoop(head.base)
    threads = [threading.Thread(target=loop.run, daemon=True) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    try:
        before_b = wait_for(lambda: len(loop.ok()) >= 10 and loop.ok(), 120, "first answers")
        hash_a = served(before_b, "config_hash")
        assert served(before_b, "version") == {"1"} and len(hash_a) == 1

        # B: only the sampling default changes -> user_config only -> reconfigured in place.
        t_b = time.monotonic()
        assert cli("deploy", config_b, "--address", head.dashboard, env=head.env).returncode == 0
        after_b = wait_for(lambda: on_every_replica(loop.ok(t_b), hash_a, original_ids), READY_TIMEOUT_S,
                           "config B on every replica")
        assert served(after_b, "replica_id") == original_ids, "a user_config change must not replace replicas"
        # Requests sent once every replica answered with B are generated under B's sampling default.
        t_b_seen = time.monotonic()
        under_b = wait_for(lambda: len(loop.ok(t_b_seen)) >= 10 and loop.ok(t_b_seen), 180, "answers under B")
        assert not served(under_b, "config_hash") & hash_a
        assert max(b["usage"]["completion_tokens"] for b in under_b) <= 2 < max(
            b["usage"]["completion_tokens"] for b in before_b)
        assert {r["replica_id"] for r in model_replicas(head)} == original_ids

        # C: the version changes -> `args` change -> replicas replaced gradually.
        t_c = time.monotonic()
        assert cli("deploy", config_c, "--address", head.dashboard, env=head.env).returncode == 0
        wait_for(lambda: new_replicas_running(head, original_ids, 2), READY_TIMEOUT_S, "new replicas running")
        new_running_s = time.monotonic() - t_c
        wait_for(lambda: replaced(head, original_ids, 2), READY_TIMEOUT_S, "all replicas replaced")
        replace_s = time.monotonic() - t_c
        t_done = time.monotonic()
        after_c = wait_for(lambda: len(loop.ok(t_done)) >= 10 and loop.ok(t_done), 180, "answers after C")
        assert served(after_c, "version") == {"2"}
        assert not served(after_c, "replica_id") & original_ids
    finally:
        loop.stop.set()
        for thread in threads:
            thread.join(timeout=180)
    failures = loop.failures()
    total = len(loop.outcomes)
    print(f"\n[rollout] requests: {total} total, {total - len(failures)} ok, {len(failures)} failed "
          f"(before B {len(loop.ok()) - len(loop.ok(t_b))}, B->C {len(loop.ok(t_b)) - len(loop.ok(t_c))}, "
          f"after C {len(loop.ok(t_c))}); deploy of C -> {new_running_s:.1f} s until both new replicas ran, "
          f"{replace_s:.1f} s until all old ones were gone")
    assert not failures, failures[:3]


def test_submitted_job_deploys_the_app_until_ready(head: Head, tmp_path: Path) -> None:
    # Start from no app, so "ready" measures this job's deployment rather than an earlier one.
    httpx.delete(f"{head.dashboard}/api/serve/applications/", headers=head.auth, timeout=120).raise_for_status()
    wait_for(lambda: not serve_details(head).get("applications"), 120, "apps deleted")
    workdir = tmp_path / "job"  # just the config: the job runs the installed serve_app (python -m serve_app.job)
    workdir.mkdir(parents=True)
    write_config(workdir, "app.yaml", serve_config(head.http_port))
    started = time.monotonic()
    job = subprocess.Popen([SERVE_APP, "submit", "app.yaml", "--address", head.dashboard, "--working-dir", "."],
                           cwd=workdir, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: httpx.get(f"{head.base}/readyz", timeout=5).status_code == 200, READY_TIMEOUT_S, "job ready")
    ready_s = time.monotonic() - started
    stdout, stderr = job.communicate(timeout=READY_TIMEOUT_S)
    print(f"\n[submit] seconds from submit to /readyz 200: {ready_s:.1f}")
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.splitlines()[0].startswith("raysubmit_")
    assert "SUCCEEDED" in stderr
    assert httpx.get(f"{head.base}/readyz", timeout=10).json()["ready"] is True
    status = cli("status", "--address", head.dashboard, env=head.env)
    assert status.returncode == 0 and f"app {APP}: RUNNING" in status.stdout, status.stdout + status.stderr
    assert sum(line.strip().startswith("replica ") for line in status.stdout.splitlines()) == 2


def test_a_batch_submitted_as_a_job_answers_every_line_on_the_head(head: Head, tmp_path: Path) -> None:
    import json

    workdir = tmp_path / "batch"  # the config and the input travel with the job; the output is written on the head
    workdir.mkdir(parents=True)
    model = {"name": "tiny", "source": "builtin:tiny-random-llama", "placement": {"num_cpus": 0.5},
             "limits": {"max_new_tokens": 16}, "sampling": {"temperature": 0}}
    write_config(workdir, "batch.yaml", {"models": [model]})
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/generate", "body": {
        "model": "tiny", "prompt": f"item {i}", "constraint": {"type": "choice", "choices": ["red", "blue"]}}})
        for i in range(6)]
    (workdir / "requests.jsonl").write_text("\n".join([*lines, '{"custom_id": "bad", "url": "/v1/generate"}']) + "\n")
    out = tmp_path / "results.jsonl"
    job = cli("submit", "batch.yaml", "--address", head.dashboard, "--working-dir", ".", "--batch",
              "--input", "requests.jsonl", "--output", str(out), env=head.env, cwd=workdir, timeout=READY_TIMEOUT_S)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert job.stdout.splitlines()[0].startswith("raysubmit_") and "SUCCEEDED" in job.stderr
    assert "batch done: 7 lines written" in job.stdout + job.stderr  # the job's own summary, in its logs
    results = {r["custom_id"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == sorted([*(f"c{i}" for i in range(6)), "bad"])
    assert all(results[f"c{i}"]["body"]["valid"] is True for i in range(6))
    assert results["bad"]["status_code"] == 400 and results["bad"]["body"]["error"]["param"] == "body"
    relative = cli("submit", "batch.yaml", "--address", head.dashboard, "--batch", "--input", "requests.jsonl",
                   "--output", "results.jsonl", env=head.env, cwd=workdir)
    assert relative.returncode != 0 and "absolute path" in relative.stderr
