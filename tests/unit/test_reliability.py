"""What used to end in a 500, a stall or a crash, checked where it lives: body parsing, the
constraint checks that bound work before parsing, regex time limits, the guard, compile
timeouts, the replica's compile/submit order, the decode loop's row isolation, shutdown."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from serve_app.api.body import load_json
from serve_app.config import ConfigError, LimitsConfig, ModelConfig, ServerConfig
from serve_app.constraints import build_constraint, check_constraint, group_depth, parse_constraint
from serve_app.errors import ConstraintError, InvalidRequestError, LimitExceededError
from serve_app.generation import GenerationRequest, SamplingParams
from serve_app.guard import Guard, api_keys

ROOT = Path(__file__).resolve().parents[2]


# -- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,fragment", [
    ('{"a": NaN}', "NaN is not a JSON value"),
    ('{"a": -Infinity}', "-Infinity is not a JSON value"),
    ('{"a": 1e999}', "out of range"),
    ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
    ('{"\\udfff": 1}', "lone UTF-16 surrogate"),
    ("[" * 200 + "]" * 200, "nested deeper than 128"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b'{"a": "\xff"}', "malformed JSON"),
])
def test_bodies_that_are_not_finite_valid_shallow_json_are_refused_naming_why(text, fragment):
    with pytest.raises((InvalidRequestError, LimitExceededError), match=fragment):
        load_json(text, max_depth=128)


def test_a_surrogate_pair_is_one_valid_character_and_passes():
    assert load_json('{"emoji": "\\ud83d\\ude00"}', max_depth=8) == {"emoji": "\U0001F600"}


def test_the_error_names_the_path_of_the_bad_string():
    with pytest.raises(InvalidRequestError) as caught:
        load_json('{"messages": [{"role": "user", "content": "\\ud800"}]}', max_depth=8)
    assert caught.value.param == "messages.0.content"


# -- constraint checks bound the work before anything parses ----------------------------------


@pytest.mark.parametrize("text,grammar,depth", [
    ("(a(b)c)", False, 2),
    (r"\((\()", False, 1),  # escaped parentheses are not groups
    ("[(((]x", False, 0),  # nor are parentheses in a character class
    ("[]()]x(y)", False, 1),  # a leading ] is a literal inside the class
    ('start: ("(" | "[")+ (a b)', True, 1),  # quoted literals skipped
    ("start: [a (b {c})]", True, 3),
])
def test_group_depth_counts_only_real_nesting(text, grammar, depth):
    assert group_depth(text, grammar=grammar) == depth


@pytest.mark.parametrize("data,fragment", [
    ({"type": "regex", "pattern": "(" * 1500 + "a" + ")" * 1500}, "max_group_depth"),
    ({"type": "grammar", "grammar": "start: " + "(" * 1500 + '"a"' + ")" * 1500}, "max_group_depth"),
    ({"type": "json_schema", "schema": {"pattern": "(" * 100 + ")" * 100}}, "max_group_depth"),
    ({"type": "json_schema", "schema": {"patternProperties": {"(" * 100 + ")" * 100: {}}}}, "max_group_depth"),
    ({"type": "choice", "choices": [f"{i}" + "x" * 800 for i in range(500)]}, "max_choice_bytes"),
])
def test_limits_refuse_before_any_parser_recurses(data, fragment):
    started = time.perf_counter()
    with pytest.raises(LimitExceededError, match=fragment):
        parse_constraint(data)
    assert time.perf_counter() - started < 1.0  # without the limits: RecursionError or seconds of work


def test_a_schema_nested_deeper_than_the_recursion_limit_is_a_limit_error_not_a_crash():
    schema: dict = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(LimitExceededError, match="max_schema_depth"):
        parse_constraint({"type": "json_schema", "schema": schema})
    with pytest.raises(LimitExceededError, match="max_schema_depth"):
        check_constraint(build_constraint({"type": "json_schema", "schema": schema}), LimitsConfig())


def test_unreferenced_definitions_nested_deep_are_walked_without_recursion():
    deep: dict = {"type": "string"}
    for _ in range(3000):
        deep = {"items": deep}
    with pytest.raises((ConstraintError, LimitExceededError)):  # refused for what it is, not a RecursionError
        parse_constraint({"type": "json_schema", "schema": {"$defs": {"d": deep}, "type": "string",
                                                            "pattern": "(" * 80 + ")" * 80}})


def test_a_ref_under_a_nested_id_resolves_against_it_and_fragment_ids_move_no_base():
    # Under "$id": "sub.json", "#/$defs/t" means sub.json's own $defs (constraints/refs.py): it has none.
    nested = {"$defs": {"t": {"type": "string"}}, "properties": {"a": {"$id": "sub.json", "$ref": "#/$defs/t"}}}
    with pytest.raises(ConstraintError, match=r"unresolvable \$ref '#/\$defs/t' at #/properties/a \(against the "
                                              r"base sub.json\)"):
        parse_constraint({"type": "json_schema", "schema": nested})
    inside = {"properties": {"a": {"$id": "sub.json", "$defs": {"t": {"type": "string"}}, "$ref": "#/$defs/t"}}}
    parse_constraint({"type": "json_schema", "schema": inside})
    fragment = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"t": {"type": "string"}},
                "properties": {"a": {"$id": "#/properties/a", "$ref": "#/definitions/t"}}}
    parse_constraint({"type": "json_schema", "schema": fragment})


@pytest.mark.parametrize("grammar", ['start: X\n%import nosuchmod.X', 'start: X\n%import .local.X',
                                     'start: X\n%import os (X)', 'start: X\n%import   /etc/passwd'])
def test_a_grammar_may_import_only_lark_common(grammar):
    with pytest.raises(ConstraintError, match="is not allowed") as caught:
        parse_constraint({"type": "grammar", "grammar": grammar})
    assert "No such file" not in caught.value.message


def test_a_grammar_importing_from_common_is_accepted():
    word = parse_constraint({"type": "grammar", "grammar": 'start: WORD\n%import common.WORD'})
    assert word.is_satisfied_by("hello") and not word.is_satisfied_by("hello world")
    grammar = 'start: A B\n%import common (LETTER, DIGIT)\nA: LETTER\nB: DIGIT'
    pair = parse_constraint({"type": "grammar", "grammar": grammar})
    assert pair.is_satisfied_by("a1") and not pair.is_satisfied_by("1a")


def test_the_error_names_the_request_field_the_constraint_came_from():
    with pytest.raises(ConstraintError, match="^guided_regex: invalid regex") as caught:
        check_constraint(build_constraint({"type": "regex", "pattern": "(a"}), LimitsConfig(), "guided_regex")
    assert caught.value.param == "guided_regex"


def test_named_constraints_in_a_config_pass_the_same_checks():
    with pytest.raises(ValueError, match="constraints.bad: .*max_group_depth"):
        ModelConfig(name="m", source="builtin:tiny-random-llama",
                    constraints={"bad": {"type": "regex", "pattern": "(" * 100 + ")" * 100}})


# -- regex time limits cover every regex jsonschema runs ---------------------------------------


@pytest.mark.parametrize("schema,expected", [
    ({"patternProperties": {"^(a+)+$": {"type": "integer"}}}, True),  # the key does not match: no rule applies
    ({"patternProperties": {"^(a+)+$": {}}, "additionalProperties": {"type": "integer"}}, False),
    ({"patternProperties": {"^(a+)+$": {}}, "additionalProperties": False}, False),
])
def test_a_backtracking_key_pattern_is_decided_within_its_time_limit(schema, expected):
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    key = "a" * 40 + "!"  # plain `re` would take about 2**40 steps on this key
    started = time.perf_counter()
    valid = constraint.is_satisfied_by(f'{{"{key}": "x"}}')
    assert time.perf_counter() - started < 5.0
    assert valid is expected


def test_a_key_pattern_not_decided_in_time_never_makes_output_valid(monkeypatch):
    import serve_app.constraints.validation as checking

    constraint = parse_constraint({"type": "json_schema", "schema": {"patternProperties": {"^k": {}}}})
    monkeypatch.setattr(checking, "regex_search", lambda *args: None)  # every match times out
    assert constraint.is_satisfied_by('{"k": 1}') is False


def test_key_patterns_still_validate_what_they_should():
    constraint = parse_constraint({"type": "json_schema", "schema": {
        "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False}})
    assert constraint.is_satisfied_by('{"x_a": 1}')
    assert not constraint.is_satisfied_by('{"x_a": "s"}')
    assert not constraint.is_satisfied_by('{"y": 1}')


# -- the guard -----------------------------------------------------------------------------------


def test_api_keys_are_stripped_and_a_blank_env_var_refuses_to_start():
    server = ServerConfig()
    assert api_keys(server, {"SERVE_APP_API_KEYS": " k1 , k2,,"}) == [b"k1", b"k2"]
    assert api_keys(server, {"SERVE_APP_API_KEYS": ""}) == []
    for blank in (" ", ",", " , \t"):
        with pytest.raises(ConfigError, match="holds no API key"):
            api_keys(server, {"SERVE_APP_API_KEYS": blank})


def test_a_non_ascii_token_is_compared_as_bytes_and_refused():
    guard = Guard(ServerConfig(api_keys=["sk-ключ"]))
    guard.check_headers("/v1/generate", {b"authorization": "Bearer sk-ключ".encode()})
    with pytest.raises(Exception, match="invalid API key"):
        guard.check_headers("/v1/generate", {b"authorization": "Bearer €uro".encode()})


def test_a_body_is_read_only_when_declared_json_and_keys_are_checked_first():
    from serve_app.errors import UnauthorizedError, UnsupportedMediaTypeError

    guard = Guard(ServerConfig(api_keys=["k"]))
    key = {b"authorization": b"Bearer k"}
    for declared in (b"application/json", b"application/json; charset=utf-8", b" APPLICATION/JSON "):
        guard.check_headers("/v1/generate", {**key, b"content-type": declared}, "POST")
    for declared in (b"text/plain", b"application/jsonx", b"application/x-www-form-urlencoded", b""):
        with pytest.raises(UnsupportedMediaTypeError, match="Content-Type: application/json"):
            guard.check_headers("/v1/generate", {**key, b"content-type": declared}, "POST")
    with pytest.raises(UnsupportedMediaTypeError):
        guard.check_headers("/v1/generate", key, "POST")
    guard.check_headers("/v1/models", key, "GET")  # no body: no type needed
    with pytest.raises(UnauthorizedError):  # a 401 before anything about the body
        guard.check_headers("/v1/generate", {b"content-type": b"text/plain"}, "POST")


# -- compile timeouts ----------------------------------------------------------------------------


def test_a_compile_timeout_is_not_cached_and_a_retry_gets_the_background_result(tiny_config, monkeypatch):
    from serve_app.engine.factory import create_engine

    engine = create_engine(tiny_config.model_copy(update={"limits": tiny_config.limits.model_copy(
        update={"compile_timeout_s": 0.5})}))
    release, calls = threading.Event(), []
    llguidance = engine.compiler.backend("llguidance")
    original = llguidance.compile

    def slow(constraint, timeout_s):  # a compile that outlives the caller's timeout, then succeeds
        calls.append("llguidance")
        assert release.wait(30)
        return original(constraint, timeout_s)

    monkeypatch.setattr(llguidance, "compile", slow)
    constraint = parse_constraint({"type": "regex", "pattern": "slow[0-9]{3}"})
    try:
        with pytest.raises(LimitExceededError, match="compile_timeout_s"):
            engine.compile(constraint)
        assert not engine.failures  # a timeout says nothing permanent about the constraint
        release.set()
        compiled = engine.compile(constraint)
        assert compiled.backend == "llguidance" and calls == ["llguidance"]  # the same compile, reused
    finally:
        release.set()
        engine.close()


def test_slow_compiles_that_time_out_do_not_starve_the_others(tiny_config, monkeypatch):
    """8 compiles that never finish in time and 8 normal ones, all at once, on 4 compile slots."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.engine.factory import create_engine

    engine = create_engine(tiny_config.model_copy(update={"limits": tiny_config.limits.model_copy(
        update={"compile_timeout_s": 1.0})}))
    release = threading.Event()
    llguidance = engine.compiler.backend("llguidance")
    original = llguidance.compile

    def maybe_slow(constraint, timeout_s):
        if "slow" in constraint.pattern:
            assert release.wait(60)
        return original(constraint, timeout_s)

    monkeypatch.setattr(llguidance, "compile", maybe_slow)
    slow = [parse_constraint({"type": "regex", "pattern": f"slow{i}[0-9]{{3}}"}) for i in range(8)]
    normal = [parse_constraint({"type": "regex", "pattern": f"fine{i}[a-z]{{2}}"}) for i in range(8)]

    def outcome(constraint):
        try:
            return engine.compile(constraint).backend
        except LimitExceededError as error:
            return error.code

    try:
        with ThreadPoolExecutor(16) as pool:
            slow_done = [pool.submit(outcome, c) for c in slow]
            normal_done = [pool.submit(outcome, c) for c in normal]
            assert [f.result() for f in normal_done] == ["llguidance"] * 8
            assert {f.result() for f in slow_done} == {"compile_timeout_s"}
        release.set()
        assert engine.compile(slow[0]).backend == "llguidance"  # the background result
    finally:
        release.set()
        engine.close()


# -- the replica submits only after its compile, in the caller's coroutine -----------------------


class _SlowPrepareEngine:
    """Stands in for Engine in this one test: prepare blocks until released."""

    def __init__(self) -> None:
        self.entered, self.release, self.submitted = threading.Event(), threading.Event(), []

    def prepare(self, request):
        self.entered.set()
        assert self.release.wait(30)
        return ("row", None)

    def submit_prepared(self, prepared, notify, deltas=True):
        self.submitted.append(prepared)
        raise AssertionError("nothing may be submitted for a caller that is gone")

    def close(self) -> None:
        pass


def test_a_caller_gone_during_the_compile_leaves_nothing_in_the_decode_loop():
    from serve_app.replica import ModelReplica

    replica = object.__new__(ModelReplica)
    replica.engine, replica._preparing = _SlowPrepareEngine(), 0
    request = GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=4)).model_dump()

    async def scenario() -> None:
        stream = replica.generate_stream([request])
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(replica.engine.entered.wait, 30)
        task.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        replica.engine.release.set()
        await asyncio.sleep(0.2)  # let the worker thread finish its prepare

    asyncio.run(scenario())
    assert replica.engine.submitted == [] and replica._preparing == 0


# -- the decode loop: one row's failure is that row's alone; close() stops the thread ------------


def test_a_row_that_fails_in_the_decode_loop_does_not_take_the_batch_down(tiny_engine):
    constraint = parse_constraint({"type": "regex", "pattern": "[a-z]{20}"})
    sampling = SamplingParams(max_new_tokens=24, temperature=0)
    healthy = tiny_engine.submit(GenerationRequest(prompt="healthy", constraint=constraint, sampling=sampling))
    broken = tiny_engine.submit(GenerationRequest(prompt="broken", constraint=constraint, sampling=sampling))

    def explode(token):
        raise RuntimeError("a backend bug")

    broken.stream.row.matcher.advance = explode
    with pytest.raises(RuntimeError, match="a backend bug"):
        broken.stream.result(timeout=60)
    out = healthy.stream.result(timeout=60)
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) > 0


def test_engine_close_stops_the_decode_thread_and_the_process_exits_cleanly(tiny_model_dir):
    script = f"""
from serve_app.config import ModelConfig
from serve_app.engine.factory import create_engine
from serve_app.generation import GenerationRequest, SamplingParams
with create_engine(ModelConfig(name="t", source={tiny_model_dir!r})) as engine:
    engine.generate([GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=4))])
print("closed", engine.loop._thread.is_alive())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "closed False" in done.stdout
    assert "terminate called" not in done.stderr


def test_a_closed_engine_fails_new_rows_with_a_503(tiny_config):
    from serve_app.engine.factory import create_engine
    from serve_app.errors import OverloadedError

    engine = create_engine(tiny_config)
    engine.close()
    submission = engine.submit(GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=4)))
    with pytest.raises(OverloadedError, match="shutting down"):
        submission.stream.result(timeout=10)


# -- the CLI -------------------------------------------------------------------------------------


class _KeyedReplicas(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.headers.get("Authorization") == "Bearer sk-status"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"replicas": [{"replica_id": "r1"}]}' if ok else b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_status_sends_the_api_key_and_says_when_one_is_needed(monkeypatch):
    from serve_app.ops.dashboard import app_replicas

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeyedReplicas)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        details = {"http_options": {"host": "127.0.0.1", "port": server.server_address[1]}}
        app = {"route_prefix": "/"}
        assert "pass --api-key or set SERVE_APP_API_KEYS" in app_replicas(details, "", app)
        assert app_replicas(details, "", app, "sk-status") == [{"replica_id": "r1"}]
    finally:
        server.shutdown()


def test_submit_never_uploads_secrets_even_without_a_gitignore(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    from serve_app.ops.jobs import UPLOAD_EXCLUDES

    files = ["app.yaml", "cluster/job_entrypoint.py", ".env", ".env.production", "conf/.env", "tls/server.pem",
             "id_rsa", "deploy.key", "gcp-credentials.json", ".aws/credentials", "notes.txt"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    archive = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), UPLOAD_EXCLUDES, str(archive), include_gitignore=True)
    uploaded = set(zipfile.ZipFile(archive).namelist())
    assert {"app.yaml", "cluster/job_entrypoint.py", "notes.txt"} <= uploaded
    leaked = uploaded & {".env", ".env.production", "conf/.env", "tls/server.pem", "id_rsa", "deploy.key",
                         "gcp-credentials.json", ".aws/credentials"}
    assert not leaked
