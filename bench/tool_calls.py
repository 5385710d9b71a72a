"""Tool calling through the service: 20 prompts, 3 tools of real-world shapes (bench/data/schemas.json:
weather, order, k8s_container), `tool_choice: "required"`, with the official openai client.

    .venv/bin/python bench/tool_calls.py                       # starts `make serve`'s config (SmolLM2)
    .venv/bin/python bench/tool_calls.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct

For each answer: did it come back as `tool_calls` (finish_reason "tool_calls"), is the name one of
the tools, do the arguments validate against that tool's schema (jsonschema, here, not the
service's own flag), and which tool was picked against the one the prompt asks for. Prints a
table and writes tool_calls.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import MODEL_NAME, free_port, start_serve_app, stop, wait_ready  # noqa: E402

SCHEMAS: dict[str, Any] = json.loads((HERE / "data" / "schemas.json").read_text())["schemas"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": SCHEMAS["weather"]}},
    {"type": "function", "function": {"name": "create_order", "description": "Place an order of items by SKU",
                                      "parameters": SCHEMAS["order"]}},
    {"type": "function", "function": {"name": "deploy_container",
                                      "description": "Run a container on the cluster",
                                      "parameters": SCHEMAS["k8s_container"]}},
]
PROMPTS = [
    ("get_weather", "What's the weather like in Lisbon right now?"),
    ("get_weather", "Is it raining in Bergen?"),
    ("get_weather", "Tell me the temperature in Cairo."),
    ("get_weather", "Do I need a coat in Toronto today?"),
    ("get_weather", "How sunny is it in Seville?"),
    ("get_weather", "Weather report for Osaka, please."),
    ("get_weather", "Will it snow in Denver?"),
    ("create_order", "Order 3 units of SKU A-100 and 1 of B-7, total 59.90."),
    ("create_order", "Buy two boxes of paper, SKU PAPER-A4, order id ord-1."),
    ("create_order", "Place order 77 for one keyboard (KB-1) costing 45."),
    ("create_order", "I want 5 of item X9 for 12.5 in total."),
    ("create_order", "Reorder the usual: SKU COFFEE-1, quantity 4, total 36."),
    ("create_order", "Create an order with a single SKU Z-3, quantity 10."),
    ("create_order", "Purchase 2 monitors, SKU MON-27, for 400."),
    ("deploy_container", "Deploy nginx:1.27 listening on port 80."),
    ("deploy_container", "Run redis:7 on TCP port 6379 with a 512Mi memory limit."),
    ("deploy_container", "Start a container named api from image ghcr.io/acme/api:2 on port 8080."),
    ("deploy_container", "Launch postgres:16 exposing 5432."),
    ("deploy_container", "Spin up busybox with no ports, called debug."),
    ("deploy_container", "Deploy the image prom/prometheus on port 9090 with 1 CPU limit."),
]


def ask(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    completion = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        messages=[{"role": "system", "content": "Call the one tool that does what the user asks."},
                  {"role": "user", "content": prompt}])
    return {"completion": completion, "seconds": time.perf_counter() - started}


def judge(expected: str, answer: dict[str, Any]) -> dict[str, Any]:
    choice = answer["completion"].choices[0]
    calls = choice.message.tool_calls or []
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    outcome = {"finish_reason": choice.finish_reason, "name": None, "valid": False, "intended": False,
               "tokens": answer["completion"].usage.completion_tokens, "seconds": answer["seconds"]}
    if len(calls) == 1 and calls[0].function.name in by_name:
        name = calls[0].function.name
        try:
            jsonschema.validate(json.loads(calls[0].function.arguments), by_name[name])
            outcome["valid"] = True
        except (ValueError, jsonschema.ValidationError):
            pass
        outcome.update(name=name, intended=name == expected)
    return outcome


def run(base: str, model: str, api_key: str, count: int, clients: int, max_tokens: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, timeout=600, max_retries=0)
    prompts = PROMPTS[:count]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(client, model, p[1], max_tokens), prompts))
    wall = time.perf_counter() - started
    outcomes = [judge(expected, answer) for (expected, _), answer in zip(prompts, answers, strict=True)]
    return {"requests": len(outcomes), "valid": sum(o["valid"] for o in outcomes),
            "tool_calls": sum(o["finish_reason"] == "tool_calls" for o in outcomes),
            "finish_reasons": dict(Counter(o["finish_reason"] for o in outcomes)),
            "intended": sum(o["intended"] for o in outcomes),
            "tok_s": sum(o["tokens"] for o in outcomes) / wall,
            "p50_s": statistics.median(o["seconds"] for o in outcomes), "outcomes": outcomes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=None, help="a running service; default: start --config")
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--model", default=MODEL_NAME)
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--count", type=int, default=len(PROMPTS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    process = None
    base = args.url
    if base is None:
        base = f"http://127.0.0.1:{free_port()}"
        process = start_serve_app(int(base.rsplit(":", 1)[1]), args.config, out / "tool_calls_server.log")
    try:
        if process is not None:
            wait_ready(base, process, args.model)
        result = run(base.rstrip("/"), args.model, args.api_key, args.count, args.clients, args.max_tokens)
    finally:
        if process is not None:
            stop(process, group=False)
    (out / "tool_calls.json").write_text(json.dumps(result, indent=2))
    n = result["requests"]
    print("| requests | schema-valid calls | answered as tool_calls | intended tool | finish reasons | tok/s | p50 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n} | {result['valid']}/{n} | {result['tool_calls']}/{n} | {result['intended']}/{n} | "
          f"{result['finish_reasons']} | {result['tok_s']:.1f} | {result['p50_s']:.2f} s |")


if __name__ == "__main__":
    main()
