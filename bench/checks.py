"""What checks made while generating cost per token, and what they recover.

    .venv/bin/python -u bench/checks.py                      # SmolLM2, in-process, the built-in schemas
    .venv/bin/python -u bench/checks.py --corpus bench/data/keyword_corpus.json --limit 24

For each schema the cascade accepts with checks (keywords no grammar expresses: `not`, `oneOf`,
`uniqueItems`, `if`, ...), generates greedily in one batch and times the scan and the checks
(`RowChecker.trial` and `commit`) against the whole generation. Reports per schema: tokens, the
values checked, refusals, tokens taken back, whether the output validates with jsonschema; then
the checks' time per generated token and their share of the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jsonschema

from serve_app.config import ModelConfig
from serve_app.constraints import JsonSchemaConstraint
from serve_app.constraints.row_checks import RowChecker
from serve_app.engine.factory import create_engine
from serve_app.errors import ServeAppError
from serve_app.generation import GenerationRequest, SamplingParams

HERE = Path(__file__).parent
# Real-world shapes of each keyword, small enough for a 135M model to fill.
BUILTIN: dict[str, dict[str, Any]] = {
    "labels_unique": {"type": "object", "properties": {"labels": {"type": "array", "items": {
        "enum": ["bug", "docs", "feature", "security", "performance"]}, "minItems": 3, "maxItems": 4,
        "uniqueItems": True}}, "required": ["labels"], "additionalProperties": False},
    "ports_unique": {"type": "object", "properties": {"ports": {"type": "array", "items": {
        "type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 3, "maxItems": 3, "uniqueItems": True}},
        "required": ["ports"], "additionalProperties": False},
    "username_not_reserved": {"type": "object", "properties": {"username": {
        "type": "string", "minLength": 3, "maxLength": 12, "pattern": "^[a-z]+$",
        "not": {"enum": ["admin", "root", "system"]}}}, "required": ["username"], "additionalProperties": False},
    "id_or_name_oneof": {"type": "object", "properties": {"ref": {"oneOf": [
        {"type": "string", "pattern": "^[0-9]+$", "maxLength": 6}, {"type": "string", "maxLength": 8}]}},
        "required": ["ref"], "additionalProperties": False},
    "shipping_if": {"type": "object", "properties": {
        "country": {"enum": ["US", "CA", "FR"]}, "postal_code": {"type": "string", "maxLength": 10}},
        "required": ["country", "postal_code"], "additionalProperties": False,
        "if": {"properties": {"country": {"const": "US"}}, "required": ["country"]},
        "then": {"properties": {"postal_code": {"pattern": "^[0-9]{5}$"}}},
        "else": {"properties": {"postal_code": {"pattern": "^[A-Z0-9 ]+$"}}}},
}


class Timed:
    """Wraps RowChecker.trial and commit with a clock."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._trial, self._commit = RowChecker.trial, RowChecker.commit
        timed = self

        def trial(checker: RowChecker, text: str, final: bool = False) -> Any:
            started = time.perf_counter()
            try:
                return timed._trial(checker, text, final)
            finally:
                timed.seconds += time.perf_counter() - started
                timed.calls += 1

        def commit(checker: RowChecker, text: str) -> None:
            started = time.perf_counter()
            try:
                timed._commit(checker, text)
            finally:
                timed.seconds += time.perf_counter() - started

        RowChecker.trial, RowChecker.commit = trial, commit  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--corpus", default=None, help="a corpus in schema_corpus.json's format")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    corpus = json.loads(Path(args.corpus).read_text()) if args.corpus else None
    schemas = {e["id"]: e["schema"] for e in corpus} if corpus else BUILTIN
    config = ModelConfig(name="checks", source=args.source, sampling={"temperature": 0},
                         limits={"max_new_tokens": args.max_tokens, "max_schema_bytes": 1 << 20})
    timed = Timed()
    rows: list[dict[str, Any]] = []
    with create_engine(config) as engine:
        requests = []
        for name, schema in schemas.items():
            constraint = JsonSchemaConstraint.model_validate({"schema": schema})
            try:
                compiled = engine.compile(constraint)
            except ServeAppError:
                continue
            if compiled.checks is None:
                continue
            prompt = [{"role": "user", "content": f"Give an example {name.split('/')[-1]} as JSON."}]
            requests.append((name, schema, GenerationRequest(messages=prompt, constraint=constraint,
                                                             sampling=SamplingParams(max_new_tokens=args.max_tokens))))
            if len(requests) >= args.limit:
                break
        timed.seconds, timed.calls = 0.0, 0
        started = time.perf_counter()
        results = []
        for i in range(0, len(requests), args.batch):
            part = requests[i:i + args.batch]
            results += engine.generate([r for _, _, r in part])
        wall = time.perf_counter() - started
    tokens = 0
    print("| schema | tokens | checked values | refusals | taken back | finish | valid (jsonschema) |")
    print("|---|---|---|---|---|---|---|")
    for (name, schema, _), result in zip(requests, results, strict=True):
        try:
            valid = result.finish_reason == "stop" and jsonschema.Draft202012Validator(schema).is_valid(
                json.loads(result.text))
        except ValueError:
            valid = False
        assert not (result.valid and not valid), f"{name}: flagged valid, rejected by jsonschema"
        checks = result.checks or {}
        tokens += result.usage.completion_tokens
        rows.append({"name": name, "valid": valid, **checks})
        print(f"| {name} | {result.usage.completion_tokens} | {checks.get('evaluated')} | "
              f"{checks.get('violations')} | {checks.get('rollbacks')} | {result.finish_reason} | {valid} |")
    print(f"\n{sum(r['valid'] for r in rows)}/{len(rows)} valid; {tokens} tokens in {wall:.1f} s "
          f"({tokens / wall:.1f} tok/s); checks {timed.seconds * 1000:.1f} ms in {timed.calls} trials = "
          f"{timed.seconds / max(1, tokens) * 1e6:.0f} us per token, {timed.seconds / wall:.2%} of the wall time")


if __name__ == "__main__":
    main()
