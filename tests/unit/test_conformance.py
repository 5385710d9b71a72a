"""Conformance of the constraint layer, case by case (tests/conformance.py generates the cases):
each instance is written token by token into a row of the real engine exactly as the decode loop
handles a sampled token (the constraint's mask must allow it, then the row's policies: checks
while generating, the matcher, end of sequence), then the end-of-sequence token, and the result
is checked as every answer is.

Sound: an instance that fails its schema is refused while it is written (a token masked, or a
check refusing the value it closes); the few no grammar can refuse (a calendar's days, a leap
second's minute) end `valid: false`. Complete: every valid instance, in the spelling the grammar
generates (declared order, compact), is accepted and valid.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.constraints.keywords import FORMATS, VALIDATION_KEYWORDS
from serve_app.engine.factory import create_engine
from serve_app.engine.policies import RETRY, TokenStep, advance_row
from serve_app.engine.requests import Submission
from serve_app.engine.stream import Stream
from serve_app.generation import GenerationRequest, SamplingParams
from tests.conformance import Case, cases

CASES = cases()
# Older spellings of keywords the cases cover (draft-07 and earlier).
OLDER = {"dependencies", "additionalItems"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Any:
    config = ModelConfig(name="conformance", source=tiny_model_dir, limits={"max_new_tokens": 512},
                         sampling={"temperature": 0})
    with create_engine(config) as built:
        yield built


def spelled(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def allowed(row: Any, token: int) -> bool:
    """Whether the row's mask lets `token` be sampled (what the decode loop applies to the logits)."""
    if row.matcher is None:
        return True
    mask = torch.zeros((1, row.matcher.width), dtype=torch.int32)
    row.matcher.fill_bitmask(mask, 0)
    return bool((int(mask[0, token // 32]) >> (token % 32)) & 1)


def feed(engine: Any, schema: dict[str, Any], text: str) -> tuple[str, bool | None]:
    """("accepted", valid) when the row ends at EOS; else how it was stopped: "masked" (the mask
    forbids a token), "checked" (a check refused the value it closes), or the row's finish reason."""
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    prepared = engine.prepare(GenerationRequest(prompt="x", constraint=constraint,
                                                sampling=SamplingParams(max_new_tokens=512)))
    stream = Stream(prepared.row)
    verdict = None
    for token in [*engine.tokenizer.encode(text, add_special_tokens=False), min(engine.eos_ids)]:
        if not allowed(stream.row, token):
            return "masked", None
        verdict = advance_row(TokenStep(stream, token), engine.loop.policies, engine._decode)
        if verdict == RETRY:
            return "checked", None
        if verdict is not None:
            break
    if verdict != "stop":
        return str(verdict), None
    stream.output.finish_reason = "stop"
    return "accepted", engine.result(Submission(prepared, stream), stream.output).valid


def test_every_keyword_served_has_cases() -> None:
    covered = {c.keyword for c in CASES} | {k for c in CASES for k in c.schema}
    assert VALIDATION_KEYWORDS - covered - OLDER == set()
    assert {c.valid[0] for c in CASES if c.keyword == "format"} and \
        {c.schema["format"] for c in CASES if c.keyword == "format"} == set(FORMATS)


@pytest.mark.parametrize("case", [c for c in CASES if c.labelled], ids=lambda c: c.name)
def test_the_cases_labels_are_jsonschemas(case: Case) -> None:
    kind = jsonschema.validators.validator_for(case.schema, default=jsonschema.Draft202012Validator)
    validator = kind(case.schema, format_checker=jsonschema.FormatChecker())
    assert [validator.is_valid(v) for v in case.valid] == [True] * len(case.valid)
    assert [validator.is_valid(v) for v in case.invalid] == [False] * len(case.invalid)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_valid_instances_are_accepted_and_invalid_ones_refused_while_written(engine: Any, case: Case) -> None:
    for value in case.valid:
        assert feed(engine, case.schema, spelled(value)) == ("accepted", True), (case.schema, spelled(value))
    for value in case.invalid:
        outcome = feed(engine, case.schema, spelled(value))
        assert outcome[0] in ("masked", "checked"), (case.schema, spelled(value), outcome)
    for value in case.flagged:
        assert feed(engine, case.schema, spelled(value)) == ("accepted", False), (case.schema, spelled(value))


OPEN = {"type": "object", "properties": {"ab": {"type": "integer"}}, "additionalProperties": {"type": "string"}}


@pytest.mark.parametrize(("schema", "text"), [
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"x":1,"x":2}'),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
     '{"x1":1,"x1":2}'),
    ({}, '{"x":[{"k":1,"k":1}]}'),
    (OPEN, '{"a\\u0062":"s"}'),
    (OPEN, '{"ab":1,"a\\u0062":"s"}'),
], ids=["repeated", "repeated pattern", "repeated in free JSON", "escaped declared", "escaped repeat"])
def test_a_repeated_name_or_a_declared_one_spelled_with_escapes_is_refused_while_written(
        engine: Any, schema: dict[str, Any], text: str) -> None:
    """Open objects let the grammar write any name: the checks refuse what a parser would read as a
    repeated key, or as a declared property whose value escaped its subschema."""
    assert feed(engine, schema, text)[0] == "checked"


def test_names_spelled_plainly_or_escaped_but_undeclared_are_accepted(engine: Any) -> None:
    assert feed(engine, OPEN, '{"ab":1,"c":"s"}') == ("accepted", True)
    assert feed(engine, OPEN, '{"ab":1,"\\u00e9":"s"}') == ("accepted", True)
