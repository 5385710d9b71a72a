"""Batch against served: the same person-schema requests, the same config and engine, answered
by `serve-app batch` (Ray Data, no HTTP, full batches) and by the served app at 16 clients.

    .venv/bin/python bench/batch.py [--config configs/local.yaml] [--requests 1000] [--out bench/out/batch]

Served: `serve-app run CONFIG` in a subprocess, timed from the first request to the last answer
(after one warm-up round). Batch: `serve-app batch CONFIG` in a subprocess, timed end to end
(Ray's start and the model's load included), and after its first block of answers was written
(the tokens of that block left out): the rate once the engine runs, as the served one is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PERSON = json.loads((HERE / "data" / "schemas.json").read_text())["schemas"]["person"]
SERVE_APP = str(Path(sys.executable).parent / "serve-app")


def body(model: str, i: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"Invent person number {i}. Reply in JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "max_tokens": 128, "temperature": 0}


def served(config: str, model: str, count: int, clients: int) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([SERVE_APP, "run", config, "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        from serve_app.readiness import wait_until_ready

        wait_until_ready(f"{url}/readyz", 600)
        with httpx.Client(timeout=600) as http, ThreadPoolExecutor(clients) as pool:
            def send(i: int) -> dict[str, Any]:
                return http.post(f"{url}/v1/chat/completions", json=body(model, i)).json()  # type: ignore[no-any-return]

            list(pool.map(send, range(clients)))  # warm-up: the schema compiles once
            started = time.perf_counter()
            replies = list(pool.map(send, range(count)))
            took = time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=120)
    return tally(replies, took)


def batch(config: str, model: str, count: int, out: Path) -> dict[str, float]:
    requests, results = out / "requests.jsonl", out / "results.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": body(model, i)}) + "\n" for i in range(count)))
    results.unlink(missing_ok=True)
    started = time.perf_counter()
    job = subprocess.Popen([SERVE_APP, "batch", config, "--input", str(requests), "--output", str(results)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, early = None, 0  # when the first block of answers was written, and its tokens
    while job.poll() is None:
        if first is None and results.exists() and results.stat().st_size:
            first = time.perf_counter()
            early = sum(json.loads(line)["response"]["body"].get("usage", {}).get("completion_tokens", 0)
                        for line in results.read_text().splitlines(keepends=True) if line.endswith("\n"))
        time.sleep(0.2)
    took = time.perf_counter() - started
    assert job.returncode == 0, job.stderr.read()[-2000:] if job.stderr else ""
    summary = [line for line in (job.stderr.read() if job.stderr else "").splitlines() if line.startswith("batch ")]
    print(summary[-1] if summary else "(no summary)", file=sys.stderr)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    steady = (time.perf_counter() - first, early) if first is not None else (took, 0)
    return tally([line["response"]["body"] for line in lines], took, steady)


def tally(bodies: list[dict[str, Any]], took: float, steady: tuple[float, int] | None = None) -> dict[str, float]:
    """`steady`: (seconds, tokens before them) to leave out Ray's start, the load and the first block."""
    answered = [b for b in bodies if "choices" in b]
    valid = 0
    for b in answered:
        try:
            jsonschema.validate(json.loads(b["choices"][0]["message"]["content"]), PERSON)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    tokens = sum(b["usage"]["completion_tokens"] for b in answered)
    seconds, early = steady or (took, 0)
    return {"requests": len(bodies), "answered": len(answered), "valid": valid, "tokens": tokens,
            "seconds": took, "tokens_per_s": tokens / took, "steady_tokens_per_s": (tokens - early) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "batch"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"served": served(args.config, args.model, args.requests, args.clients),
            "batch": batch(args.config, args.model, args.requests, out)}
    ratio = rows["batch"]["tokens_per_s"] / rows["served"]["tokens_per_s"]
    steady = rows["batch"]["steady_tokens_per_s"] / rows["served"]["tokens_per_s"]
    print("| | requests | answered | valid | tokens | seconds | tokens/s |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['requests']} | {r['answered']} | {r['valid']} | {r['tokens']} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s']:.1f} |")
    print(f"batch / served: {ratio:.2f}x end to end, {steady:.2f}x after the first block of answers was written "
          f"(target >= 1.2)")
    (out / "report.json").write_text(json.dumps({**rows, "ratio": ratio, "steady_ratio": steady}, indent=2))


if __name__ == "__main__":
    main()
