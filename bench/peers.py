"""serve_app beside vLLM's CPU build on the same machine, same weights, same workloads, one
server at a time: `make bench-peers` (installs vLLM into .venv-peers first). Three servers:
serve_app (its transformers engine), serve_app_vllm (`engine: vllm`, configs/vllm_cpu.yaml set
up as bare vLLM runs: compiled, same KV cache space) and bare vLLM; the serve_app_vllm / vllm
ratio is the overhead of our layer over the same engine.

    .venv/bin/python bench/peers.py --vllm-python .venv-peers/bin/python    # all three servers
    .venv/bin/python bench/peers.py --servers serve_app --quick             # ours alone, the tiny model

Workloads (OpenAI chat completions over HTTP, temperature 0, every request its own prompt):
  person    16 clients x 3 requests, a 3-field person schema, 128 max tokens
  schemas   16 clients over the 12 real-world shapes of bench/data/schemas.json (each twice),
            the schema in the prompt, 384 max tokens
  free      16 clients x 3 requests, no constraint, 128 max tokens

For each: output tokens/s (completion tokens over the wall time of the whole workload), p50
latency, outputs that validate against their schema, that were cut off by max_tokens, that
finished but do not validate (silent violations), and 5xx; then
serve_app / vLLM as ratios. Each workload runs --repeats times (interleaved); the table shows the
median run (tokens/s varies by about 10% between runs on 2 cores), validity summed over all.
Writes peers.json and peers.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMAS: dict[str, Any] = json.loads((HERE / "data" / "schemas.json").read_text())["schemas"]
START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 600
MODEL_NAME = "smollm2-135m-instruct"


@dataclass
class Workload:
    name: str
    clients: int
    requests: list[dict[str, Any]]  # (body without "model", schema or None)


@dataclass
class Outcome:
    workload: str
    server: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    valid: int = 0
    valid_tokens: int = 0  # completion tokens of the answers that validate
    invalid: int = 0  # finished ("stop") but breaks its schema or does not parse: a silent violation
    cut: int = 0  # cut off by max_tokens ("length") before it validates
    finish: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # HTTP status -> count

    def summary(self) -> dict[str, Any]:
        return {"tok_s": self.completion_tokens / self.seconds if self.seconds else 0.0,
                "valid_tok_s": self.valid_tokens / self.seconds if self.seconds else 0.0,
                "p50_s": statistics.median(self.latencies) if self.latencies else None,
                "requests": len(self.latencies), "valid": self.valid, "invalid": self.invalid, "cut": self.cut,
                "finish": dict(self.finish), "errors": dict(self.errors), "seconds": self.seconds,
                "completion_tokens": self.completion_tokens}


def schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def workloads(quick: bool) -> list[Workload]:
    rounds, clients = (1, 4) if quick else (3, 16)
    person = SCHEMAS["person"]
    person_requests = [{"body": {"messages": [{"role": "user", "content": f"Invent person number {i}. Reply in JSON."}],
                                 "response_format": schema_format("person", person), "max_tokens": 128},
                        "schema": person} for i in range(clients * rounds)]
    mixed = []
    for i, (name, schema) in enumerate(list(SCHEMAS.items()) * (1 if quick else 2)):
        prompt = (f"Reply with one realistic JSON object (example {i}) that matches this JSON Schema:\n"
                  f"{json.dumps(schema)}")
        mixed.append({"body": {"messages": [{"role": "user", "content": prompt}],
                               "response_format": schema_format(name, schema), "max_tokens": 384},
                      "schema": schema})
    free = [{"body": {"messages": [{"role": "user", "content": f"Tell story number {i} about a lighthouse."}],
                      "max_tokens": 128}, "schema": None} for i in range(clients * rounds)]
    return [Workload("person", clients, person_requests), Workload("schemas", clients, mixed),
            Workload("free", clients, free)]


def check(content: str | None, schema: dict[str, Any] | None) -> bool:
    if schema is None:
        return True
    try:
        value = json.loads(content or "")
    except ValueError:
        return False
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    return bool(validator.is_valid(value))


def run_workload(base: str, model: str, workload: Workload, server: str) -> Outcome:
    outcome = Outcome(workload.name, server)

    def send(item: dict[str, Any]) -> None:
        body = {"model": model, "temperature": 0, "seed": 0, **item["body"]}
        started = time.perf_counter()
        try:
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPError as error:
            outcome.errors[type(error).__name__] += 1
            return
        outcome.latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            outcome.errors[str(response.status_code)] += 1
            return
        answer = response.json()
        outcome.completion_tokens += int(answer["usage"]["completion_tokens"])
        choice = answer["choices"][0]
        outcome.finish[choice["finish_reason"]] += 1
        if item["schema"] is not None:
            if check(choice["message"]["content"], item["schema"]):
                outcome.valid += 1
                outcome.valid_tokens += int(answer["usage"]["completion_tokens"])
            elif choice["finish_reason"] == "length":
                outcome.cut += 1
            else:
                outcome.invalid += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(workload.clients) as pool:
        list(pool.map(send, workload.requests))
    outcome.seconds = time.perf_counter() - started
    return outcome


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base: str, process: subprocess.Popen[bytes], model: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"not ready within {START_TIMEOUT_S} s")


def start_serve_app(port: int, config: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "serve_app.serve", config, "--port", str(port)], cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def start_vllm(python: str, port: int, model_dir: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    return subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes], group: bool) -> None:
    """serve_app: Ctrl-C to the server, so Ray shuts its workers down; vLLM: its process group."""
    if process.poll() is None:
        if group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
            process.wait(30)


def vllm_engine_config(out: Path) -> str:
    """configs/vllm_cpu.yaml set up as bare vLLM runs here: compiled (not eager), the same KV cache
    space, so that the difference is our layer (HTTP router, plan, validation), not vLLM's settings."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "vllm_cpu.yaml").read_text())
    model = config["applications"][0]["args"]["models"][0]
    model["vllm"].update(enforce_eager=False, cpu_kv_cache_gib=float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")))
    path = out / "vllm_engine.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def bench_server(server: str, args: argparse.Namespace, loads: list[Workload], out: Path) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = out / f"{server}.log"
    if server == "serve_app":
        process, model, group = start_serve_app(port, args.config, log), args.served_model, False
    elif server == "serve_app_vllm":  # engine: vllm
        process, model, group = start_serve_app(port, vllm_engine_config(out), log), MODEL_NAME, False
    else:
        process, model, group = start_vllm(args.vllm_python, port, args.model_dir, log), MODEL_NAME, True
    started = time.perf_counter()
    try:
        wait_ready(base, process, model)
        ready_s = time.perf_counter() - started
        print(f"{server}: ready in {ready_s:.0f} s", flush=True)
        run_workload(base, model, Workload("warm-up", 4, loads[0].requests[:4]), server)
        runs: dict[str, list[dict[str, Any]]] = {w.name: [] for w in loads}
        for repeat in range(args.repeats):  # workloads interleaved, so drift hits each alike
            for workload in loads:
                runs[workload.name].append(run_workload(base, model, workload, server).summary())
                print(f"  {workload.name} #{repeat + 1}: {runs[workload.name][-1]}", flush=True)
        return {"ready_s": ready_s, "workloads": {name: median_run(r) for name, r in runs.items()}, "runs": runs}
    finally:
        stop(process, group)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median tokens/s, its validity counts summed over all repeats."""
    middle = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    summed = {key: sum(r.get(key, 0) for r in runs) for key in ("requests", "valid", "invalid", "cut")}
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    return {**middle, **summed, "errors": dict(errors), "repeats": len(runs)}


def table(results: dict[str, dict[str, Any]], loads: list[Workload]) -> str:
    """tok/s counts every output token; valid tok/s only those of answers that validate (a server
    that runs into max_tokens spends tokens on answers nobody can use)."""
    servers = list(results)
    head = ["workload"] + [f"{s} tok/s" for s in servers] + [f"{s} valid tok/s" for s in servers] + \
        [f"{s} p50 s" for s in servers] + [f"{s} valid/cut/invalid/5xx" for s in servers]
    pairs = [(servers[0], s) for s in servers[1:]]
    if "serve_app_vllm" in servers and "vllm" in servers and servers[0] != "serve_app_vllm":
        pairs.append(("serve_app_vllm", "vllm"))  # our layer over bare vLLM: same engine underneath
    head += [f"tok/s {a} / {b}" for a, b in pairs] + [f"valid tok/s {a} / {b}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload in loads:
        rows = [results[s]["workloads"][workload.name] for s in servers]
        constrained = workload.name != "free"
        cells = [workload.name] + [f"{r['tok_s']:.1f}" for r in rows] + \
            [f"{r['valid_tok_s']:.1f}" if constrained else "-" for r in rows] + \
            [f"{r['p50_s']:.2f}" if r["p50_s"] is not None else "-" for r in rows] + \
            [f"{r['valid']}/{r.get('cut', 0)}/{r['invalid']}/{server_errors(r)}" if constrained else "-" for r in rows]
        run = {s: results[s]["workloads"][workload.name] for s in servers}
        cells += [ratio(run[a]["tok_s"], run[b]["tok_s"]) for a, b in pairs]
        cells += [ratio(run[a]["valid_tok_s"], run[b]["valid_tok_s"]) if constrained else "-" for a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def server_errors(run: dict[str, Any]) -> int:
    return sum(count for status, count in run["errors"].items() if status.startswith("5"))


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else ("inf" if ours else "-")


def plot(results: dict[str, dict[str, Any]], loads: list[Workload], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        values = [results[server]["workloads"][w.name]["tok_s"] for w in loads]
        ax.bar([j + i * width for j in range(len(loads))], values, width, label=server)
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(loads))], [w.name for w in loads])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Same CPU, same weights, same requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", default="serve_app,serve_app_vllm,vllm",
                        help="comma-separated: serve_app, serve_app_vllm (engine: vllm), vllm (bare)")
    parser.add_argument("--config", default="configs/local.yaml", help="serve_app's config")
    parser.add_argument("--served-model", default=MODEL_NAME, help="the model name in serve_app's config")
    parser.add_argument("--vllm-python", default=".venv-peers/bin/python")
    parser.add_argument("--model-dir", default=None, help="the weights vLLM serves (default: the prepared SmolLM2)")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--quick", action="store_true", help="fewer requests (the test suite runs this)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each workload; the median is "
                        "reported (default 3, 1 with --quick)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if "vllm" in servers and args.model_dir is None:
        from serve_app.models import prepare

        args.model_dir = str(prepare(MODEL_NAME))
    args.repeats = args.repeats or (1 if args.quick else 3)
    loads = workloads(args.quick)
    results = {server: bench_server(server, args, loads, out) for server in servers}
    print(table(results, loads))
    (out / "peers.json").write_text(json.dumps({"config": args.config, "quick": args.quick, "servers": results},
                                               indent=2))
    plot(results, loads, out / "peers.png")
    print(f"wrote {out / 'peers.json'} and {out / 'peers.png'}")


if __name__ == "__main__":
    main()
