"""Our row policies as vLLM's logits processor (engine/vllm_steering.py), driven here by a stand-in
for vLLM's request loop over the tiny model's real logits: each step, the processor leaves one
token, the "request" appends it, and a row that takes tokens back is resubmitted from its context.
Real vLLM runs the same processor in tests/e2e/test_vllm_engine.py."""

import json
from types import SimpleNamespace

import jsonschema
import pytest
import torch

from serve_app.constraints import parse_constraint
from serve_app.engine.stream import Stream
from serve_app.engine.vllm_steering import ROW_KEY, SteeredRows, new_steering, steering_processor
from serve_app.generation import GenerationRequest, SamplingParams

UNIQUE = {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 3, "maxItems": 3, "uniqueItems": True}
STORY = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def steered(engine, schema, max_new_tokens=48, seed=0, temperature=1.0):
    constraint = parse_constraint({"type": "json_schema", "schema": schema})
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    request = GenerationRequest(prompt="Answer:", constraint=constraint, sampling=sampling)
    stream = Stream(engine.prepare(request).row)
    eos = min(engine.eos_ids)
    return stream, new_steering(stream, engine._decode, engine.eos_ids, engine.compiler.vocab_size, eos), eos


def logits_after(engine, ids):
    with torch.no_grad():
        return engine.model(torch.tensor([ids])).logits[0, -1].float()


def run_like_vllm(engine, stream, steering, eos, max_requests=80):
    """vLLM's side: a request per (re)submission, one forced token appended per step."""
    requests = 0
    while not stream.done.is_set() and requests < max_requests:
        requests += 1
        context, output_ids = stream.context_ids(), []
        budget = stream.row.max_new_tokens - len(stream.output.token_ids)
        while len(output_ids) < budget:
            logits = steering(output_ids, logits_after(engine, context + output_ids))
            [token] = torch.isfinite(logits).nonzero().flatten().tolist()
            output_ids.append(token)
            if token == eos or steering.ending:
                break
        if steering.resubmit:
            steering.restart()
            continue
        return requests
    return requests


@pytest.mark.parametrize("seed", range(4))
def test_a_steered_row_ends_valid_or_honest_and_its_checks_run_while_generating(tiny_engine, seed):
    stream, steering, eos = steered(tiny_engine, UNIQUE, seed=seed)
    run_like_vllm(tiny_engine, stream, steering, eos)
    assert steering.error is None and steering.verdict in ("stop", "length")
    checks = stream.row.checker.stats
    assert checks.evaluated > 0
    if steering.verdict == "stop":
        items = json.loads(stream.output.text)
        jsonschema.validate(items, UNIQUE)
    else:
        assert checks.exhausted or len(stream.output.token_ids) == stream.row.max_new_tokens


def test_a_row_whose_tokens_were_taken_back_is_resubmitted_and_goes_on(tiny_engine):
    resubmitted = []
    for seed in range(12):  # the tiny model repeats itself: some seed writes a duplicate item
        stream, steering, eos = steered(tiny_engine, UNIQUE, seed=seed)
        if run_like_vllm(tiny_engine, stream, steering, eos) > 1:
            resubmitted.append((stream, steering))
    assert resubmitted, "no row took a token back"
    for stream, steering in resubmitted:
        assert stream.row.checker.stats.rollbacks > 0
        if steering.verdict == "stop":
            jsonschema.validate(json.loads(stream.output.text), UNIQUE)


def test_a_small_budget_closes_the_json_validly(tiny_engine):
    stream, steering, eos = steered(tiny_engine, STORY, max_new_tokens=10)
    run_like_vllm(tiny_engine, stream, steering, eos)
    assert steering.verdict == "stop" and stream.output.closed_early
    jsonschema.validate(json.loads(stream.output.text), STORY)
    assert len(stream.output.token_ids) <= 10


def test_a_sample_vllm_discards_does_not_advance_the_row_and_a_lost_token_fails_it(tiny_engine):
    stream, steering, _ = steered(tiny_engine, STORY)
    logits = logits_after(tiny_engine, stream.context_ids())
    first = steering.steer(logits.clone(), kept=0)
    again = steering.steer(logits.clone(), kept=0)  # the same step's sample again (a discarded one)
    assert torch.equal(torch.isfinite(first), torch.isfinite(again))
    assert len(stream.output.token_ids) == 1
    steering.steer(logits.clone(), kept=3)  # vLLM's request holds tokens the row never gave it
    assert steering.error is not None and steering.ending


def test_the_v2_processor_steers_its_slots_by_position_and_leaves_other_rows(tiny_engine):
    pytest.importorskip("vllm")
    rows = SteeredRows()
    stream, steering, _ = steered(tiny_engine, STORY)
    rows.add("r0", steering)
    processor = steering_processor(rows, v2=True)(None, None)
    assert processor.add_request(3, SimpleNamespace(extra_args={ROW_KEY: "r0"})) is True
    assert processor.add_request(5, SimpleNamespace(extra_args=None)) is False
    logits = torch.stack([logits_after(tiny_engine, stream.context_ids())] * 2)
    plain = logits[1].clone()
    prompt = len(stream.row.prompt_ids)
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([3, 5]), pos=torch.tensor([prompt - 1, 7]))
    processor.apply(logits, ctx)
    assert int(torch.isfinite(logits[0]).sum()) == 1 and torch.equal(logits[1], plain)
    assert len(stream.output.token_ids) == 1
    assert processor.add_request(3, SimpleNamespace(extra_args={})) is False  # the slot recycled
    processor.apply(logits, ctx)
    assert len(stream.output.token_ids) == 1


def test_the_v1_processor_steers_its_rows_together_as_each_would_be_alone(tiny_engine):
    pytest.importorskip("vllm")
    from vllm.v1.sample.logits_processor import BatchUpdate

    schemas = [UNIQUE, STORY, UNIQUE]
    rows, batch, alone = SteeredRows(), [], []
    for i, schema in enumerate(schemas):
        stream, steering, eos = steered(tiny_engine, schema, seed=i)
        rows.add(f"r{i}", steering)
        batch.append((stream, steering))
        alone.append(steered(tiny_engine, schema, seed=i))
    processor = steering_processor(rows)(None, torch.device("cpu"), False)
    outputs = [[] for _ in schemas]
    added = [(i + 1, SimpleNamespace(extra_args={ROW_KEY: f"r{i}"}), None, outputs[i]) for i in range(3)]
    added.append((0, SimpleNamespace(extra_args=None), None, []))  # an unsteered row at index 0
    processor.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    for _ in range(6):
        logits = torch.stack([logits_after(tiny_engine, s.context_ids()) for s, _ in [batch[0]] + batch])
        plain = logits[0].clone()
        processor.apply(logits)
        assert torch.equal(logits[0], plain)
        for i in range(len(batch)):
            [token] = torch.isfinite(logits[i + 1]).nonzero().flatten().tolist()
            outputs[i].append(token)
            solo_stream, solo, _ = alone[i]
            solo.steer(logits_after(tiny_engine, solo_stream.context_ids()), len(solo_stream.output.token_ids))
    for (stream, _), (solo_stream, _, _) in zip(batch, alone, strict=True):
        assert stream.output.token_ids == solo_stream.output.token_ids and stream.output.token_ids
