"""A soak: bounded mixed traffic against a local app (127.0.0.1 only), a rollout in the middle.

    .venv/bin/python bench/soak.py [--minutes 30] [--clients 4]

Run it from a checkout nobody edits while it runs: the rollout starts new replicas, which import
the code as it is on disk then (the deployments' classes were pickled at the start).

Starts a local Ray cluster and the app (model `soak`: two tiny-model replicas; model `narrow`: one
replica with a queue of 2), then sends, from `--clients` threads, the four constraint kinds,
streams read to the end, streams dropped after their first chunk, tool calls; a burst thread
sends more than `narrow` queues (429s are expected there). At half time it deploys version 2 of
both models (every replica replaced while traffic goes on). At the end it waits for the replicas
to drain and reports: requests answered, 429s, cancelled and lost (a 5xx, a transport error, a
stream without its end), p50/p99, rows still running, and each replica's resident memory over
time. Writes bench/out/soak.json and soak.png. Stops by itself; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoscale import start_app  # noqa: E402  (the same local cluster)

HERE = Path(__file__).resolve().parent
MAX_REQUESTS_PER_CLIENT = 100_000


def app(version: str) -> dict[str, Any]:
    tiny = {"source": "builtin:tiny-random-llama", "version": version, "sampling": {"temperature": 0}}
    return {"models": [
        {**tiny, "name": "soak", "placement": {"num_cpus": 0.25}, "limits": {"max_new_tokens": 64},
         "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        {**tiny, "name": "narrow", "placement": {"num_cpus": 0.25},
         "limits": {"max_new_tokens": 16, "max_pending_requests": 2, "max_batch_size": 1}},
    ]}


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
USER = [{"role": "user", "content": "Describe a person."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
# (kind, route, body); "stream" and "cancel" are streamed, "cancel" is dropped after its first chunk.
KINDS: list[tuple[str, str, dict[str, Any]]] = [
    ("json_schema", "/v1/chat/completions", {"messages": USER, "max_tokens": 48, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
    ("regex", "/v1/generate", {"prompt": "Code:", "max_tokens": 16,
                               "constraint": {"type": "regex", "pattern": "[A-Z]{3}-[0-9]{4}"}}),
    ("choice", "/v1/generate", {"prompt": "Yes or no?", "max_tokens": 8,
                                "constraint": {"type": "choice", "choices": ["yes", "no", "maybe"]}}),
    ("grammar", "/v1/generate", {"prompt": "Sum:", "max_tokens": 16, "constraint": {
        "type": "grammar", "grammar": 'start: NUM "+" NUM\nNUM: /[0-9]{1,3}/'}}),
    ("stream", "/v1/chat/completions", {"messages": USER, "max_tokens": 48, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
    ("cancel", "/v1/chat/completions", {"messages": USER, "max_tokens": 64, "stream": True}),
    ("tool", "/v1/chat/completions", {"messages": USER, "max_tokens": 48, "tools": [TOOL],
                                      "tool_choice": "required"}),
]


def one(http: httpx.Client, kind: str, route: str, body: dict[str, Any], model: str = "soak") -> str:
    """The outcome: ok, 429, 4xx, cancelled or lost."""
    try:
        if not body.get("stream"):
            reply = http.post(route, json={"model": model, **body})
            return "ok" if reply.status_code == 200 else "429" if reply.status_code == 429 else \
                "4xx" if reply.status_code < 500 else "lost"
        with http.stream("POST", route, json={"model": model, **body}) as reply:
            if reply.status_code != 200:
                return "429" if reply.status_code == 429 else "4xx" if reply.status_code < 500 else "lost"
            lines = reply.iter_lines()
            for line in lines:
                if kind == "cancel" and line.startswith("data: "):
                    return "cancelled"  # closing the response drops the connection mid-stream
                if line == "data: [DONE]":
                    return "ok"
                if '"error"' in line:
                    return "lost"
            return "lost"  # the stream ended without [DONE]
    except httpx.HTTPError:
        return "lost"


def client(url: str, offset: int, until: float, t0: float, log: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=300) as http:
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > until:
                return
            kind, route, body = KINDS[(offset + i) % len(KINDS)]
            started = time.monotonic()
            outcome = one(http, kind, route, body)
            log.append({"t": started - t0, "kind": kind, "outcome": outcome, "latency_s": time.monotonic() - started})


def bursts(url: str, until: float, t0: float, log: list[dict[str, Any]], every_s: float = 15) -> None:
    """Every `every_s`, 6 requests at once at `narrow` (a queue of 2): some are 429s by design."""
    kind, route, body = KINDS[1]

    def send(http: httpx.Client, started: float) -> None:
        outcome = one(http, kind, route, body, "narrow")
        log.append({"t": started - t0, "kind": "burst", "outcome": outcome, "latency_s": time.monotonic() - started})

    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() + every_s >= until:
                return
            time.sleep(every_s)
            threads = [threading.Thread(target=send, args=(http, time.monotonic())) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()


def sample(url: str, t0: float, samples: list[dict[str, Any]], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            try:
                replicas = http.get("/v1/replicas").json()["replicas"]
            except (httpx.HTTPError, ValueError, KeyError):
                replicas = []
            samples.append({"t": time.monotonic() - t0, "replicas": [
                {"id": r["replica_id"], "model": r["model"], "version": r["version"], "rss_mb": r["rss_bytes"] / 2**20,
                 "running": r["queue"]["waiting"] + r["queue"]["running"]} for r in replicas]})
            stop.wait(10)


def start() -> str:
    return start_app(app("1"), "soak")


def rollout(done: dict[str, float], t0: float) -> None:
    from ray import serve

    from serve_app.app import build_app

    done["rollout_start"] = time.monotonic() - t0
    serve.run(build_app(app("2")), name="soak", route_prefix="/")
    done["rollout_ready"] = time.monotonic() - t0


def drain(url: str, timeout_s: float = 120) -> int:
    """Rows waiting or running on every replica once traffic stopped (0 when all drained)."""
    deadline, left = time.monotonic() + timeout_s, -1
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            replicas = http.get("/v1/replicas").json()["replicas"]
            left = sum(r["queue"]["waiting"] + r["queue"]["running"] for r in replicas)
            if left == 0:
                return 0
            time.sleep(2)
    return left


def run(url: str, seconds: float, clients: int) -> dict[str, Any]:
    log: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    stop, t0 = threading.Event(), time.monotonic()
    until = t0 + seconds
    sampler = threading.Thread(target=sample, args=(url, t0, samples, stop), daemon=True)
    load = [threading.Thread(target=client, args=(url, i, until, t0, log)) for i in range(clients)]
    load.append(threading.Thread(target=bursts, args=(url, until, t0, log)))
    for thread in [sampler, *load]:
        thread.start()
    time.sleep(seconds / 2)
    try:
        rollout(marks, t0)
    except Exception as error:  # noqa: BLE001 - reported; the load goes on and ends on time
        marks["rollout_error"] = repr(error)[:500]
    for thread in load:
        thread.join()
    marks["load_end"] = time.monotonic() - t0
    marks["rows_left"] = drain(url)
    time.sleep(12)  # one more memory sample after the drain
    stop.set()
    sampler.join()
    return {"marks": marks, "log": log, "samples": samples}


def rss_growth(samples: list[dict[str, Any]], warm_s: float) -> dict[str, dict[str, float]]:
    """Per replica: resident memory after its first `warm_s`, at its last sample, and the change."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for r in s["replicas"]:
            series.setdefault(f"{r['model']}/{r['version']}/{r['id'][-6:]}", []).append((s["t"], r["rss_mb"]))
    out = {}
    for name, points in series.items():
        warm = next((mb for t, mb in points if t >= points[0][0] + warm_s), points[-1][1])
        out[name] = {"warm_mb": round(warm, 1), "last_mb": round(points[-1][1], 1),
                     "change_mb": round(points[-1][1] - warm, 1), "seconds": round(points[-1][0] - points[0][0])}
    return out


def summarise(data: dict[str, Any], warm_s: float) -> dict[str, Any]:
    log = data["log"]
    counts = {o: sum(r["outcome"] == o for r in log) for o in ("ok", "429", "4xx", "cancelled", "lost")}
    ok = sorted(r["latency_s"] for r in log if r["outcome"] == "ok" and r["kind"] != "burst")
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [0.0] * 99
    return {"requests": len(log), **counts, "p50_s": round(q[49], 3), "p99_s": round(q[98], 3),
            "rows_left": data["marks"]["rows_left"], "rollout_s": [round(data["marks"].get(k, -1))
                                                                     for k in ("rollout_start", "rollout_ready")],
            "rollout_error": data["marks"].get("rollout_error"),
            "rss": rss_growth(data["samples"], warm_s)}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for s in data["samples"]:
        for r in s["replicas"]:
            series.setdefault(f"{r['model']} v{r['version']} {r['id'][-6:]}", []).append((s["t"] / 60, r["rss_mb"]))
    for name, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    marks = data["marks"]
    ready = marks.get("rollout_ready", marks["rollout_start"])
    ax.axvspan(marks["rollout_start"] / 60, ready / 60, color="#dddddd", label="rollout")
    ax.set_xlabel("minutes")
    ax.set_ylabel("replica RSS (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warm-minutes", type=float, default=3, help="RSS growth counts from here")
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = run(start(), args.minutes * 60, args.clients)
    summary = summarise(data, args.warm_minutes * 60)
    print(json.dumps(summary, indent=1))
    plot(data, out / "soak.png")
    (out / "soak.json").write_text(json.dumps({"summary": summary, **data}, indent=1))
    print(f"wrote {out / 'soak.png'} and {out / 'soak.json'}")


if __name__ == "__main__":
    main()
