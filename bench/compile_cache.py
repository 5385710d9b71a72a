"""First compile vs cached compile of one schema, on the engine in-process.

    .venv/bin/python bench/compile_cache.py [--model builtin:smollm2-135m-instruct]

Prints the seconds of the first (uncached) compile, of a cached lookup, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.engine.transformers_engine import TransformersEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "city", "tags"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20 repeats (smoke run)")
    args = parser.parse_args()
    with create_engine(ModelConfig(name="bench", source=args.model)) as engine:
        measure(engine, 20 if args.quick else args.repeats)


def measure(engine: TransformersEngine, repeats: int) -> None:
    for backend in ("llguidance", "outlines_core"):
        constraint = parse_constraint({"type": "json_schema", "schema": SCHEMA, "backend": backend})
        if backend == "outlines_core":  # it would ignore numeric bounds: compare on a schema it enforces
            plain = {**SCHEMA, "properties": {**SCHEMA["properties"], "age": {"type": "integer"}}}
            constraint = parse_constraint({"type": "json_schema", "schema": plain, "backend": backend})
        started = time.perf_counter()
        engine.compile(constraint)
        first = time.perf_counter() - started
        cached = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.compile(constraint).new_matcher()
            cached.append(time.perf_counter() - started)
        median = statistics.median(cached)
        print(f"{backend:14s} first compile {first * 1000:8.2f} ms   cached lookup + matcher "
              f"{median * 1000:6.3f} ms   ratio {first / median:8.0f}x")


if __name__ == "__main__":
    main()
