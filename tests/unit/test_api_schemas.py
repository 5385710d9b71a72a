"""Response bodies the router sends: they must always be writable as strict JSON."""

import json

from serve_app.api.responses import native_response
from serve_app.constraints import parse_constraint
from serve_app.generation import GenerationResult, Usage


def _result(text):
    return GenerationResult(text=text, finish_reason="stop", valid=True,
                            usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4))


def test_a_valid_number_too_large_for_a_float_leaves_parsed_empty_instead_of_a_500():
    """Found by the integration suite: a sampled `"amount":1e999` is valid JSON (and valid for
    `type: number`), parses to inf, and broke the strict JSON response with a 500."""
    constraint = parse_constraint({"type": "json_schema", "schema": {"type": "object"}})
    body = native_response("tiny", _result('{"amount":1e999,"n":[2]}'), constraint, 0.1)
    assert body["parsed"] is None and body["text"] == '{"amount":1e999,"n":[2]}' and body["valid"] is True
    json.dumps(body, allow_nan=False)
    assert native_response("tiny", _result('{"amount":1.5,"n":[2]}'), constraint, 0.1)["parsed"] == {
        "amount": 1.5, "n": [2]}
