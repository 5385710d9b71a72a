"""Free text before the constraint (engine/prelude.py): a reasoning section, and under tool_choice
"auto" the text before a call. The scripted tests feed chosen tokens through the engine's real
policies and tokenizer (what the decode loop does after sampling); the others run the decode loop."""

from __future__ import annotations

import json

import pytest
import torch

from serve_app.api.request_models import ChatCompletionRequest
from serve_app.api.responses import chat_message
from serve_app.config import ModelConfig
from serve_app.constraints import parse_constraint
from serve_app.engine.factory import create_engine
from serve_app.engine.policies import TokenStep, advance_row
from serve_app.engine.prelude import FirstToken, free_first_tokens
from serve_app.engine.requests import Submission
from serve_app.engine.stream import Stream
from serve_app.errors import InvalidRequestError
from serve_app.generation import GenerationRequest, SamplingParams

PERSON = {"type": "json_schema", "schema": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def thinker():
    config = ModelConfig(name="thinker", source="builtin:tiny-thinking-llama", limits={"max_new_tokens": 128},
                         sampling={"temperature": 0})
    with create_engine(config) as engine:
        yield engine


@pytest.fixture(scope="module")
def marked(tiny_model_dir):
    """The plain tiny model told that its reasoning ends with `>>` (text, spelled in pieces)."""
    config = ModelConfig(name="marked", source=tiny_model_dir, limits={"max_new_tokens": 128},
                         sampling={"temperature": 0}, reasoning={"enabled": True, "start": "<<", "end": ">>"})
    with create_engine(config) as engine:
        yield engine


def drive(engine, request: GenerationRequest, tokens: list[int]):
    """Feed `tokens` as if sampled; the result and the stream's events."""
    prepared = engine.prepare(request)
    stream = Stream(prepared.row)
    verdict = None
    for token in tokens:
        verdict = advance_row(TokenStep(stream, token), engine.loop.policies, engine._decode)
        if verdict is not None:
            break
    stream.output.finish_reason = verdict or "length"
    stream.emit_text(final=True)
    events = []
    while not stream.events.empty():
        events.append(stream.events.get())
    return engine.result(Submission(prepared, stream), stream.output), events


def texts(events, kind: str) -> str:
    return "".join(value for k, value in events if k == kind)


def ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_the_constraint_applies_after_the_reasoning_section(thinker):
    end, eos = ids(thinker, "</think>"), sorted(thinker.eos_ids)[0]
    request = GenerationRequest(messages=USER, constraint=parse_constraint(PERSON))
    # Braces and quotes the schema would refuse are free inside the section.
    tokens = ids(thinker, 'Let me {"think') + end + ids(thinker, '{"name":"Ada","age":3}') + [eos]
    result, events = drive(thinker, request, tokens)
    assert result.reasoning == 'Let me {"think' and texts(events, "reasoning") == result.reasoning
    assert result.text == '{"name":"Ada","age":3}' == texts(events, "delta")
    assert result.finish_reason == "stop" and result.valid is True
    assert result.usage.completion_tokens == len(tokens) - 1  # every token but EOS
    assert result.usage.reasoning_tokens == len(ids(thinker, 'Let me {"think')) + len(end)
    assert result.usage.prompt_tokens == len(thinker.prompt_ids(request))


def test_after_the_section_the_grammar_refuses_what_it_always_refused(thinker):
    request = GenerationRequest(messages=USER, constraint=parse_constraint(PERSON))
    result, _ = drive(thinker, request, ids(thinker, "hm") + ids(thinker, "</think>") + ids(thinker, "hello"))
    assert result.reasoning == "hm" and result.finish_reason == "length" and result.valid is False


def test_an_end_marker_spelled_in_pieces_of_text_ends_the_section(marked):
    request = GenerationRequest(messages=USER, constraint=parse_constraint(PERSON))
    tokens = ids(marked, "<< ab>") + ids(marked, ">") + ids(marked, '{"name":"Bo","age":1}') + sorted(marked.eos_ids)
    result, events = drive(marked, request, tokens)
    assert result.reasoning == "ab" == texts(events, "reasoning")  # the start marker left out, `>` held back
    assert result.text == '{"name":"Bo","age":1}' and result.valid is True


def test_end_of_sequence_in_the_section_becomes_its_end_marker(thinker):
    eos, end = sorted(thinker.eos_ids)[0], ids(thinker, "</think>")
    request = GenerationRequest(messages=USER, constraint=parse_constraint(PERSON))
    result, _ = drive(thinker, request, ids(thinker, "ok") + [eos] + ids(thinker, '{"name":"A","age":2}') + [eos])
    assert result.reasoning == "ok" and result.usage.reasoning_tokens == len(ids(thinker, "ok")) + len(end)
    assert result.valid is True


def test_the_thinking_budget_forces_the_end_and_leaves_the_answer_room(thinker):
    for budget in (0, 5):
        [result] = thinker.generate([GenerationRequest(
            messages=USER, constraint=parse_constraint(PERSON),
            sampling=SamplingParams(max_new_tokens=40, max_reasoning_tokens=budget))])
        assert result.usage.reasoning_tokens <= budget + len(ids(thinker, "</think>"))
        assert result.finish_reason == "stop" and result.valid is True, result
    # No budget asked: as many as max_tokens leaves beside the answer's shortest output.
    [result] = thinker.generate([GenerationRequest(messages=USER, constraint=parse_constraint(PERSON),
                                                   sampling=SamplingParams(max_new_tokens=24))])
    assert result.valid is True and result.usage.completion_tokens <= 24 and result.reasoning is not None


def test_too_small_a_budget_for_the_marker_and_the_answer_is_a_400(thinker):
    with pytest.raises(InvalidRequestError, match="reasoning section") as raised:
        thinker.prepare(GenerationRequest(messages=USER, constraint=parse_constraint(PERSON),
                                          sampling=SamplingParams(max_new_tokens=10)))
    assert raised.value.param == "max_tokens"


def test_a_prompt_that_closed_the_section_has_none(thinker):
    [result] = thinker.generate([GenerationRequest(messages=USER, constraint=parse_constraint(PERSON),
                                                   chat_template_kwargs={"enable_thinking": False},
                                                   sampling=SamplingParams(max_new_tokens=40))])
    assert result.reasoning is None and result.usage.reasoning_tokens == 0 and result.valid is True


def test_without_a_constraint_the_section_is_split_off_and_never_forced(thinker):
    eos = sorted(thinker.eos_ids)[0]
    request = GenerationRequest(messages=USER)
    result, _ = drive(thinker, request, ids(thinker, "a b") + ids(thinker, "</think>") + ids(thinker, "hi") + [eos])
    assert (result.reasoning, result.text, result.valid) == ("a b", "hi", None)
    result, _ = drive(thinker, request, ids(thinker, "a b") + [eos])  # no budget, no constraint: EOS ends it
    assert (result.reasoning, result.text, result.finish_reason) == ("a b", "", "stop")


def test_prompts_without_messages_and_models_without_markers_have_no_section(thinker, tiny_engine):
    [result] = thinker.generate([GenerationRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=4))])
    assert result.reasoning is None
    assert not tiny_engine.preludes.reasons and thinker.preludes.reasons


def _auto(engine, **extra) -> GenerationRequest:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "tools": WEATHER, **extra})
    [row] = body.generation_requests()
    assert row.tool_call_auto and row.constraint is not None
    return row


def test_a_call_after_its_marker_is_generated_under_the_tools_schema(thinker):
    eos = sorted(thinker.eos_ids)[0]
    tokens = (ids(thinker, "</think>") + ids(thinker, "Sure.") + ids(thinker, "<tool_call>")
              + ids(thinker, '{"name":"get_weather","arguments":{"city":"Paris"}}') + [eos])
    result, events = drive(thinker, _auto(thinker), tokens)
    assert result.preamble == "Sure." == texts(events, "delta")  # the call itself is not streamed as text
    assert result.valid is True and result.finish_reason == "stop"
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "tools": WEATHER})
    message, reason, valid = chat_message(result, body)
    assert reason == "tool_calls" and message["content"] == "Sure." and message["reasoning_content"] == ""
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    # The same call with a bad argument cannot be written: the grammar stops it.
    bad = tokens[:-len(ids(thinker, '"Paris"}}')) - 1] + ids(thinker, '3}}') + [eos]
    result, _ = drive(thinker, _auto(thinker), bad)
    assert result.finish_reason == "length" and result.valid is False


def test_an_answer_that_never_starts_a_call_is_text_and_unchecked(thinker):
    eos = sorted(thinker.eos_ids)[0]
    result, _ = drive(thinker, _auto(thinker), ids(thinker, "</think>") + ids(thinker, '{"x": no}') + [eos])
    assert (result.preamble, result.text, result.valid) == (None, '{"x": no}', None)


def test_without_a_marker_the_first_token_decides(tiny_engine):
    prepared = tiny_engine.prepare(_auto(tiny_engine))
    matcher = prepared.row.matcher
    assert isinstance(matcher, FirstToken)
    bitmask = torch.zeros((1, matcher.width), dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    allowed = {t for t in range(len(tiny_engine.tokenizer)) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}
    opening = {t for t in allowed if tiny_engine.tokenizer.decode([t]).lstrip().startswith("{")}
    assert opening and all(matcher.is_call(t) for t in opening)
    assert len(allowed) > len(opening) + 100  # text is free too
    eos = sorted(tiny_engine.eos_ids)[0]
    call = '{"name":"get_weather","arguments":{"city":"Oslo"}}'
    result, events = drive(tiny_engine, _auto(tiny_engine), ids(tiny_engine, call) + [eos])
    assert (result.preamble, result.text, result.valid) == ("", call, True) and not texts(events, "delta")
    result, _ = drive(tiny_engine, _auto(tiny_engine), ids(tiny_engine, "no {call}") + [eos])
    assert (result.preamble, result.valid) == (None, None)


def test_the_free_first_tokens_are_those_that_cannot_open_an_object():
    mask = free_first_tokens(["{", ' {"', " ", "a", "", "x{"], {4}, 1)
    assert [bool((int(mask[0]) >> t) & 1) for t in range(6)] == [False, False, False, True, True, True]


def test_tool_choice_auto_generated_by_the_loop_is_a_valid_call_or_unchecked_text(tiny_engine):
    for seed in range(4):
        [result] = tiny_engine.generate([_auto(tiny_engine, temperature=1.0, seed=seed, max_tokens=48)])
        assert (result.preamble is None and result.valid is None) or result.valid is not False


def test_inside_vllms_sampler_the_section_is_split_off_and_the_answer_constrained(thinker):
    from serve_app.engine.vllm_steering import new_steering
    from tests.unit.test_vllm_steering import run_like_vllm

    request = GenerationRequest(messages=USER, constraint=parse_constraint(PERSON),
                                sampling=SamplingParams(max_new_tokens=40, max_reasoning_tokens=6, temperature=1.0,
                                                        seed=3))
    prepared = thinker.prepare(request)
    stream, eos = Stream(prepared.row), min(thinker.eos_ids)
    steering = new_steering(stream, thinker._decode, thinker.eos_ids, thinker.compiler.vocab_size, eos)
    run_like_vllm(thinker, stream, steering, eos)
    assert steering.error is None and steering.verdict == "stop"
    stream.output.finish_reason = steering.verdict
    result = thinker.result(Submission(prepared, stream), stream.output)
    assert result.valid is True and result.reasoning is not None and 1 <= result.usage.reasoning_tokens <= 7


def test_logit_bias_steers_the_first_token_and_never_allows_what_the_constraint_forbids(tiny_engine):
    [opening] = ids(tiny_engine, '{"')
    call = _auto(tiny_engine, max_tokens=48, logit_bias={str(opening): 100})
    [result] = tiny_engine.generate([call])
    assert result.preamble == "" and result.valid is True and result.finish_reason == "stop"
    assert json.loads(result.text)["name"] == "get_weather"
    [result] = tiny_engine.generate([_auto(tiny_engine, max_tokens=16, logit_bias={str(opening): -100})])
    assert result.preamble is None and result.valid is None
    choice = parse_constraint({"type": "choice", "choices": ["yes", "no"]})
    [result] = tiny_engine.generate([GenerationRequest(prompt="Is it?", constraint=choice, sampling=SamplingParams(
        max_new_tokens=4, logit_bias={str(opening): 100}))])
    assert result.text in ("yes", "no") and result.valid is True


def test_a_logit_bias_for_a_token_the_model_lacks_is_a_400(tiny_engine):
    with pytest.raises(InvalidRequestError, match="not in the model's vocabulary") as raised:
        tiny_engine.prepare(GenerationRequest(prompt="hi", sampling=SamplingParams(logit_bias={"999999": 1})))
    assert raised.value.param == "logit_bias"


def test_the_loop_generates_a_call_after_the_models_marker(thinker):
    [marker] = ids(thinker, "<tool_call>")
    row = _auto(thinker, max_tokens=64, logit_bias={str(marker): 100}, max_reasoning_tokens=2)
    [result] = thinker.generate([row])
    assert result.reasoning is not None and result.usage.reasoning_tokens <= 3
    assert result.preamble == "" and result.valid is True and json.loads(result.text)["name"] == "get_weather"
