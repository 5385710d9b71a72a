"""Hostile requests at scale: the shapes of tests/hostile.py, randomized (a new draw each run),
against the test app on a local Ray cluster (or --url). Prints the status codes, the slowest
answer and /healthz latency while it runs; exits 1 on any 5xx or answer slower than 2 s.

    .venv/bin/python bench/hostile.py --examples 2000
    .venv/bin/python bench/hostile.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile import hostile_requests  # noqa: E402
from tests.integration.conftest import API_KEY, MAIN_APP, free_port, wait_ready  # noqa: E402
from tests.integration.test_reliability import HealthProbe, check_answer  # noqa: E402


def start_app() -> str:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.guard import proxy_env

    os.environ.update(proxy_env(MAIN_APP["server"]["max_body_bytes"]))  # type: ignore[index]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(MAIN_APP), name="main", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/readyz")
    return base


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running serve_app (default: start the test app locally)")
    parser.add_argument("--model", help="send every request to this model instead of the test app's")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    base = args.url or start_app()
    key = args.api_key or (None if args.url else API_KEY)
    log: list[tuple[int, float]] = []
    failures: list[str] = []
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}

    with httpx.Client(base_url=base, timeout=60, headers=headers) as client, HealthProbe(base) as probe:
        @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=False)
        @given(request=hostile_requests())
        def run(request: tuple[str, bytes]) -> None:
            route, body = request
            if args.model:
                body = body.replace(b'"tiny-small"', f'"{args.model}"'.encode())
            started = time.perf_counter()
            response = client.post(route, content=body)
            elapsed = time.perf_counter() - started
            log.append((response.status_code, elapsed))
            try:
                check_answer(response, elapsed)
            except AssertionError as error:
                failures.append(f"{route} {body[:200]!r}: {error}")

        run()
    report(log, probe.latencies, failures)
    return 1 if failures else 0


def report(log: list[tuple[int, float]], probes: list[float], failures: list[str]) -> None:
    codes: dict[int, int] = {}
    for code, _ in log:
        codes[code] = codes.get(code, 0) + 1
    slowest = max(elapsed for _, elapsed in log)
    probes = sorted(probes)
    summary: dict[str, Any] = {
        "requests": len(log), "codes": dict(sorted(codes.items())), "5xx": sum(n for c, n in codes.items() if c >= 500),
        "slowest_answer_s": round(slowest, 3), "p50_answer_s": round(statistics.median(e for _, e in log), 4),
        "healthz_p50_ms": round(probes[len(probes) // 2] * 1000, 1),
        "healthz_p95_ms": round(probes[int(0.95 * (len(probes) - 1))] * 1000, 1),
        "healthz_max_ms": round(probes[-1] * 1000, 1),
        "healthz_probes": len(probes), "failures": len(failures)}
    print(summary)
    for failure in failures[:20]:
        print("FAIL", failure)


if __name__ == "__main__":
    sys.exit(main())
