"""The Anthropic Messages API (/v1/messages) through a real server and the official `anthropic`
client: plain, streamed, thinking, forced tool use and a tool-result round trip, errors."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from test_serve import API_KEY, Server

CTX = 4096
WEATHER = {"name": "get_weather", "description": "The weather in a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY = {"temperature": 0}  # the API's own field; this client version leaves it to extra_body


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_model):
    model = test_model(arch="qwen35moe", chat_template="qwen3.5")
    s = Server(tmp_path_factory.mktemp("messages"), model, "--ctx", str(CTX), "--api-key", API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


def test_thinking_and_text_whole_and_streamed(client):
    ask = dict(model="m", max_tokens=16, messages=ASK, system="Be brief.", extra_body=GREEDY,
               thinking={"type": "enabled", "budget_tokens": 5})
    whole = client.messages.create(**ask)
    assert whole.role == "assistant" and whole.stop_reason == "max_tokens"
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.usage.output_tokens == 16 and whole.usage.input_tokens > 0
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    # the same prompt again restarts from the checkpoint at its turn's start, and the stream says so
    prompt_tokens = whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == prompt_tokens
    assert 0 < streamed.usage.cache_read_input_tokens < prompt_tokens and streamed.usage.output_tokens == 16
    off = client.messages.create(model="m", max_tokens=6, messages=ASK, extra_body=GREEDY, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_forced_tool_use_and_the_result_back(client):
    ask = dict(model="m", max_tokens=300, messages=ASK, tools=[WEATHER], extra_body=GREEDY,
               tool_choice={"type": "tool", "name": "get_weather"}, thinking={"type": "enabled", "budget_tokens": 4})
    first = client.messages.create(**ask)
    assert first.stop_reason == "tool_use"
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Oslo") and isinstance(use.input["days"], int)
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    [streamed_use] = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed_use.input == use.input and streamed.stop_reason == "tool_use"

    history = ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]},
    ]
    ask = dict(model="m", messages=history, tools=[WEATHER], tool_choice={"type": "none"}, thinking={"type": "disabled"})
    final = client.messages.create(**ask, max_tokens=8, extra_body=GREEDY)
    assert final.stop_reason in ("end_turn", "max_tokens")
    prompt_tokens = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert prompt_tokens > first.usage.input_tokens
    assert client.messages.count_tokens(**ask).input_tokens == prompt_tokens


def test_errors_in_the_messages_form(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=8, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nope"})
    assert e.value.body["type"] == "error" and "nope" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=8, messages=ASK)
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": API_KEY}, json={"messages": ASK})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
