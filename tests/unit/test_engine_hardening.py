"""Out-of-memory handling (through the decode loop's test-only injection point), the compile
cache's byte bound under a stream of distinct schemas, and the schema complexity limits."""

import pytest
import torch

from serve_app.config import LimitsConfig
from serve_app.constraints import check_limits, parse_constraint
from serve_app.constraints.keywords import schema_size
from serve_app.engine.factory import create_engine
from serve_app.engine.transformers_engine import TransformersEngine
from serve_app.errors import ConstraintError, LimitExceededError, OverloadedError
from serve_app.generation import GenerationRequest, SamplingParams

CONSTRAINTS = [
    {"type": "json_schema", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
    {"type": "regex", "pattern": "[0-9]{3}-[a-z]{2}"},
    {"type": "choice", "choices": ["red", "green", "blue"]},
    {"type": "grammar", "grammar": 'start: NUM "+" NUM\nNUM: /[0-9]{1,3}/'},
]


def requests(count=8):
    return [GenerationRequest(prompt=f"case {i}", constraint=parse_constraint(CONSTRAINTS[i % 4]),
                              sampling=SamplingParams(max_new_tokens=48, temperature=0)) for i in range(count)]


@pytest.fixture
def fresh_engine(tiny_config):
    return create_engine(tiny_config)


def simulated_oom(when):
    def inject(batch_size):
        if when(batch_size):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return inject


def test_oom_splits_the_batch_and_every_request_still_completes(fresh_engine, tiny_engine):
    expected = [r.text for r in tiny_engine.generate(requests())]
    sizes = []
    fresh_engine.loop.fault_injector = lambda n: (sizes.append(n), simulated_oom(lambda m: m > 2)(n))
    results = fresh_engine.generate(requests())
    assert [r.text for r in results] == expected  # resumed rows continue exactly where they were
    assert all(r.valid for r in results if r.finish_reason == "stop")
    assert fresh_engine.loop.oom_events["split"] >= 2
    assert sizes[:2] == [8, 4]  # the first prefill and the half retried next both ran out of memory
    assert max(sizes[2:]) <= 2  # after that the loop holds batches to what fitted
    assert fresh_engine.status().model_dump()["fell_back_to_cpu"] is False


def test_oom_that_persists_for_one_row_moves_the_model_to_cpu(fresh_engine):
    # Pretend the replica was placed on a GPU: what is under test is the fallback path.
    fresh_engine.loaded.plan = fresh_engine.loaded.plan.model_copy(update={"device": "cuda", "gpu_ids": ["0"]})
    fresh_engine.loop.fault_injector = simulated_oom(lambda n: fresh_engine.loaded.plan.device == "cuda")
    results = fresh_engine.generate(requests(4))
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert all(r.valid for r in results if r.finish_reason == "stop")
    assert fresh_engine.loop.oom_events["split"] >= 1
    assert fresh_engine.loop.oom_events["cpu_fallback"] == 1
    status = fresh_engine.status().model_dump()
    assert status["fell_back_to_cpu"] is True
    assert status["fallback_reason"] == "out of memory during generation"
    assert status["gpu_plan"]["device"] == "cuda" and status["plan"]["device"] == "cpu"
    assert status["out_of_memory"]["cpu_fallback"] == 1


def test_oom_without_cpu_fallback_is_a_clear_503(tiny_config):
    config = tiny_config.model_copy(update={"placement": tiny_config.placement.model_copy(
        update={"cpu_fallback": False})})
    engine = create_engine(config)
    engine.loaded.plan = engine.loaded.plan.model_copy(update={"device": "cuda"})
    engine.loop.fault_injector = simulated_oom(lambda n: True)
    with pytest.raises(OverloadedError, match="out of memory") as error:
        engine.generate(requests(1))
    assert error.value.status_code == 503
    engine.loop.fault_injector = None
    assert engine.generate(requests(1))[0].finish_reason in ("stop", "length")  # the loop lives on


def test_compile_cache_stays_within_its_byte_bound_over_10000_distinct_schemas(tiny_config):
    config = tiny_config.model_copy(update={"compile_cache": tiny_config.compile_cache.model_copy(
        update={"max_entries": 100_000, "max_bytes": 2 * 1024 * 1024})})
    engine = TransformersEngine(config, create_engine(tiny_config).loaded)
    peak = 0
    for i in range(10_000):
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "integer"}}}
        engine.compile(parse_constraint({"type": "json_schema", "schema": schema}))
        peak = max(peak, engine.cache.stats.bytes)
    stats = engine.cache.stats
    assert stats.misses == 10_000
    assert peak <= 2 * 1024 * 1024
    assert stats.evictions >= 10_000 - stats.entries
    print(f"10,000 schemas: {stats.entries} cached, peak {peak} bytes, {stats.build_seconds:.1f} s compiling")


def test_schema_size_counts_refs_once_per_recursion_and_caps_bombs():
    recursive = {"type": "object", "properties": {"child": {"$ref": "#"}}}
    assert schema_size(recursive, 100) == (4, 4)  # the root, its child, and one expansion of "#"
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(40)}
    defs["d40"] = {"type": "string"}
    _, nodes = schema_size({"$defs": defs, "$ref": "#/$defs/d0"}, 1000)
    assert nodes == 1001  # stopped just past the cap instead of walking 2**40 nodes
    with pytest.raises(ConstraintError, match="unresolvable"):
        schema_size({"$ref": "#/nope"}, 10)


def test_limits_reject_deep_and_exploding_schemas():
    limits = LimitsConfig(max_schema_depth=5, max_ref_expansion=50)
    deep = {"type": "string"}
    for _ in range(6):
        deep = {"type": "array", "items": deep}
    with pytest.raises(LimitExceededError, match="max_schema_depth"):
        check_limits(parse_constraint({"type": "json_schema", "schema": deep}), limits)


def test_regex_check_times_out_instead_of_hanging():
    catastrophic = parse_constraint({"type": "regex", "pattern": "(a+)+$"})
    assert catastrophic.is_satisfied_by("a" * 40 + "!") in (False, None)


def test_a_stuck_decode_loop_fails_the_health_check_and_recovers_when_it_moves(tiny_config):
    import threading
    import time

    config = tiny_config.model_copy(update={"health": tiny_config.health.model_copy(update={"stuck_after_s": 0.5})})
    engine = create_engine(config)
    entered, release = threading.Event(), threading.Event()

    def freeze(batch_size):
        entered.set()
        release.wait(60)

    try:
        engine.check_health()  # idle: healthy however long ago the last step was
        engine.loop.fault_injector = freeze
        stream = engine.submit(GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=4)))
        assert entered.wait(30)
        deadline = time.monotonic() + 30
        while engine.loop.stalled_for() <= 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="decode loop is stuck: 0 rows waiting and 1 running"):
            engine.check_health()
        engine.loop.fault_injector = None
        release.set()
        assert stream.stream.result(30).finish_reason == "length"
        engine.check_health()
    finally:
        release.set()
        engine.close()


def test_definitions_that_reach_each_other_count_once_each_and_a_bomb_still_hits_the_cap():
    from serve_app.constraints.keywords import recursive_refs

    mutual = {"$defs": {f"n{i}": {"type": "object", "properties": {
        f"to{j}": {"$ref": f"#/$defs/n{(i + j + 1) % 12}"} for j in range(3)}} for i in range(12)},
        "$ref": "#/$defs/n0"}
    assert recursive_refs(mutual) == {f"#/$defs/n{i}" for i in range(12)}
    _, nodes = schema_size(mutual, 10_000)
    assert nodes < 100  # 3**12 paths when every path is inlined
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(40)}
    defs["d40"] = {"type": "string"}
    bomb = {"$defs": defs, "$ref": "#/$defs/d0"}
    assert recursive_refs(bomb) == frozenset()  # no cycle: all of it must be inlined
    assert schema_size(bomb, 1000)[1] == 1001


def test_looking_for_recursion_stops_at_its_visit_budget(monkeypatch):
    from serve_app.constraints import keywords

    mutual = {"$defs": {f"n{i}": {"type": "object", "properties": {
        f"to{j}": {"$ref": f"#/$defs/n{(i + j + 1) % 12}"} for j in range(3)}} for i in range(12)},
        "$ref": "#/$defs/n0"}
    assert len(keywords.recursive_refs(mutual)) == 12
    monkeypatch.setattr(keywords, "MAX_CYCLE_VISITS", 20)  # 12 targets of 4 subschemas each: past it
    assert keywords.recursive_refs(mutual) == frozenset()  # then every $ref counts as inlined
    assert keywords.schema_size(mutual, 1000)[1] == 1001
