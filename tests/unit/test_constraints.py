import pytest

from serve_app.config import LimitsConfig
from serve_app.constraints import check_limits, parse_constraint
from serve_app.constraints.keywords import check_schema_supported, keyword_table_markdown, unsupported_keywords
from serve_app.errors import ConstraintError, LimitExceededError

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_each_kind_parses_from_its_discriminator():
    assert parse_constraint({"type": "json_schema", "schema": PERSON}).json_schema == PERSON
    assert parse_constraint({"type": "regex", "pattern": r"\d+"}).pattern == r"\d+"
    assert parse_constraint({"type": "choice", "choices": ["a", "b"]}).choices == ["a", "b"]
    assert parse_constraint({"type": "grammar", "grammar": 'start: "a"+'}).type == "grammar"


@pytest.mark.parametrize(("data", "message"), [
    ({"type": "json_schema", "schema": {"type": "strin"}}, "invalid JSON Schema at #/type"),
    ({"type": "json_schema", "schema": {"properties": {"a": {"minLength": -1}}}},
     "invalid JSON Schema at #/properties/a/minLength"),
    ({"type": "regex", "pattern": "(abc"}, "invalid regex"),
    ({"type": "regex", "pattern": "(?=a)b"}, "lookaround"),
    ({"type": "regex", "pattern": r"(a)\1"}, "backreferences"),
    ({"type": "choice", "choices": []}, "at least 1 item"),
    ({"type": "choice", "choices": ["a", "a"]}, "distinct"),
    ({"type": "choice", "choices": ["a", ""]}, "non-empty"),
    ({"type": "grammar", "grammar": "start: missing_rule"}, "invalid Lark grammar"),
    ({"type": "sql", "query": "x"}, "does not match any of the expected tags"),
    ({"type": "regex", "pattern": "a", "flags": "i"}, "Extra inputs"),
])
def test_invalid_constraints_raise_a_typed_error_saying_what_is_wrong(data, message):
    with pytest.raises(ConstraintError, match=message):
        parse_constraint(data)


def test_cache_key_is_canonical():
    a = parse_constraint({"type": "json_schema", "schema": {"type": "object", "required": ["x"]}})
    b = parse_constraint({"type": "json_schema", "schema": {"required": ["x"], "type": "object"}})
    c = parse_constraint({"type": "json_schema", "schema": {"type": "object"}})
    assert a.cache_key() == b.cache_key() != c.cache_key()
    assert parse_constraint({"type": "choice", "choices": ["a", "b"]}).cache_key() == \
        parse_constraint({"type": "choice", "choices": ["b", "a"]}).cache_key()


def test_satisfaction_checks_per_kind():
    schema = parse_constraint({"type": "json_schema", "schema": PERSON})
    assert schema.is_satisfied_by('{"name": "Ada", "age": 36}')
    assert not schema.is_satisfied_by('{"name": "Ada"}')
    assert not schema.is_satisfied_by('{"name": "Ada", "age": ')
    regex = parse_constraint({"type": "regex", "pattern": r"\d{3}"})
    assert regex.is_satisfied_by("123") and not regex.is_satisfied_by("1234")
    choice = parse_constraint({"type": "choice", "choices": ["yes", "no"]})
    assert choice.is_satisfied_by("no") and not choice.is_satisfied_by("nope")
    grammar = parse_constraint({"type": "grammar", "grammar": 'start: NUM "+" NUM\nNUM: /[0-9]+/'})
    assert grammar.is_satisfied_by("1+2") and not grammar.is_satisfied_by("1+")


def test_limits_name_the_limit_exceeded():
    limits = LimitsConfig(max_schema_bytes=64, max_regex_length=5, max_choices=2)
    big = parse_constraint({"type": "json_schema", "schema": {"description": "x" * 100}})
    with pytest.raises(LimitExceededError, match="max_schema_bytes"):
        check_limits(big, limits)
    with pytest.raises(LimitExceededError, match="max_regex_length"):
        check_limits(parse_constraint({"type": "regex", "pattern": "abcdef"}), limits)
    with pytest.raises(LimitExceededError, match="max_choices"):
        check_limits(parse_constraint({"type": "choice", "choices": ["a", "b", "c"]}), limits)
    check_limits(parse_constraint({"type": "regex", "pattern": "abc"}), limits)


@pytest.mark.parametrize(("schema", "keyword", "pointer"), [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not", "#/properties/a"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "#/"),
    ({"$defs": {"x": {"type": "object", "propertyNames": {"pattern": "^a"}}}}, "propertyNames", "#/$defs/x"),
    ({"type": "string", "format": "credit-card"}, "format: credit-card", "#/"),
    ({"anyOf": [{"type": "string"}, {"if": {"type": "string"}, "then": {}}]}, "if", "#/anyOf/1"),
])
def test_keywords_llguidance_cannot_enforce_are_named_with_their_pointer(schema, keyword, pointer):
    with pytest.raises(ConstraintError) as error:
        check_schema_supported(schema, "llguidance")
    assert f"unsupported JSON Schema keyword '{keyword}' at {pointer}" in str(error.value)


def test_outlines_core_numeric_bounds_are_rejected_not_ignored():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    check_schema_supported(schema, "llguidance")
    with pytest.raises(ConstraintError, match="'minimum' at #/properties/n for backend outlines_core"):
        check_schema_supported(schema, "outlines_core")


def test_annotations_and_extension_keys_are_allowed():
    annotated = {"type": "string", "title": "t", "description": "d", "examples": ["x"],
                 "x-vendor": {"not": 1}, "default": "x", "$comment": "c"}
    assert unsupported_keywords(annotated, "llguidance") == []
    check_schema_supported(annotated, "llguidance")  # raises for a keyword it would not enforce
    with pytest.raises(ConstraintError, match="'not' at #/"):
        check_schema_supported({**annotated, "not": {"const": "y"}}, "llguidance")


def test_keyword_table_lists_every_backend():
    table = keyword_table_markdown()
    assert "| keyword | llguidance | outlines_core | xgrammar |" in table
    assert "| `uniqueItems` | checked | checked | checked |" in table
    assert "| `unevaluatedProperties` | rewritten, else checked | rewritten, else checked | rewritten, else checked |" \
        in table
    assert "| `multipleOf` | yes | rejected | rejected |" in table


def test_checking_against_a_self_referencing_schema_is_bounded_and_never_raises():
    import time

    from serve_app.api.tools import Tool, detect_call

    doubling = {"type": ["array", "integer"], "items": {"anyOf": [{"$ref": "#"}, {"$ref": "#"}]}, "maximum": 0}
    constraint = parse_constraint({"type": "json_schema", "schema": doubling})
    assert constraint.is_satisfied_by("[[[0]]]") is True and constraint.is_satisfied_by("[[[1]]]") is False
    started = time.monotonic()
    assert constraint.is_satisfied_by("[" * 40 + "1" + "]" * 40) is False  # 2**40 branches: out of time
    assert time.monotonic() - started < 30  # the bound is 2 s; a wide margin for a slow machine
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        assert constraint.is_satisfied_by(text) is False  # past the parser's stack: not valid, no error
    tool = Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": doubling}})
    assert detect_call('{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}", [tool]) == (None, None)


@pytest.mark.parametrize("name,good,bad", [
    ("time", ["08:30:06Z", "08:30:06.25+02:00", "23:59:60Z", "15:59:60-08:00"], ["08:30:06", "22:59:60Z", "24:00:00Z"]),
    ("date", ["2024-02-29"], ["2023-02-29", "2024-13-01"]),
    ("date-time", ["2024-02-29T10:00:00Z", "2024-01-01t10:00:00z"], ["2024-01-01 10:00:00Z", "2024-01-01T10:00:00"]),
    ("duration", ["P1D", "PT1H30M", "P2W"], ["P", "PT", "P1DT"]),
    ("hostname", ["example.com", "xn--nxasmq6b.com"], ["-a.com", "ab--c.com", "a" * 64 + ".com"]),
    ("uri", ["https://a.example/x?y=1#z", "urn:isbn:123"], ["no scheme", "http://a b", "http://%zz"]),
])
def test_every_format_the_grammar_enforces_is_checked_after_generation_by_one_definition(name, good, bad):
    from serve_app.constraints.keywords import FORMATS
    from serve_app.constraints.validation import ENFORCED_FORMATS

    assert set(FORMATS) <= set(ENFORCED_FORMATS.checkers)
    assert ENFORCED_FORMATS.conforms(FORMATS[name], name)  # the example closing writes
    assert all(ENFORCED_FORMATS.conforms(v, name) for v in good) and not any(ENFORCED_FORMATS.conforms(v, name)
                                                                             for v in bad)


def test_a_generated_time_is_valid(tiny_engine):
    from serve_app.generation import GenerationRequest, SamplingParams

    constraint = parse_constraint({"type": "json_schema", "schema": {"type": "object", "properties": {
        "at": {"type": "string", "format": "time"}}, "required": ["at"]}})
    results = tiny_engine.generate([GenerationRequest(prompt="When?", constraint=constraint, sampling=SamplingParams(
        max_new_tokens=48, temperature=1.0, seed=seed)) for seed in range(4)])
    finished = [r for r in results if r.finish_reason == "stop"]
    assert finished and all(r.valid for r in finished)


def test_an_output_with_a_repeated_key_is_never_valid():
    """Parsers disagree on which value a repeated key keeps (Python's the last, others the first)."""
    constraint = parse_constraint({"type": "json_schema", "schema": {"type": "object"}})
    assert constraint.is_satisfied_by('{"a":1,"b":{"c":1}}')
    assert not constraint.is_satisfied_by('{"a":1,"a":2}')
    assert not constraint.is_satisfied_by('{"k":{"x":1,"x":1}}')
