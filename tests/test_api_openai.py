"""Tools, reasoning, structured output and log probabilities through a real `rotary-gguf serve`
process and the official `openai` client, on test models that carry the Qwen family's own chat
templates. Random weights only make valid structure where a grammar forces it, so replies are
checked for shape (parse, validate, equal across streaming and not), never for meaning."""

from __future__ import annotations

import json

import openai
import pytest

from test_serve import API_KEY, Server
from rotary_gguf.engine import Engine
from rotary_gguf.thinking import Thinking

CTX = 4096
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer"},
        "detailed": {"type": "boolean"},
    }, "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "local_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                                         "required": ["zone"]}}}
ASK = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
SERVER_BUDGET = 6  # serve --thinking-budget: for requests that set none


@pytest.fixture(scope="module", params=["qwen3.5", "qwen3"])
def template(request):
    return request.param


@pytest.fixture(scope="module")
def model(test_model, template):
    arch = "qwen35moe" if template == "qwen3.5" else "qwen3moe"
    return test_model(arch=arch, chat_template=template)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    s = Server(tmp_path_factory.mktemp("api"), model, "--ctx", str(CTX), "--api-key", API_KEY,
               "--thinking-budget", str(SERVER_BUDGET))
    yield s
    s.stop()


def check_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo", "Lima") and isinstance(arguments["days"], int)
    assert set(arguments) <= {"city", "days", "detailed"}
    assert isinstance(arguments.get("detailed", True), bool)
    return arguments


def test_required_tool_call_whole_and_streamed(server):
    client = server.client()
    ask = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
               temperature=0, max_tokens=300, extra_body={"thinking_budget": 4})
    reply = client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    arguments = check_weather_call(call)

    chunks = list(client.chat.completions.create(**ask, stream=True))
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
    assert {c.index for c in calls} == {0} and calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments for c in calls)) == arguments  # greedy: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_picks_among_the_tools(server):
    reply = server.client().chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        temperature=0.8, seed=3, max_tokens=300, extra_body=NO_THINKING)
    [call] = reply.choices[0].message.tool_calls
    if call.function.name == "get_weather":
        check_weather_call(call)
    else:
        assert call.function.name == "local_time"
        assert len(json.loads(call.function.arguments)["zone"]) <= 12


def test_agent_loop(server):
    """Call a tool (required), send its result back with the assistant's turn, get the answer."""
    client = server.client()
    first = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=300, extra_body={"thinking_budget": 6})
    turn = first.choices[0].message
    [call] = turn.tool_calls
    check_weather_call(call)
    history = ASK + [
        turn.model_dump(exclude_none=True),  # with its reasoning_content, given back
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high": 21})},
    ]
    final = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=24, extra_body={"thinking_budget": 4})
    answer = final.choices[0].message
    assert answer.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_thinking_budget_and_reasoning_stream(server, template):
    client = server.client()
    ask = dict(model="m", messages=ASK, temperature=0, max_tokens=20, extra_body={"thinking_budget": 5})
    reply = client.chat.completions.create(**ask)
    message = reply.choices[0].message
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed_reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed_content == message.content
    assert streamed_reasoning.strip() == (getattr(message, "reasoning_content", None) or "")
    if template == "qwen3.5":  # the template opens the think block: the budget closes it
        assert message.reasoning_content and "</think>" not in message.content
    for off in ({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}):
        reply = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=8, extra_body=off)
        assert getattr(reply.choices[0].message, "reasoning_content", None) is None


def test_the_servers_thinking_budget_applies_when_the_request_sets_none(server, template):
    reply = server.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40)
    usage, message = reply.usage, reply.choices[0].message
    if template == "qwen3.5":  # random weights never close the block themselves: the budget did
        assert message.reasoning_content and message.content and usage.completion_tokens == 40
    own = server.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40,
                                                  extra_body={"thinking_budget": SERVER_BUDGET + 10})
    if template == "qwen3.5":
        assert len(own.choices[0].message.reasoning_content) > len(message.reasoning_content)


def test_json_schema_reply_validates(server):
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confidence": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    }, "required": ["answer", "confidence", "tags"], "additionalProperties": False}
    reply = server.client().chat.completions.create(
        model="m", messages=ASK, temperature=0, max_tokens=200, extra_body={"thinking_budget": 3},
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"answer", "confidence", "tags"} and value["answer"] in ("yes", "no")
    assert isinstance(value["confidence"], int) and len(value["tags"]) <= 3 and all(isinstance(t, bool) for t in value["tags"])


def test_json_object_reply_is_json(server):
    reply = server.client().chat.completions.create(
        model="m", messages=ASK, temperature=0, max_tokens=12, extra_body=NO_THINKING,
        response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")


def test_logprobs(server):
    client = server.client()
    reply = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=6, logprobs=True,
                                           top_logprobs=3, extra_body=NO_THINKING)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    assert "".join(e.token for e in entries).encode("utf-8", "replace")  # every entry names its token
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy takes the likeliest token
    done = client.completions.create(model="m", prompt="The weather", temperature=0, max_tokens=5, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = client.completions.create(model="m", prompt="The weather", temperature=0, max_tokens=5, logprobs=2, stream=True)
    # equal up to float noise: the repeated prompt reuses the cached context (a different batch split)
    assert [t for c in streamed for t in c.choices[0].logprobs.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-3)


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1"}}]}]},
     "messages.2.tool_calls.0.function.arguments"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": ["x"]}}}]},
     "tools.0.function.parameters.properties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}},
     "response_format"),  # a grammar llama.cpp's parser refuses
    # nested 20000 deep, this crashed llama.cpp's grammar parser: refused before it sees it
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 20000}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"s": {"type": "string", "pattern": "a{1,99999}"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, "response_format"),
    ({"extra_body": {"thinking_budget": -1}}, "thinking_budget"),
    ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}}, "chat_template_kwargs"),
])
def test_bad_tool_and_format_requests_are_400(server, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 2, **body})
    assert e.value.body["param"] == param


def test_engine_thinking_budget_closes_the_block(test_model):
    with Engine.load(test_model(arch="qwen35moe", chat_template="qwen3.5"), n_ctx=512, n_threads=1) as engine:
        prompt = engine.chat_prompt(ASK)
        events = list(engine.generate(prompt, max_tokens=30, thinking=Thinking(open=True, budget=7)))
        text = "".join(e.text for e in events)
        close = engine.tokenize("\n</think>\n\n", add_special=False)
        assert [e.token for e in events[7 : 7 + len(close)]] == close  # after exactly 7 tokens of thinking
        assert text.count("</think>") == 1
