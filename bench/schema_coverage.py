"""JSON Schema coverage: which real-world schemas each backend enforces exactly, against the
cascade (normalisation, then the first backend that enforces the schema exactly).

    .venv/bin/python -u bench/schema_coverage.py                  # compile coverage, SmolLM2's tokenizer
    .venv/bin/python -u bench/schema_coverage.py --serve-url http://127.0.0.1:8000 --generate 40
    .venv/bin/python -u bench/schema_coverage.py --corpus bench/data/keyword_corpus.json --cascade-only

Also prints, per keyword that no grammar expresses (not, oneOf, uniqueItems, if, ...), how many
schemas use it and how many of those the cascade accepts (and how many with checks made while
generating).

For every schema and strategy the outcome is one of: exact; approximated (the backend would
ignore a keyword or said it approximates: rejected); error (with its reason); timeout. A single
backend is measured as users would run it: the raw schema, our keyword pre-scan (a keyword it
ignores = approximated), its own errors and warnings. `--generate N` then sends N schemas the
cascade accepts through the running service (default model, greedy, closing on) and counts the
outputs that validate with jsonschema.

Reads bench/data/schema_corpus.json (see schema_corpus.md; not in git), or any corpus in that
format with --corpus, such as bench/data/keyword_sample.json (in git: 30 hand-written schemas
using the keywords checked while generating, the sample docs/benchmarks.md compares the engines
on), or bench/data/frontier_sample.json (in git: 10 hand-written schemas in the shapes served
since the schema-frontier work: unevaluated* beside branches, overlapping patternProperties,
dynamic references, open maps); writes bench/out/schema_coverage.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from serve_app.config import ModelConfig
from serve_app.constraints import JsonSchemaConstraint, check_limits, installed_backends, plan_constraint
from serve_app.constraints.keywords import iter_subschemas, unsupported_keywords
from serve_app.constraints.registry import DEFAULT_CASCADE as CASCADE
from serve_app.constraints.registry import BackendDefaults
from serve_app.engine.compiler import ConstraintCompiler
from serve_app.engine.loading import load_hf_config, load_model, resolve_source
from serve_app.engine.placement import plan_placement
from serve_app.errors import ServeAppError

HERE = Path(__file__).parent
OUT = HERE / "out"


def outcome_of(error: ServeAppError) -> str:
    return {"approximated": "approximated", "unsupported_keyword": "approximated",
            "compile_timeout_s": "timeout"}.get(error.code or "", "error")


def single(compiler: ConstraintCompiler, backend: str, constraint: JsonSchemaConstraint) -> tuple[str, str, float]:
    """One backend on the raw schema: (outcome, reason, seconds)."""
    found = unsupported_keywords(constraint.json_schema, backend)
    if found:
        keyword, pointer = found[0]
        return "approximated", f"{keyword} at #{pointer}", 0.0
    started = time.perf_counter()
    try:
        check_limits(constraint, compiler.limits)
        timeout = compiler.limits.compile_timeout_s
        compiler._within_timeout(backend, "json_schema", lambda: compiler.backend(backend).compile(constraint, timeout),
                                 key=f"{backend}|{constraint.cache_key()}")
    except ServeAppError as error:
        return outcome_of(error), error.message[:160], time.perf_counter() - started
    return "exact", "", time.perf_counter() - started


def cascade(compiler: ConstraintCompiler, constraint: JsonSchemaConstraint) -> tuple[str, str, float, str, int]:
    """(outcome, reason, seconds, backend, keywords checked while generating)."""
    started = time.perf_counter()
    try:
        plan = plan_constraint(constraint, compiler.limits, BackendDefaults(), installed_backends())
        compiled = compiler.compile(plan)
    except ServeAppError as error:
        return outcome_of(error), error.message[:200], time.perf_counter() - started, "", 0
    checks = getattr(compiled, "checks", None)  # absent before generation-time checks existed
    return "exact", "", time.perf_counter() - started, compiled.backend, len(checks.sites) if checks else 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def generate(url: str, model: str, entries: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(timeout=600) as client:
        for entry in entries:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Give an example {entry['id'].split('/')[-1]} "
                                                             "as JSON."}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": entry["schema"]}}}
            response = client.post(f"{url}/v1/chat/completions", json=body)
            if response.status_code != 200:
                out.append({"id": entry["id"], "status": response.status_code, "valid": False})
                continue
            choice = response.json()["choices"][0]
            try:
                jsonschema.validate(json.loads(choice["message"]["content"]), entry["schema"])
                valid = True
            except (ValueError, jsonschema.ValidationError):
                valid = False
            out.append({"id": entry["id"], "status": 200, "valid": valid, "finish_reason": choice["finish_reason"],
                        "closed_early": choice.get("closed_early"), "reported_valid": choice.get("valid")})
            print(f"  {entry['id']}: valid={valid} finish={choice['finish_reason']} "
                  f"closed_early={choice.get('closed_early')}")
    return out


# Keywords no grammar expresses; the per-keyword table counts the schemas that use each one anywhere.
KEYWORDS = ("not", "oneOf", "uniqueItems", "if", "maxProperties", "minProperties", "dependencies",
            "dependentRequired", "dependentSchemas", "contains", "propertyNames", "unevaluatedProperties")


def keywords_in(schema: Any) -> list[str]:
    present = {k for _, sub in iter_subschemas(schema) for k in sub if k in KEYWORDS}
    return [k for k in KEYWORDS if k in present and not (k == "uniqueItems" and not any(
        sub.get("uniqueItems") is True for _, sub in iter_subschemas(schema)))]


def measure(compiler: ConstraintCompiler, backends: list[str], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, entry in enumerate(entries):
        constraint = JsonSchemaConstraint.model_validate({"schema": entry["schema"]})
        row: dict[str, Any] = {"id": entry["id"], "category": entry["category"], "source": entry["source"],
                               "keywords": keywords_in(entry["schema"])}
        for backend in backends:
            row[backend] = single(compiler, backend, constraint)
        row["cascade"] = cascade(compiler, constraint)
        rows.append(row)
        if i % 25 == 0:
            print(f"  {i}/{len(entries)} {entry['id']}: " + ", ".join(f"{k}={row[k][0]}" for k in [*backends,
                                                                                                     "cascade"]))
    return rows



def report(rows: list[dict[str, Any]], backends: list[str]) -> dict[str, Any]:
    strategies = [*backends, "cascade"]
    print("\n| source | n | " + " | ".join(f"{s} exact" for s in strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for category in sorted({r["category"] for r in rows}) + ["all"]:
        mine = [r for r in rows if category in ("all", r["category"])]
        cells = [f"{sum(r[s][0] == 'exact' for r in mine) / len(mine):.0%}" for s in strategies]
        print(f"| {category} | {len(mine)} | " + " | ".join(cells) + " |")

    print("\n| strategy | exact | approximated (rejected) | error | timeout | compile p50 | compile p95 |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for s in strategies:
        counts = collections.Counter(r[s][0] for r in rows)
        times = [r[s][2] for r in rows if r[s][0] == "exact"]
        summary[s] = {**counts, "p50_ms": 1000 * percentile(times, 0.5), "p95_ms": 1000 * percentile(times, 0.95)}
        print(f"| {s} | {counts['exact']} ({counts['exact'] / len(rows):.0%}) | {counts['approximated']} | "
              f"{counts['error']} | {counts['timeout']} | {summary[s]['p50_ms']:.1f} ms | "
              f"{summary[s]['p95_ms']:.1f} ms |")
    print("\n| keyword | schemas using it | cascade exact | of which checked while generating |")
    print("|---|---|---|---|")
    for keyword in KEYWORDS:
        using = [r for r in rows if keyword in r.get("keywords", ())]
        if using:
            exact = [r for r in using if r["cascade"][0] == "exact"]
            checked = sum(1 for r in exact if len(r["cascade"]) > 4 and r["cascade"][4])
            print(f"| {keyword} | {len(using)} | {len(exact)} ({len(exact) / len(using):.0%}) | {checked} |")
    winners = collections.Counter(r["cascade"][3] for r in rows if r["cascade"][0] == "exact")
    print(f"\ncascade winners: {dict(winners)}")
    reasons = collections.Counter(r["cascade"][1].split(":")[0][:80] for r in rows if r["cascade"][0] != "exact")
    print("cascade rejections (first words of the 400):")
    for reason, n in reasons.most_common(12):
        print(f"  {n:4d}  {reason}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=str(HERE / "data" / "schema_corpus.json"))
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--timeout", type=float, default=10.0, help="compile budget per backend (s)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N schemas")
    parser.add_argument("--reuse", action="store_true", help="take compile outcomes from the last run's JSON")
    parser.add_argument("--serve-url", default=None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--generate", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--cascade-only", action="store_true", help="skip the single-backend columns")
    parser.add_argument("--out", default=str(OUT / "schema_coverage.json"))
    args = parser.parse_args()

    entries = json.loads(Path(args.corpus).read_text())
    if args.limit:
        entries = entries[:args.limit]
    previous = Path(args.out)
    if args.reuse and previous.exists():
        rows = json.loads(previous.read_text())["rows"]
        entries = entries[:len(rows)]
        backends = [b for b in CASCADE if b in rows[0]]
        for row, entry in zip(rows, entries, strict=True):
            row.setdefault("keywords", keywords_in(entry["schema"]))
    else:
        config = ModelConfig(name="coverage", source=args.source,
                             limits={"compile_timeout_s": args.timeout, "max_schema_bytes": 1 << 20,
                                     "max_ref_expansion": 100_000, "max_schema_depth": 256})
        source = resolve_source(config)
        loaded = load_model(config, plan_placement(config, (), load_hf_config(source)), source)
        compiler = ConstraintCompiler(loaded.model, loaded.tokenizer, config.limits)
        backends = [] if args.cascade_only else [b for b in CASCADE if b in installed_backends()]
        print(f"{len(entries)} schemas; backends {backends}; compile budget {args.timeout:g} s")
        rows = measure(compiler, backends, entries)
    summary = report(rows, backends)

    generated: list[dict[str, Any]] = []
    if args.serve_url and args.generate:
        accepted = [e for e, r in zip(entries, rows, strict=True) if r["cascade"][0] == "exact"]
        step = max(1, len(accepted) // args.generate)
        picked = accepted[::step][:args.generate]
        print(f"\ngenerating for {len(picked)} accepted schemas through {args.serve_url}")
        generated = generate(args.serve_url, args.model, picked, args.max_tokens)
        ok = [g for g in generated if g["status"] == 200]
        valid, closed = sum(g["valid"] for g in ok), sum(bool(g.get("closed_early")) for g in ok)
        print(f"valid through the service: {valid}/{len(ok)} ({valid / max(1, len(ok)):.0%}); "
              f"closed early {closed}; non-200: {len(generated) - len(ok)}")
        mismatched = [g for g in ok if g["valid"] != g["reported_valid"]]
        print(f"responses whose 'valid' flag disagrees with jsonschema: {len(mismatched)}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows,
                                                          "generated": generated}, indent=1, default=str))


if __name__ == "__main__":
    main()
