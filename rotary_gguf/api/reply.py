"""The assistant's reply as it streams: reasoning (a <think> block), content, and tool calls.

One `ReplyParser` serves both the whole reply and the stream: `feed` takes text as the engine
makes it and returns what can be said for sure; a tag that may be starting is held back until the
next text settles it. Tool calls are looked for only after thinking; a call that does not parse
becomes plain content, so a model that writes a call badly gets a normal message, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tools import CALL_END, CALL_START, ToolCall, ToolFormat, parse_call

THINK_START, THINK_END = "<think>", "</think>"


def thinking_open(prompt_text: str) -> bool:
    """Whether a rendered chat prompt ends inside a think block (the template opened it)."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


@dataclass
class Delta:
    """What one piece of text added to the reply."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ReplyParser:
    """Splits generated text into reasoning, content and tool calls, and keeps the whole of each.
    `thinking`: the reply starts inside a think block; `may_think`: the model may open one with its
    first words. `tool_format` None: no tool calls are looked for; `types` maps each tool to its
    parameters' JSON types (tools.parameter_types). Text outside tags is passed on verbatim."""

    def __init__(self, *, thinking: bool = False, may_think: bool = False, tool_format: ToolFormat | None = None,
                 types: dict | None = None):
        # "undecided": the model may still open a think block; "reasoning"; "content"; "call":
        # inside <tool_call>; "after": after a call; "raw": a bad call, everything is content now.
        self._state = "reasoning" if thinking else "undecided" if may_think else "content"
        self._format, self._types = tool_format, types or {}
        self._pending = ""
        self._fresh = thinking  # after a tag, until the section says something: leading whitespace goes
        self.reasoning, self.content, self.calls = "", "", []

    def feed(self, text: str) -> Delta:
        self._pending += text
        delta = Delta()
        while self._step(delta, final=False):
            pass
        return self._record(delta)

    def finish(self) -> Delta:
        """The end of the reply: what was held back, as the section it was in (an unfinished call
        is content)."""
        delta = Delta()
        while self._step(delta, final=True):
            pass
        rest, self._pending = self._pending, ""
        if self._state == "call":
            rest = CALL_START + rest
        if self._state == "reasoning":
            self._say(delta, "reasoning", rest.rstrip())
        else:
            self._say(delta, "content", rest)
        return self._record(delta)

    def message(self) -> tuple[str, str, list[ToolCall]]:
        """The whole reply so far: (reasoning, content, tool calls), exactly as streamed."""
        return self.reasoning, self.content, list(self.calls)

    # --- the state machine ----------------------------------------------------------------------
    def _step(self, delta: Delta, final: bool) -> bool:
        """Consume what can be decided from the pending text; True to go on."""
        text, state = self._pending, self._state
        if state == "undecided":
            head = text.lstrip()
            if head.startswith(THINK_START):
                self._switch("reasoning", head[len(THINK_START) :])
                return True
            if THINK_START.startswith(head) and not final:
                return False
            self._state = "content"
            return True
        if state == "reasoning":
            # A model that starts a tool call without closing its thinking still made the call.
            ends = {THINK_END: "content", **({CALL_START: "call"} if self._format else {})}
            return self._until(delta, "reasoning", ends, final)
        if state == "content":
            if self._format is None:
                self._say(delta, "content", text)
                self._pending = ""
                return False
            return self._until(delta, "content", {CALL_START: "call"}, final)
        if state == "call":
            end = text.find(CALL_END)
            if end < 0:
                return False
            call = parse_call(text[:end], self._format, self._types)
            if call is None:
                self._state, self._pending = "raw", CALL_START + text
                return True
            delta.calls.append(call)
            self._switch("after", text[end + len(CALL_END) :])
            return True
        if state == "after":
            head = text.lstrip()
            if head.startswith(CALL_START):
                self._switch("call", head[len(CALL_START) :])
                return True
            if CALL_START.startswith(head) and not final:
                return False
            self._state, self._fresh = "content", True
            return True
        self._say(delta, "content", text)  # raw
        self._pending = ""
        return False

    def _until(self, delta: Delta, section: str, ends: dict[str, str], final: bool) -> bool:
        """Say the pending text as `section` up to the first of the `ends` tags, then switch to
        that tag's state; without one, hold back an ending that could be a tag's start.
        Whitespace before a tag is dropped: it is held back too until text follows it."""
        text = self._pending
        found = [(text.find(tag), tag) for tag in ends if tag in text]
        if found:
            at, tag = min(found)
            self._say(delta, section, text[:at].rstrip())
            self._switch(ends[tag], text[at + len(tag) :])
            return True
        if final:
            return False
        keep = max(next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0) for tag in ends)
        keep += len(text[: len(text) - keep]) - len(text[: len(text) - keep].rstrip())
        self._say(delta, section, text[: len(text) - keep])
        self._pending = text[len(text) - keep :]
        return False

    def _switch(self, state: str, rest: str) -> None:
        self._state, self._pending, self._fresh = state, rest, True

    def _say(self, delta: Delta, section: str, text: str) -> None:
        if self._fresh:
            text = text.lstrip()
        if text:
            self._fresh = False
            setattr(delta, section, getattr(delta, section) + text)

    def _record(self, delta: Delta) -> Delta:
        self.reasoning += delta.reasoning
        self.content += delta.content
        self.calls.extend(delta.calls)
        return delta
