"""Load-step benchmark for queue-depth autoscaling on a local Ray cluster (127.0.0.1 only).

    .venv/bin/python bench/autoscale.py [--load-s 40] [--clients 8]

Deploys the tiny model with min 1 / max 3 replicas, applies a bounded load step, and records
every 0.5 s the queue depth (rows waiting + running over all replicas), the replica count and
request latency. Prints the seconds from the load step to a second replica serving, and from
the end of the load to the scale-down, and writes bench/out/autoscale.png and .json.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
APP = {"models": [{
    "name": "elastic", "source": "builtin:tiny-random-llama",
    "placement": {"num_cpus": 0.25},
    "limits": {"max_new_tokens": 128, "max_batch_size": 2},
    "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_queue_depth": 2, "upscale_delay_s": 1,
                    "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 0.5},
}]}
BODY = {"model": "elastic", "prompt": "x", "max_tokens": 96, "constraint": {"type": "regex", "pattern": "[a-z]{1000}"}}


def start_app(app: dict[str, Any] = APP, name: str = "autoscale") -> str:
    """A local Ray cluster (127.0.0.1) serving `app` as `name` on a free port, once ready."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.readiness import wait_until_ready

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/readyz", 600, poll_s=0.5)
    return url


def sample(url: str, t0: float, samples: list[dict[str, Any]], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            replicas = http.get("/v1/replicas").json()["replicas"]
            depth = sum(r["queue"]["waiting"] + r["queue"]["running"] for r in replicas)
            samples.append({"t": time.monotonic() - t0, "replicas": len(replicas), "queue_depth": depth})
            stop.wait(0.5)


def load(url: str, t0: float, until: float, requests: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(500):  # bounded in count as well as in time
            if time.monotonic() > until:
                return
            started = time.monotonic()
            reply = http.post("/v1/generate", json=BODY)
            requests.append({"t": started - t0, "latency_s": time.monotonic() - started,
                             "status": reply.status_code,
                             "replica": reply.json().get("served_by", {}).get("replica_id", "")})


def run(url: str, load_s: float, clients: int, settle_s: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    stop, t0 = threading.Event(), time.monotonic()
    sampler = threading.Thread(target=sample, args=(url, t0, samples, stop))
    sampler.start()
    time.sleep(2)
    step_at = time.monotonic() - t0
    workers = [threading.Thread(target=load, args=(url, t0, t0 + step_at + load_s, requests)) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    load_end = time.monotonic() - t0
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and (not samples or samples[-1]["replicas"] > 1 or samples[-1]["t"] < load_end):
        time.sleep(0.5)
    stop.set()
    sampler.join()
    return {"step_at": step_at, "load_end": load_end, "samples": samples, "requests": requests}


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    requests = sorted(data["requests"], key=lambda r: r["t"] + r["latency_s"])
    first = requests[0]["replica"] if requests else ""
    second = next((r["t"] + r["latency_s"] for r in requests if r["replica"] not in ("", first)), None)
    down = next((s["t"] for s in data["samples"] if s["t"] > data["load_end"] and s["replicas"] == 1), None)
    return {
        "requests": len(requests), "failed": sum(r["status"] != 200 for r in requests),
        "peak_replicas": max(s["replicas"] for s in data["samples"]),
        "peak_queue_depth": max(s["queue_depth"] for s in data["samples"]),
        "step_to_second_replica_serving_s": None if second is None else second - data["step_at"],
        "load_end_to_scale_down_s": None if down is None else down - data["load_end"],
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    t = [s["t"] for s in data["samples"]]
    axes[0].plot(t, [s["queue_depth"] for s in data["samples"]], color="#4c72b0")
    axes[0].set_ylabel("queue depth")
    axes[1].step(t, [s["replicas"] for s in data["samples"]], where="post", color="#55a868")
    axes[1].set_ylabel("replicas")
    axes[2].scatter([r["t"] + r["latency_s"] for r in data["requests"]], [r["latency_s"] for r in data["requests"]],
                    s=6, color="#c44e52")
    axes[2].set_ylabel("latency (s)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(data["step_at"], data["load_end"], color="#dddddd", alpha=0.5)
    fig.suptitle("queue-depth autoscaling: load step (grey)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load-s", type=float, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=90)
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = run(start_app(), args.load_s, args.clients, args.settle_s)
    summary = summarise(data)
    for key, value in summary.items():
        print(f"{key:36s} {value if not isinstance(value, float) else round(value, 1)}")
    plot(data, out / "autoscale.png")
    (out / "autoscale.json").write_text(json.dumps({"summary": summary, **data}, indent=1))
    print(f"wrote {out / 'autoscale.png'} and {out / 'autoscale.json'}")


if __name__ == "__main__":
    main()
