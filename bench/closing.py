"""Do structured answers finish? Share of JSON-Schema responses that validate with closing off
vs on, greedy and sampled, and the mean tokens per response, measured side by side in one run
on one engine (SmolLM2 by default, the schema in the prompt).

    .venv/bin/python bench/closing.py                       # 12 hand-written + 12 real-world schemas
    .venv/bin/python bench/closing.py --corpus 40 --max-tokens 384

Writes bench/out/closing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.errors import ServeAppError
from serve_app.generation import GenerationRequest, SamplingParams

DATA = Path(__file__).parent / "data"
OUT = Path(__file__).parent / "out"


def load_schemas(corpus: int, max_bytes: int) -> list[tuple[str, dict]]:
    hand = json.loads((DATA / "schemas.json").read_text())["schemas"]
    schemas = [(f"bench/{name}", schema) for name, schema in hand.items()]
    path = DATA / "schema_corpus.json"
    if corpus and path.exists():
        entries = [e for e in json.loads(path.read_text()) if len(json.dumps(e["schema"])) <= max_bytes]
        step = max(1, len(entries) // corpus)
        schemas += [(e["id"], e["schema"]) for e in entries[::step][:corpus]]
    return schemas


def prompt(name: str, schema: dict) -> list[dict[str, str]]:
    text = json.dumps(schema, separators=(",", ":"))[:1500]
    return [{"role": "system", "content": "You reply with one JSON value and nothing else."},
            {"role": "user", "content": f"Give an example {name.split('/')[-1]} as JSON matching: {text}"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--corpus", type=int, default=12, help="real-world schemas to add from the corpus")
    parser.add_argument("--max-bytes", type=int, default=6000, help="skip corpus schemas larger than this")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--undeclared-properties", action="store_true",
                        help="objects may get undeclared properties (the grammar before declared-only)")
    parser.add_argument("--out", default=str(OUT / "closing.json"))
    args = parser.parse_args()

    engine = create_engine(ModelConfig(name="bench", source=args.source, dtype=args.dtype,
                                       limits={"max_new_tokens": args.max_tokens, "max_prompt_tokens": 8192}))
    print(f"dtype {engine.loaded.plan.dtype}")
    cases = []
    for name, schema in load_schemas(args.corpus, args.max_bytes):
        try:
            constraint = parse_constraint({"type": "json_schema", "schema": schema,
                                           "undeclared_properties": args.undeclared_properties})
            compiled = engine.compile(constraint)
        except ServeAppError as error:
            print(f"skip {name}: {error.message[:90]}")
            continue
        if compiled.min_tokens is not None and compiled.min_tokens > args.max_tokens:
            print(f"skip {name}: needs {compiled.min_tokens} tokens")
            continue
        cases.append((name, schema, constraint))
    print(f"{len(cases)} schemas, max_tokens {args.max_tokens}")

    rows = []
    modes = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.95}}
    for mode, sampling in modes.items():
        for close in (False, True):
            requests = [GenerationRequest(messages=prompt(name, schema), constraint=constraint,
                                          sampling=SamplingParams(max_new_tokens=args.max_tokens, seed=i,
                                                                  close_json=close, **sampling))
                        for i, (name, schema, constraint) in enumerate(cases)]
            started = time.perf_counter()
            results = []
            for i in range(0, len(requests), args.batch):
                results += engine.generate(requests[i:i + args.batch])
            elapsed = time.perf_counter() - started
            for (name, _, _), result in zip(cases, results, strict=True):
                rows.append({"schema": name, "mode": mode, "closing": close, "valid": bool(result.valid),
                             "finish_reason": result.finish_reason, "closed_early": result.closed_early,
                             "tokens": result.usage.completion_tokens})
            mine = rows[-len(results):]
            print(f"{mode:8s} closing {'on ' if close else 'off'}: valid {sum(r['valid'] for r in mine):3d}/"
                  f"{len(mine)}  length {sum(r['finish_reason'] == 'length' for r in mine):3d}  "
                  f"closed early {sum(r['closed_early'] for r in mine):3d}  "
                  f"mean tokens {statistics.mean(r['tokens'] for r in mine):6.1f}  ({elapsed:.0f} s)")

    print("\n| decoding | closing | valid share | cut by length | closed early | mean tokens |")
    print("|---|---|---|---|---|---|")
    summary = []
    for mode in modes:
        for close in (False, True):
            mine = [r for r in rows if r["mode"] == mode and r["closing"] == close]
            line = {"mode": mode, "closing": close, "valid_share": sum(r["valid"] for r in mine) / len(mine),
                    "length_share": sum(r["finish_reason"] == "length" for r in mine) / len(mine),
                    "closed_early": sum(r["closed_early"] for r in mine),
                    "mean_tokens": statistics.mean(r["tokens"] for r in mine), "n": len(mine)}
            summary.append(line)
            print(f"| {mode} | {'on' if close else 'off'} | {line['valid_share']:.0%} | {line['length_share']:.0%} "
                  f"| {line['closed_early']} | {line['mean_tokens']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"max_tokens": args.max_tokens, "dtype": engine.loaded.plan.dtype,
                                          "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
