"""Reading replies back: tool calls and reasoning parsed from what the model family's own chat
templates write for an assistant turn (rendered here with the server's template sandbox), fed
whole and one character at a time."""

from __future__ import annotations

import json

import pytest

from synthetic_models import chat_template_text
from rotary_gguf.api.reply import ReplyParser, thinking_open
from rotary_gguf.api.tools import parameter_types, template_tool_format
from rotary_gguf.chat_template import render_chat_template

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "object"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris <1>\nFrance", "days": 3, "units": {"t": "C"}}},
    {"name": "now", "arguments": {}},
]


def assistant_turn(template: str, *, content: str, reasoning: str, calls: list[dict]) -> str:
    """The text a template writes for an assistant turn after the last user message: what the
    model should have generated (after the template's own '<|im_start|>assistant\\n')."""
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": content, "reasoning_content": reasoning,
         "tool_calls": [{"type": "function", "function": c} for c in calls]},
    ]
    text = render_chat_template(chat_template_text(template), messages, tools=TOOLS)
    turn = text.split("<|im_start|>assistant\n")[1]
    return turn.split("<|im_end|>")[0]


def parse(text: str, fmt: str, *, thinking: bool, chunked: bool) -> tuple[str, str, list]:
    parser = ReplyParser(thinking=thinking, may_think=True, tool_format=fmt, types=parameter_types(TOOLS))
    deltas = [parser.feed(ch) for ch in text] if chunked else [parser.feed(text)]
    deltas.append(parser.finish())
    streamed = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), [c for d in deltas for c in d.calls])
    assert streamed == parser.message()
    return streamed


@pytest.mark.parametrize("template", ["qwen3.5", "qwen3"])
@pytest.mark.parametrize("chunked", [False, True])
def test_tool_calls_round_trip_through_the_templates(template, chunked):
    fmt = template_tool_format(chat_template_text(template))
    assert fmt == {"qwen3.5": "xml", "qwen3": "json"}[template]
    turn = assistant_turn(template, content="Let me look.", reasoning="They want weather.", calls=CALLS)
    assert turn.startswith("<think>\n")
    # Qwen3.5's generation prompt opens the think block itself; Qwen3's model writes <think>.
    text = turn[len("<think>\n"):] if template == "qwen3.5" else turn
    reasoning, content, calls = parse(text, fmt, thinking=template == "qwen3.5", chunked=chunked)
    assert reasoning == "They want weather." and content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(c["name"], c["arguments"]) for c in CALLS]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("template", ["qwen3.5", "qwen3"])
def test_a_badly_written_call_is_plain_content(template):
    fmt = template_tool_format(chat_template_text(template))
    good = assistant_turn(template, content="", reasoning="r", calls=CALLS[:1]).split("</think>")[1].lstrip()
    broken = {
        "xml": good.replace("</parameter>", "</param>", 1),
        "json": good.replace('"arguments"', '"arguments', 1),
    }[fmt]
    unknown = good.replace("get_weather", "launch_missiles")
    for text in (broken, unknown, "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"):  # the last: cut off
        reasoning, content, calls = parse(text, fmt, thinking=False, chunked=True)
        assert calls == [] and reasoning == "" and content == text


def test_reasoning_and_plain_text():
    assert thinking_open("<|im_start|>assistant\n<think>\n")
    assert not thinking_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # never-closed thinking stays reasoning (max_tokens ran out while thinking)
    assert parse("just thinking", None, thinking=True, chunked=True) == ("just thinking", "", [])
    # a model that may think but does not: its text is content, verbatim
    assert parse(" <thin but not", None, thinking=False, chunked=True) == ("", " <thin but not", [])
    # without tools a <tool_call> is text like any other
    assert parse("x <tool_call>y</tool_call>", None, thinking=False, chunked=True)[1] == "x <tool_call>y</tool_call>"
    plain = ReplyParser()  # a template that knows no thinking: everything verbatim
    assert plain.feed(" <think>a</think> ").content == " <think>a</think> "


@pytest.mark.parametrize("template", ["qwen3.5", "qwen3"])
def test_a_call_inside_an_unclosed_think_block_is_still_a_call(template):
    fmt = template_tool_format(chat_template_text(template))
    call = assistant_turn(template, content="", reasoning="r", calls=CALLS[:1]).split("</think>")[1].lstrip()
    reasoning, content, calls = parse("I should look it up.\n" + call, fmt, thinking=True, chunked=True)
    assert reasoning == "I should look it up." and content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(CALLS[0]["name"], CALLS[0]["arguments"])]
