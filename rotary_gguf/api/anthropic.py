"""The Anthropic Messages API (/v1/messages): requests become the same chat plan as OpenAI ones
(content blocks to template messages, tools, tool_choice, thinking), and replies become messages
of thinking, text and tool_use blocks, whole or as the API's named stream events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from pydantic import Field

from ..engine import GenerationStats, SamplingParams
from . import openai as oai
from .reply import Delta, ReplyParser
from .tools import ToolCall

MAX_STOP_SEQUENCES = 4


# --- requests ----------------------------------------------------------------------------------------
class TextBlock(oai.ApiModel):
    type: Literal["text"]
    text: str


class ThinkingBlock(oai.ApiModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(oai.ApiModel):
    type: Literal["redacted_thinking"]


class ToolUseBlock(oai.ApiModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class ToolResultBlock(oai.ApiModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


Block = Annotated[TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
                  Field(discriminator="type")]


class Message(oai.ApiModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDefinition(oai.ApiModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    input_schema: dict


class ToolChoice(oai.ApiModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(oai.ApiModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class MessagesRequest(oai.ApiModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=2**31 - 1)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def stop_strings(self) -> list[str]:
        return list(self.stop_sequences or ())

    def logprob_count(self) -> None:
        return None

    def chat(self) -> tuple[list[oai.ChatMessage], oai.ChatOptions]:
        """The request as OpenAI chat messages and options (one plan for both APIs)."""
        messages = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            messages.append(oai.ChatMessage(role="system", content=text))
        for m in self.messages:
            messages.extend(_chat_messages(m))
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.input_schema}} for t in self.tools or ()]
        choice = self.tool_choice or ToolChoice(type="auto")
        options: dict = {"tools": tools or None, "parallel_tool_calls": not choice.disable_parallel_tool_use}
        if tools:
            options["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
                {"type": "function", "function": {"name": choice.name or ""}}
        if self.thinking is not None:
            options["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
            options["thinking_budget"] = self.thinking.budget_tokens if self.thinking.type == "enabled" else None
        return messages, oai.ChatOptions.model_validate(options)


class CountTokensRequest(MessagesRequest):
    """/v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int = Field(1, ge=1)


def _chat_messages(message: Message) -> list[oai.ChatMessage]:
    """One Anthropic message as chat messages: a user turn's tool results become tool messages."""
    if isinstance(message.content, str):
        return [oai.ChatMessage(role=message.role, content=message.content)]
    out, text, reasoning, calls = [], [], [], []
    for block in message.content:
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            result = block.content if isinstance(block.content, str) else "".join(b.text for b in block.content or ())
            out.append(oai.ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=result))
    if message.role == "assistant":
        out.append(oai.ChatMessage(role="assistant", content="".join(text), tool_calls=calls or None,
                                   reasoning_content="".join(reasoning) if reasoning else None))
    elif text or not out:
        out.append(oai.ChatMessage(role="user", content="".join(text)))
    return out


# --- replies -----------------------------------------------------------------------------------------
def usage(stats: GenerationStats) -> dict:
    return {
        "input_tokens": stats.prompt_tokens - stats.cached_prompt_tokens,
        "output_tokens": stats.completion_tokens,
        "cache_read_input_tokens": stats.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(stats: GenerationStats, calls: list[ToolCall]) -> str | None:
    if calls and stats.finish_reason == "stop":
        return "tool_use"
    return {"stop": "end_turn", "length": "max_tokens"}.get(stats.finish_reason or "", None)


def _tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name, "input": {}}


class MessageReply:
    """One reply of the Messages API: `whole` for a plain response, `start`/`events`/`end` for the
    stream's events (dicts whose "type" names the SSE event)."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self._open: str | None = None  # the type of the content block being streamed
        self._index = -1

    def _message(self, content: list[dict], stop: str | None, use: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_id, "content": content,
                "stop_reason": stop, "stop_sequence": None, "usage": use}

    def whole(self, reasoning: str, content: str, calls: list[ToolCall], stats: GenerationStats) -> dict:
        blocks: list[dict] = []
        if reasoning:
            blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if content or not (reasoning or calls):
            blocks.append({"type": "text", "text": content})
        for call in calls:
            blocks.append({**_tool_use(call), "input": json.loads(call.arguments)})
        return self._message(blocks, stop_reason(stats, calls), usage(stats))

    async def stream(self, parser: ReplyParser, job, prompt_tokens: int) -> AsyncIterator[dict]:
        """The stream's events for the server's generation `job`, its text read through `parser`."""
        for event in self.start(prompt_tokens):
            yield event
        async for piece in job.pieces():
            for event in self.events(parser.feed(piece)):
                yield event
        for event in [*self.events(parser.finish()), *self.end(job.stats, parser.calls)]:
            yield event

    def start(self, prompt_tokens: int) -> list[dict]:
        use = {"input_tokens": prompt_tokens, "output_tokens": 0}
        return [{"type": "message_start", "message": self._message([], None, use)}]

    def events(self, delta: Delta) -> list[dict]:
        out: list[dict] = []
        if delta.reasoning:
            out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning}))
        if delta.content:
            out += self._block("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta.content}))
        for call in delta.calls:
            out += self._block("tool_use", _tool_use(call), always_new=True)
            out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return out

    def end(self, stats: GenerationStats, calls: list[ToolCall]) -> list[dict]:
        out = self._close()
        # the final usage: how much of the prompt came from the context is known only now
        out.append({"type": "message_delta", "delta": {"stop_reason": stop_reason(stats, calls), "stop_sequence": None},
                    "usage": usage(stats)})
        out.append({"type": "message_stop"})
        return out

    def _block(self, kind: str, block: dict, always_new: bool = False) -> list[dict]:
        if self._open == kind and not always_new:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        return out + [{"type": "content_block_start", "index": self._index, "content_block": block}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": self._index}]
