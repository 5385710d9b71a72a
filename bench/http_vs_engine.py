"""p50 latency of one JSON-schema request: through the served app over HTTP vs the engine
in-process, same model, same request (greedy), measured side by side in one run.

    make serve &          # or any running app serving the model on --url
    .venv/bin/python bench/http_vs_engine.py --url http://127.0.0.1:8000 --n 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.generation import GenerationRequest, SamplingParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Invent a person. Reply in JSON."}]
MAX_TOKENS = 40


def http_latencies(url: str, model: str, n: int) -> list[float]:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
    out = []
    with httpx.Client(timeout=120) as client:
        client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()  # warm
        for _ in range(n):
            started = time.perf_counter()
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            out.append(time.perf_counter() - started)
    return out


def engine_latencies(source: str, n: int) -> list[float]:
    engine = create_engine(ModelConfig(name="bench", source=source))
    constraint = parse_constraint({"type": "json_schema", "schema": SCHEMA})
    request = GenerationRequest(messages=MESSAGES, constraint=constraint,
                                sampling=SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0))
    engine.generate([request])  # warm
    out = []
    for _ in range(n):
        started = time.perf_counter()
        engine.generate([request])
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    served = statistics.median(http_latencies(args.url, args.model, args.n))
    local = statistics.median(engine_latencies(args.source, args.n))
    print(f"p50 served over HTTP   {served * 1000:8.1f} ms")
    print(f"p50 engine in-process  {local * 1000:8.1f} ms")
    print(f"served / in-process    {served / local:8.3f}   (difference {1000 * (served - local):.1f} ms)")


if __name__ == "__main__":
    main()
