"""OpenAI chat requests beyond plain text: messages with tool calls, tool results and reasoning;
tools and tool_choice; response_format; thinking controls. `ChatOptions.plan` turns them into a
`ChatPlan` the server renders and generates from; `Reply` writes the response objects of chat and
completions, whole or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import GenerationStats, TokenLogprob
from ..thinking import Thinking
from .grammar import SchemaError, json_grammar, tool_call_grammar
from .reply import THINK_START, ReplyParser, thinking_open
from .tools import ToolCall, ToolFormat, arguments_object, parameter_types, template_tool_format

MAX_TOP_LOGPROBS = 20
# Template variables the server sets itself; chat_template_kwargs may set any other.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


class RequestError(ValueError):
    """A request this server cannot serve as asked: answered with a 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


# --- request pieces --------------------------------------------------------------------------------
class ApiModel(BaseModel):
    """A request object: unknown fields ignored, NaN and infinity refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(ApiModel):
    type: Literal["text"]
    text: str


class FunctionCall(ApiModel):
    name: str
    arguments: str


class ToolCallIn(ApiModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(ApiModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self, index: int) -> dict:
        """The message as chat templates expect it: one string of content; tool call arguments as
        objects; reasoning given back as `reasoning_content`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                arguments = arguments_object(call.function.arguments)
                if arguments is None:
                    raise RequestError(f"messages.{index}.tool_calls.{j}.function.arguments", "is not a JSON object")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            out["tool_calls"] = calls
        return out


class FunctionDefinition(ApiModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(ApiModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(ApiModel):
    name: str


class NamedToolChoice(ApiModel):
    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaFormat(ApiModel):
    name: str | None = None
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(ApiModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# --- what a request asks for -------------------------------------------------------------------------
@dataclass
class ChatPlan:
    """A chat request made ready for the engine: the template's messages and variables, a grammar
    for the reply if it must have a shape, and how to read the reply back."""

    messages: list[dict]
    variables: dict = field(default_factory=dict)
    grammar: str | None = None
    grammar_param: str = ""  # the request field the grammar comes from, for errors
    tool_format: ToolFormat | None = None  # tool calls are parsed from the reply when set
    tool_types: dict = field(default_factory=dict)
    thinking_budget: int | None = None
    template_thinks: bool = False  # the template knows <think> blocks

    def thinking(self, prompt_text: str) -> Thinking | None:
        """The engine's thinking control for the rendered prompt."""
        if not self.template_thinks:
            return None
        return Thinking(open=thinking_open(prompt_text), budget=self.thinking_budget)

    def parser(self, prompt_text: str) -> ReplyParser:
        thinking = self.template_thinks and thinking_open(prompt_text)
        return ReplyParser(thinking=thinking, may_think=self.template_thinks, tool_format=self.tool_format,
                           types=self.tool_types)


class ChatOptions(ApiModel):
    """The chat request fields about tools, structured output and thinking."""

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict | None = None
    enable_thinking: bool | None = None  # as some clients send it; chat_template_kwargs' wins
    thinking_budget: int | None = Field(None, ge=0)

    def plan(self, messages: list[ChatMessage], template: str | None) -> ChatPlan:
        """RequestError when the model's chat template cannot do what the request asks."""
        reserved = RESERVED_TEMPLATE_VARIABLES.intersection(self.chat_template_kwargs or {})
        if reserved:
            raise RequestError("chat_template_kwargs", f"cannot set {', '.join(sorted(reserved))} (the server does)")
        rendered = [m.for_template(i) for i, m in enumerate(messages)]
        for i, tool in enumerate(self.tools or ()):
            _check_parameters(tool.function.parameters, f"tools.{i}.function.parameters")
        tools = [t.model_dump(exclude_none=True) for t in self.tools or ()]
        choice = self.tool_choice or ("auto" if tools else "none")
        fmt = template_tool_format(template)
        plan = ChatPlan(rendered, dict(self.chat_template_kwargs or {}), thinking_budget=self.thinking_budget,
                        template_thinks=bool(template) and THINK_START in template)
        if self.enable_thinking is not None:
            plan.variables.setdefault("enable_thinking", self.enable_thinking)
        if tools:
            plan.variables["tools"] = tools
        if choice not in ("none", "auto") and not tools:
            raise RequestError("tool_choice", "needs tools")
        if tools and choice != "none":
            if fmt is None:
                raise RequestError("tools", "the model's chat template does not take tools")
            plan.tool_format, plan.tool_types = fmt, parameter_types(tools)
        if isinstance(choice, NamedToolChoice):
            chosen = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not chosen:
                raise RequestError("tool_choice", f"names {choice.function.name!r}, which is not among the tools")
            plan.grammar = _grammar("tools", lambda: tool_call_grammar(chosen, fmt, parallel=False))
            plan.grammar_param = "tools"
        elif choice == "required":
            plan.grammar = _grammar("tools", lambda: tool_call_grammar(tools, fmt, parallel=self.parallel_tool_calls))
            plan.grammar_param = "tools"
        if self.response_format and self.response_format.type != "text":
            if plan.grammar is not None:
                raise RequestError("response_format", "cannot be combined with a required tool call")
            plan.grammar = _grammar("response_format", lambda: json_grammar(self._schema()))
            plan.grammar_param, plan.tool_format = "response_format", None
        return plan

    def _schema(self) -> dict | None:
        if self.response_format.type == "json_object":
            return None
        schema = self.response_format.json_schema.json_schema if self.response_format.json_schema else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema", "a JSON schema object is required")
        return schema


def _check_parameters(parameters: dict | None, param: str) -> None:
    """A tool's parameters must be an object schema: properties an object of schemas, required a
    list of names."""
    if parameters is None:
        return
    properties, required = parameters.get("properties", {}), parameters.get("required", [])
    if parameters.get("type", "object") != "object":
        raise RequestError(param, "must be a JSON schema of type object")
    if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
        raise RequestError(f"{param}.properties", "must map each parameter name to a JSON schema")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise RequestError(f"{param}.required", "must be a list of parameter names")


def _grammar(param: str, build) -> str:
    try:
        return build()
    except SchemaError as e:
        raise RequestError(param, str(e)) from None


# --- replies -----------------------------------------------------------------------------------------
def message(reasoning: str, content: str, calls: list[ToolCall]) -> dict:
    """The assistant message of a whole reply."""
    out: dict = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = [call.openai() for call in calls]
    return out


def delta(reasoning: str, content: str, calls: list[ToolCall], first_index: int) -> dict:
    """A streamed delta; each tool call comes whole (its arguments are one valid JSON text)."""
    out: dict = {}
    if reasoning:
        out["reasoning_content"] = reasoning
    if content:
        out["content"] = content
    if calls:
        out["tool_calls"] = [call.openai(first_index + i) for i, call in enumerate(calls)]
    return out


def logprobs_chat(entries: list[TokenLogprob]) -> dict:
    """The chat `logprobs` object for these tokens."""

    def item(text: str, data: bytes, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**item(e.text, e.data, e.logprob), "top_logprobs": [item(*t) for t in e.top]} for e in entries],
            "refusal": None}


def logprobs_completion(entries: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions `logprobs` object; text offsets count from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: lp for text, _, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class Reply:
    """The OpenAI response objects of one request: kind "chat" (chat.completion) or "completion".
    A chat reply's text goes through `parser` (reasoning, content, tool calls). `job` is the
    server's generation job: its pieces, stats and log probabilities."""

    def __init__(self, kind: Literal["chat", "completion"], model_id: str, parser: ReplyParser | None = None):
        self.kind, self.model_id = kind, model_id
        self.parser = parser or ReplyParser()
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], *, chunk: bool, **extra) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices, **extra}

    def _logprobs(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return logprobs_chat(entries) if self.kind == "chat" else logprobs_completion(entries, offset)

    @staticmethod
    def usage(stats: GenerationStats) -> dict:
        return {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
        }

    def _finish_reason(self, stats: GenerationStats) -> str | None:
        return "tool_calls" if self.parser.calls and stats.finish_reason == "stop" else stats.finish_reason

    def whole(self, text: str, job) -> dict:
        """The non-streaming response."""
        logprobs = self._logprobs(job.token_logprobs if job.logprobs is not None else None)
        choice: dict = {"index": 0}
        if self.kind == "completion":
            choice["text"] = text
        else:
            self.parser.feed(text)
            self.parser.finish()
            choice["message"] = message(*self.parser.message())
        choice.update(logprobs=logprobs, finish_reason=self._finish_reason(job.stats))
        return self._envelope([choice], chunk=False, usage=self.usage(job.stats))

    async def chunks(self, job, include_usage: bool) -> AsyncIterator[dict]:
        """The streaming response's events."""
        usage_field = {"usage": None} if include_usage else {}
        said = {"logprobs": 0, "calls": 0, "text": 0}

        def chunk(piece: str, finish_reason: str | None = None, final: bool = False) -> dict | None:
            """The event for `piece`, or None while the parser holds it back (its log
            probabilities then go with the next event)."""
            choice: dict = {"index": 0}
            if self.kind == "completion":
                choice["text"] = piece
            else:
                d = self.parser.finish() if final else self.parser.feed(piece)
                choice["delta"] = delta(d.reasoning, d.content, d.calls, said["calls"])
                said["calls"] += len(d.calls)
            if not final and not (choice.get("delta") if self.kind == "chat" else piece):
                return None
            entries = None
            if job.logprobs is not None:
                entries = job.token_logprobs[said["logprobs"] :]
                said["logprobs"] = len(job.token_logprobs)
            choice.update(logprobs=self._logprobs(entries, said["text"]), finish_reason=finish_reason)
            said["text"] += len(piece)
            return self._envelope([choice], chunk=True, **usage_field)

        if self.kind == "chat":
            yield self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}], chunk=True, **usage_field)
        async for piece in job.pieces():
            if (event := chunk(piece)) is not None:
                yield event
        yield chunk("", self._finish_reason(job.stats), final=True)
        if include_usage:
            yield self._envelope([], chunk=True, usage=self.usage(job.stats))
