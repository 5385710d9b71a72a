"""Throughput benchmark: ratios measured side by side in one run, on one model.

    make bench                      # SmolLM2-135M-Instruct, writes bench/out/
    make bench QUICK=1              # the tiny random model, fewer repeats (the test suite runs this)

P1 served throughput, 16 concurrent clients / in-process engine on the same requests (median of 5 paired rounds)
P2 constrained / unconstrained output tokens/s, at batch 1, 8 and 16 (median of 5 paired rounds)
P3 8 different schemas batched together / the same 8 one after another
P4 time to first token with a precompiled schema / unconstrained time to first token
P5 compile seconds for an unseen schema, median per backend (bench/data/schemas.json)
P6 router-hop overhead: served p50 - in-replica p50 (ms)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.engine.transformers_engine import TransformersEngine
from serve_app.generation import GenerationRequest, SamplingParams
from serve_app.readiness import wait_until_ready

HERE = Path(__file__).resolve().parent
SCHEMAS: dict[str, Any] = json.loads((HERE / "data" / "schemas.json").read_text())["schemas"]
TARGETS = {"P1": (">=", 0.90), "P2_b1": (">=", 0.95), "P2_b8": (">=", 0.95), "P2_b16": (">=", 1.0), "P3": (">=", 3.0),
           "P4": ("<=", 1.10), "P5_llguidance": ("<=", 1.0), "P6_ms": ("<=", 5.0)}
PROMPT = "Fill in a realistic example. Reply with JSON only."
READY_TIMEOUT_S = 600


def request(schema: str | None, max_tokens: int, seed: int = 0) -> GenerationRequest:
    constraint = parse_constraint({"type": "json_schema", "schema": SCHEMAS[schema]}) if schema else None
    return GenerationRequest(messages=[{"role": "user", "content": f"{PROMPT} ({schema or 'anything'})"}],
                             constraint=constraint, sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0,
                                                                             seed=seed))


def within_budget(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """Compile each schema, and raise max_tokens to its minimum budget where it is below (a
    request below it is a 400): every model's tokenizer spells a schema's shortest output in its
    own number of tokens."""
    fitted = []
    for r in requests:
        least = engine.compile(r.constraint).min_tokens if r.constraint is not None else None
        if least is not None and least > (r.sampling.max_new_tokens or 0):
            r = r.model_copy(update={"sampling": r.sampling.model_copy(update={"max_new_tokens": least})})
        fitted.append(r)
    return fitted


def tokens_per_s(engine: TransformersEngine, requests: list[GenerationRequest]) -> float:
    """Output tokens/s of one batch, run once before (schemas compiled, prompts in the prefix
    cache: P5 measures compiling, and the 16 unconstrained prompts of P2 are one prompt, which
    would be cached for that side alone)."""
    requests = within_budget(engine, requests)
    engine.generate(requests)
    return timed(engine, requests)


def timed(engine: TransformersEngine, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    results = engine.generate(requests)
    return sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - started)


def p2(engine: TransformersEngine, max_tokens: int, batch: int, rounds: int) -> float:
    """The median over `rounds` of the ratio, each round timing both sides one after the other
    (one batch of 16 rows takes about 1.5 s here: single timings swing by 15%)."""
    names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(batch)]
    constrained = within_budget(engine, [request(n, max_tokens) for n in names])
    free = [request(None, max_tokens, seed=i) for i in range(batch)]
    engine.generate(constrained + free)  # see tokens_per_s
    return statistics.median(timed(engine, constrained) / timed(engine, free) for _ in range(rounds))


def p3(engine: TransformersEngine, max_tokens: int) -> float:
    requests = within_budget(engine, [request(n, max_tokens) for n in list(SCHEMAS)[:8]])
    batched = tokens_per_s(engine, requests)  # compiles all 8 first
    started, tokens = time.perf_counter(), 0
    for r in requests:
        tokens += engine.generate([r])[0].usage.completion_tokens
    sequential = tokens / (time.perf_counter() - started)
    return batched / sequential


def p4(engine: TransformersEngine, repeats: int) -> tuple[float, float]:
    engine.precompile([request("person", 1).constraint])  # type: ignore[list-item]

    def ttft(schema: str | None) -> float:
        [probe] = within_budget(engine, [request(schema, 2)])
        return statistics.median(engine.generate([probe])[0].timings["first_token_s"] for _ in range(repeats))
    constrained, free = ttft("person"), ttft(None)
    return constrained / free, constrained


def p5(engine: TransformersEngine) -> dict[str, float]:
    from serve_app.constraints import installed_backends
    from serve_app.constraints.keywords import unsupported_keywords

    medians = {}
    for backend in installed_backends():
        seconds = []
        for schema in SCHEMAS.values():
            if unsupported_keywords(schema, backend):
                continue  # this backend would reject it; compile time is not meaningful
            constraint = parse_constraint({"type": "json_schema", "schema": schema, "backend": backend})
            started = time.perf_counter()
            try:
                engine.compiler.compile(engine.plan(constraint))  # bypasses the cache: every schema is unseen
            except Exception:
                continue
            seconds.append(time.perf_counter() - started)
        if seconds:
            medians[backend] = statistics.median(seconds)
    return medians


def serve_app_url(model: ModelConfig) -> str:
    import socket

    import ray
    from ray import serve

    from serve_app.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Logical CPUs: the replica reserves 2 like the in-process engine uses, plus the router's share.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [model.model_dump(mode="json", by_alias=True)]}), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/readyz", READY_TIMEOUT_S)
    return url


def http_body(model: str, r: GenerationRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [m.model_dump() for m in r.messages or []],
                            "max_tokens": r.sampling.max_new_tokens, "temperature": 0}
    if r.constraint is not None:
        body["constraint"] = r.constraint.model_dump(mode="json", by_alias=True, exclude_none=True)
    return body


def p1(url: str, model: str, engine: TransformersEngine, max_tokens: int, clients: int, rounds: int) -> float:
    """The median over `rounds` of served / in-process tokens/s, each round timing both sides one
    after the other (a round is one batch of about 1.5 s: single timings swing by 15%)."""
    requests = within_budget(engine, [request(list(SCHEMAS)[i % len(SCHEMAS)], max_tokens) for i in range(clients)])
    with httpx.Client(timeout=600) as http, ThreadPoolExecutor(clients) as pool:
        def served() -> float:
            started = time.perf_counter()
            replies = list(pool.map(lambda r: http.post(f"{url}/v1/generate", json=http_body(model, r)).json(),
                                    requests))
            return sum(r["usage"]["completion_tokens"] for r in replies) / (time.perf_counter() - started)

        for _ in range(2):  # warm: each schema compiled, and the prompts cached (on their second sighting)
            served()
            engine.generate(requests)
        return statistics.median(served() / timed(engine, requests) for _ in range(rounds))


def p6(url: str, model: str, engine: TransformersEngine, max_tokens: int, repeats: int) -> float:
    [probe] = within_budget(engine, [request("weather", max_tokens)])
    body = http_body(model, probe)
    outer, inner = [], []
    with httpx.Client(timeout=600) as http:
        for _ in range(repeats):
            started = time.perf_counter()
            reply = http.post(f"{url}/v1/generate", json=body).json()
            outer.append(time.perf_counter() - started)
            inner.append(reply["timings"]["total_s"])
    return 1000 * (statistics.median(outer) - statistics.median(inner))


def plot(results: dict[str, float], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in TARGETS if k in results and not k.startswith("P6") and not k.startswith("P5")]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(keys, [results[k] for k in keys], color="#4c72b0", label="measured")
    ax.scatter(keys, [TARGETS[k][1] for k in keys], color="#c44e52", marker="_", s=900, label="target", zorder=3)
    ax.set_ylabel("ratio")
    ax.set_title("serve_app throughput ratios (higher is better except P4)")
    ax.legend()
    fig.tight_layout()
    ratios = out / "throughput_ratios.png"
    fig.savefig(ratios)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    compile_keys = sorted(k for k in results if k.startswith("P5_"))
    ax.bar([k.removeprefix("P5_") for k in compile_keys], [results[k] * 1000 for k in compile_keys], color="#55a868")
    ax.set_ylabel("median compile ms (unseen schema)")
    ax.set_yscale("log")
    fig.tight_layout()
    compile_png = out / "compile_seconds.png"
    fig.savefig(compile_png)
    return [str(ratios), str(compile_png)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--no-serve", action="store_true", help="skip P1 and P6 (no Ray)")
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    config = ModelConfig(name="bench", source=args.model, limits={"max_batch_size": 16},
                         placement={"num_cpus": 2})
    repeats = 3 if args.quick else 7
    results: dict[str, float] = {}
    with create_engine(config) as engine:
        rounds = 1 if args.quick else 5
        results["P2_b1"] = p2(engine, args.max_tokens, 1, rounds)
        results["P2_b8"] = p2(engine, args.max_tokens, 8, rounds)
        results["P2_b16"] = p2(engine, args.max_tokens, 16, rounds)
        results["P3"] = p3(engine, args.max_tokens)
        results["P4"], results["P4_ttft_s"] = p4(engine, repeats)
        results.update({f"P5_{k}": v for k, v in p5(engine).items()})
        if not args.no_serve:
            import ray
            from ray import serve

            url = serve_app_url(config)
            try:
                results["P1"] = p1(url, config.name, engine, args.max_tokens, 16, rounds)
                results["P6_ms"] = p6(url, config.name, engine, args.max_tokens, repeats * 2)
            finally:
                serve.shutdown()
                ray.shutdown()
    report(results, args, out)


def report(results: dict[str, float], args: argparse.Namespace, out: Path) -> None:
    lines = [f"model {args.model}, max_tokens {args.max_tokens}, backend llguidance (default for every kind)",
             f"{'metric':16s} {'measured':>10s}  target   met"]
    for key, value in results.items():
        target = TARGETS.get(key)
        met = "" if target is None else ("yes" if (value >= target[1] if target[0] == ">=" else value <= target[1])
                                         else "no")
        goal = f"{target[0]} {target[1]:g}" if target else ""
        lines.append(f"{key:16s} {value:10.3f}  {goal:7s}  {met}")
    print("\n".join(lines))
    pngs = plot(results, out)
    (out / "throughput.json").write_text(json.dumps({"model": args.model, "results": results,
                                                     "targets": TARGETS, "plots": pngs}, indent=2))
    print(f"wrote {out / 'throughput.json'} and {', '.join(pngs)}")


if __name__ == "__main__":
    main()
