"""The largest real-world schemas we can find, through every step a request takes: the router's
checks (limits, meta-validation, normalisation and the cascade's plan), then the replica's
compile (cascade, closer, minimum budget) on SmolLM2's tokenizer, with time and memory.

The schemas are AWS CloudFormation resource schemas shipped by `cfn-lint` (up to ~280 KB each;
QuickSight dashboards and analyses are the largest), not a dependency of the project:

    .venv/bin/pip install cfn-lint
    .venv/bin/python bench/large_schemas.py --top 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from serve_app.api.intake import plan_or_error
from serve_app.config import ModelConfig
from serve_app.constraints import Plan, build_constraint, installed_backends
from serve_app.engine.factory import create_engine
from serve_app.engine.transformers_engine import TransformersEngine


def largest_schemas(top: int) -> list[tuple[str, dict[str, Any]]]:
    spec = importlib.util.find_spec("cfnlint")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install cfn-lint first: its CloudFormation resource schemas are the corpus")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "schemas" / "resources"
    found: dict[str, tuple[int, Path]] = {}
    for path in folder.glob("*.json"):  # one file per region variant: keep the largest per type
        name = json.loads(path.read_text()).get("typeName", path.stem)
        size = path.stat().st_size
        if size > found.get(name, (0, path))[0]:
            found[name] = (size, path)
    ranked = sorted(found.items(), key=lambda item: -item[1][0])[:top]
    return [(name, json.loads(path.read_text())) for name, (_, path) in ranked]


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure(engine: TransformersEngine, model: ModelConfig, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    constraint = build_constraint({"type": "json_schema", "schema": schema})
    row: dict[str, Any] = {"schema": name, "kib": round(constraint.source_bytes() / 1024, 1)}
    started = time.perf_counter()
    verdict = plan_or_error(model, constraint, "response_format.json_schema", installed_backends())
    row["router_check_s"] = round(time.perf_counter() - started, 3)
    if not isinstance(verdict, Plan):
        row["outcome"] = f"400 {verdict.code}: {verdict.message[:90]}"
        return row
    before, started = rss_mib(), time.perf_counter()
    try:
        compiled = engine.compile(constraint)
    except Exception as error:  # noqa: BLE001 - a 400 is an outcome to report
        row["outcome"] = f"400 {getattr(error, 'code', type(error).__name__)}: {str(error)[:90]}"
        return row
    row.update(compile_s=round(time.perf_counter() - started, 3), rss_growth_mib=round(rss_mib() - before, 1),
               backend=compiled.backend, min_tokens=compiled.min_tokens, outcome="compiled")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    model = ModelConfig(name="bench", source=args.model)
    with create_engine(model) as engine:
        rows = [measure(engine, model, name, schema) for name, schema in largest_schemas(args.top)]
    for row in rows:
        print(json.dumps(row))
    checks = [r["router_check_s"] for r in rows]
    compiles = [r["compile_s"] for r in rows if "compile_s" in r]
    print(f"{len(rows)} schemas, {rows[-1]['kib']}-{rows[0]['kib']} KiB: router check median "
          f"{statistics.median(checks):.3f} s (max {max(checks):.3f}); compiled {len(compiles)}"
          + (f", compile median {statistics.median(compiles):.3f} s (max {max(compiles):.3f})" if compiles else ""))


if __name__ == "__main__":
    main()
