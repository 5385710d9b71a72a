"""The client libraries people use for structured output, unpatched, against the running app over
real HTTP: the openai SDK, instructor, langchain-openai and pydantic-ai. The tiny random model's
answers are gibberish; what is tested is that each library gets an answer it parses into the
caller's pydantic model (tool calls and schemas are enforced, so it always can)."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import instructor
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.integration.conftest import API_KEY

ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "Invent a user."}]


class Address(BaseModel):
    city: str
    zip_code: int


class User(BaseModel):
    name: str
    age: int
    home: Address


class Weather(BaseModel):
    city: str
    celsius: bool


@pytest.fixture(scope="module")
def base(serve_cluster):
    return f"{serve_cluster}/v1"


@pytest.fixture(scope="module")
def oa(base):
    return openai.OpenAI(base_url=base, api_key=API_KEY)


def test_openai_parse_with_a_pydantic_model(oa):
    completion = oa.chat.completions.parse(model="tiny", messages=USER, response_format=User)
    assert isinstance(completion.choices[0].message.parsed, User)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "User"}}])
def test_openai_tool_calls_are_valid_calls_of_the_offered_tools(oa, choice):
    tools = [openai.pydantic_function_tool(Weather), openai.pydantic_function_tool(User)]
    completion = oa.chat.completions.parse(model="tiny", messages=USER, tools=tools, tool_choice=choice)
    [answer] = completion.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    [call] = answer.message.tool_calls
    assert isinstance(call.function.parsed_arguments, Weather | User)
    if choice != "required":
        assert call.function.name == "User"


def test_openai_streams_a_tool_call_and_usage_last(oa):
    with oa.chat.completions.stream(model="tiny", messages=USER, tools=[openai.pydantic_function_tool(User)],
                                    tool_choice="required", stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, User)
    assert final.usage.completion_tokens > 0


def test_stream_usage_only_when_asked_and_then_in_a_chunk_without_choices(oa):
    kwargs = {"model": "tiny", "messages": USER, "max_tokens": 6, "stream": True}
    plain = list(oa.chat.completions.create(**kwargs))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    asked = list(oa.chat.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert [c.usage is not None for c in asked].count(True) == 1
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 6


def test_openai_logprobs_in_answers_and_streams(oa):
    kwargs = {"model": "tiny", "messages": USER, "max_tokens": 5, "logprobs": True, "top_logprobs": 3,
              "extra_body": {"guided_choice": ["alpha", "beta"]}}
    [answer] = oa.chat.completions.create(**kwargs).choices
    assert answer.message.content in ("alpha", "beta")
    assert "".join(t.token for t in answer.logprobs.content) == answer.message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) <= 3 for t in answer.logprobs.content)
    streamed = [t for c in oa.chat.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in answer.logprobs.content]
    legacy = oa.completions.create(model="tiny", prompt="Pick:", max_tokens=4, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens


def test_models_by_id_and_health(oa, serve_cluster):
    assert oa.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as raised:
        oa.models.retrieve("no-such-model")
    assert raised.value.body["code"] == "model_not_found"
    assert httpx.get(f"{serve_cluster}/health", timeout=30).json() == {"status": "ok"}


def test_history_with_content_parts_and_tool_results(oa):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a user."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "Weather", "arguments": '{"city": "Oslo", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"},
    ]
    answer = oa.chat.completions.parse(model="tiny", messages=messages, response_format=User,
                                       tools=[openai.pydantic_function_tool(Weather)], tool_choice="none")
    assert isinstance(answer.choices[0].message.parsed, User)
    with pytest.raises(openai.BadRequestError, match="image_url"):
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor(base, mode):
    client = instructor.from_openai(openai.OpenAI(base_url=base, api_key=API_KEY), mode=mode)
    user = client.chat.completions.create(model="tiny", response_model=User, messages=USER, max_retries=0)
    assert isinstance(user, User)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(base, method):
    llm = ChatOpenAI(model="tiny", base_url=base, api_key=API_KEY, temperature=0)
    assert isinstance(llm.with_structured_output(User, method=method).invoke("Invent a user."), User)


@pytest.mark.parametrize("output", [User, NativeOutput(User)], ids=["tool_output", "native_output"])
def test_pydantic_ai(base, output):
    model = OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=base, api_key=API_KEY))
    assert isinstance(Agent(model, output_type=output).run_sync("Invent a user.").output, User)


def test_a_tool_with_a_bad_schema_is_a_400_naming_the_tool(oa):
    tools = [openai.pydantic_function_tool(Weather),
             {"type": "function", "function": {"name": "bad", "parameters": {
                 "type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}]
    with pytest.raises(openai.BadRequestError) as raised:
        oa.chat.completions.create(model="tiny", messages=USER, tools=tools, tool_choice="required")
    assert raised.value.body["param"] == "tools.1.function.parameters"


@pytest.mark.parametrize(("model", "parameters"), [
    ("tiny", {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}),
    ("tiny-small", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40)}}),
], ids=["remote reference", "over max_schema_bytes"])
@pytest.mark.parametrize("choice", ["required", "auto"])  # "auto": a call is generated under the schema too
def test_a_tool_refused_by_keyword_or_size_names_the_tool_in_param_and_message(oa, model, parameters, choice):
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "bad", "parameters": parameters}}]
    with pytest.raises(openai.BadRequestError) as raised:
        oa.chat.completions.create(model=model, messages=USER, tools=tools, tool_choice=choice)
    assert raised.value.body["param"] == "tools.1.function.parameters"
    assert raised.value.body["message"].startswith("tools.1.function.parameters: ")


def test_the_tool_calls_bench_gets_only_valid_calls(serve_cluster, tmp_path):
    """bench/tool_calls.py (3 real-world tools, tool_choice "required") against the app: every
    answer a call whose arguments validate, even from the tiny random model (closing finishes them)."""
    done = subprocess.run([sys.executable, "bench/tool_calls.py", "--url", serve_cluster, "--model", "tiny",
                           "--api-key", API_KEY, "--count", "6", "--clients", "3", "--max-tokens", "128",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "tool_calls.json").read_text())
    assert result["requests"] == result["tool_calls"] == result["valid"] == 6
    assert "| 6 | 6/6 | 6/6 |" in done.stdout


# -- the Responses API (POST /v1/responses) ------------------------------------------------------


def test_responses_create_with_a_json_schema_answers_valid_json(oa):
    schema = User.model_json_schema()
    response = oa.responses.create(model="tiny", input="Invent a user.", instructions="Answer in JSON.",
                                   text={"format": {"type": "json_schema", "name": "user", "schema": schema,
                                                    "strict": True}}, max_output_tokens=96)
    assert response.status == "completed" and response.output[0].type == "message"
    User.model_validate_json(response.output_text)
    assert response.usage.output_tokens > 0 and response.store is False


def test_responses_parse_with_a_pydantic_model(oa):
    response = oa.responses.parse(model="tiny", input=[{"role": "user", "content": "Invent a user."}],
                                  text_format=User, max_output_tokens=96)
    assert isinstance(response.output_parsed, User)


def test_responses_stream_sends_the_text_then_the_whole_response(oa):
    with oa.responses.stream(model="tiny", input="Invent a user.", text_format=User, max_output_tokens=96) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert isinstance(final.output_parsed, User)


def test_responses_function_tool_calls_are_valid_calls(oa):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
              "parameters": Weather.model_json_schema(), "strict": True}]
    response = oa.responses.create(model="tiny", input="Weather in Paris?", tools=tools, tool_choice="required",
                                   max_output_tokens=64)
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    Weather.model_validate_json(call.arguments)
    followed = oa.responses.create(model="tiny", max_output_tokens=8, tools=tools, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert followed.status in ("completed", "incomplete")
    with oa.responses.stream(model="tiny", input="Weather?", tools=tools, tool_choice="required",
                             max_output_tokens=64) as stream:
        kinds = [event.type for event in stream]
    assert "response.function_call_arguments.done" in kinds


@pytest.mark.parametrize("extra,param", [({"store": True}, "store"), ({"previous_response_id": "resp_1"},
                                                                      "previous_response_id"),
                                         ({"max_output_tokens": 100_000}, "max_output_tokens"),
                                         ({"include": ["message.output_text.logprobs"]}, "include.0")])
def test_responses_refusals_name_the_responses_field(oa, extra, param):
    with pytest.raises(openai.BadRequestError) as raised:
        oa.responses.create(model="tiny", input="hi", **extra)
    assert raised.value.body["param"] == param


# -- reasoning models and tool_choice "auto" ---------------------------------------------------


def test_a_reasoning_models_answer_is_constrained_after_its_section(oa):
    completion = oa.chat.completions.parse(model="thinker", messages=USER, response_format=User, max_tokens=96,
                                           temperature=1.0, seed=0, extra_body={"max_reasoning_tokens": 8})
    [choice] = completion.choices
    assert isinstance(choice.message.parsed, User)
    assert choice.message.model_extra["reasoning_content"]  # the tiny model's gibberish, sampled
    assert 1 <= completion.usage.completion_tokens_details.reasoning_tokens <= 9


def test_a_reasoning_stream_sends_the_section_then_the_answer(oa):
    chunks = list(oa.chat.completions.create(model="thinker", messages=USER, stream=True, max_tokens=96,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "user", "schema": User.model_json_schema()}},
                                             temperature=1.0, seed=0, extra_body={"max_reasoning_tokens": 8}))
    kinds = [("reasoning" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "content")
             for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].delta.model_extra)]
    assert "reasoning" in kinds and kinds.index("content") > kinds.index("reasoning")
    assert "reasoning" not in kinds[kinds.index("content"):]
    User.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_the_native_route_streams_reasoning_events_then_the_answer(client):
    body = {"model": "thinker", "messages": USER, "max_tokens": 64, "temperature": 1.0, "seed": 0,
            "max_reasoning_tokens": 8, "stream": True,
            "constraint": {"type": "json_schema", "schema": Weather.model_json_schema()}}
    with client.stream("POST", "/v1/generate", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    kinds = [next(iter(event)) for event in events]
    assert kinds[0] == "reasoning" and kinds[-1] == "done" and "reasoning" not in kinds[kinds.index("delta"):]
    done = events[-1]["done"]
    assert done["reasoning"] == "".join(e["reasoning"] for e in events if "reasoning" in e)
    assert done["valid"] is True and done["text"] == "".join(e["delta"] for e in events if "delta" in e)


def test_a_prompt_that_turns_thinking_off_has_no_section(oa):
    completion = oa.chat.completions.create(model="thinker", messages=USER, max_tokens=96,
                                            response_format={"type": "json_object"},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert "reasoning_content" not in (completion.choices[0].message.model_extra or {})
    json.loads(completion.choices[0].message.content)


def test_responses_from_a_reasoning_model_carry_a_reasoning_item(oa):
    response = oa.responses.parse(model="thinker", input="Invent a user.", text_format=User, max_output_tokens=96,
                                  temperature=1.0, extra_body={"max_reasoning_tokens": 8, "seed": 0})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert isinstance(response.output_parsed, User) and response.usage.output_tokens_details.reasoning_tokens > 0
    with oa.responses.stream(model="thinker", input="Invent a user.", text_format=User, max_output_tokens=96,
                             temperature=1.0, extra_body={"max_reasoning_tokens": 8, "seed": 0}) as stream:
        kinds = [event.type for event in stream]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.done")


@pytest.fixture(scope="module")
def opening(tiny_model_dir):
    """The tiny tokenizer's `{"`: biased up, the model opens its answer with a call."""
    from transformers import AutoTokenizer

    [token] = AutoTokenizer.from_pretrained(tiny_model_dir).encode('{"', add_special_tokens=False)
    return {str(token): 100}


def test_under_tool_choice_auto_a_started_call_is_generated_under_the_schema(oa, opening):
    tools = [openai.pydantic_function_tool(Weather)]
    completion = oa.chat.completions.create(model="tiny", messages=USER, tools=tools, max_tokens=64,
                                            logit_bias=opening)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.model_extra["valid"] is True
    Weather.model_validate_json(choice.message.tool_calls[0].function.arguments)
    with oa.chat.completions.stream(model="tiny", messages=USER, tools=tools, max_tokens=64,
                                    logit_bias=opening) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)
    plain = oa.chat.completions.create(model="tiny", messages=USER, tools=tools, max_tokens=16,
                                       logit_bias={token: -100 for token in opening})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].model_extra["valid"] is None


def test_responses_under_tool_choice_auto_answer_a_valid_function_call(oa, opening):
    tools = [{"type": "function", "name": "get_weather", "parameters": Weather.model_json_schema(), "strict": True}]
    response = oa.responses.create(model="tiny", input="Weather in Paris?", tools=tools, max_output_tokens=64,
                                   extra_body={"logit_bias": opening})
    [call] = response.output
    assert call.type == "function_call" and response.model_extra["valid"] is True
    Weather.model_validate_json(call.arguments)


def test_an_openai_agents_agent_on_the_responses_api(base, opening):
    """openai-agents (its Responses model pointed at the app): a structured final output, and a
    function tool the agent calls under tool_choice "auto"."""
    import agents

    agents.set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    model = agents.OpenAIResponsesModel("tiny", openai.AsyncOpenAI(base_url=base, api_key=API_KEY))
    settings = agents.ModelSettings(max_tokens=96)
    writer = agents.Agent(name="writer", instructions="Invent a user.", model=model, output_type=User,
                          model_settings=settings)
    assert isinstance(agents.Runner.run_sync(writer, "Invent a user.").final_output, User)
    asked = []

    @agents.function_tool
    def get_weather(city: str, celsius: bool) -> str:
        asked.append(city)
        return "sunny"

    forecaster = agents.Agent(name="forecaster", model=model, tools=[get_weather],
                              tool_use_behavior="stop_on_first_tool",
                              model_settings=agents.ModelSettings(max_tokens=64, extra_body={"logit_bias": opening}))
    assert agents.Runner.run_sync(forecaster, "Weather in Paris?").final_output == "sunny" and len(asked) == 1
