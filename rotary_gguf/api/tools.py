"""Tool calls in the formats the Qwen family's chat templates use.

- "xml" (Qwen3.5/3.6, Qwen3-Coder): <tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>
  ...</function>\n</tool_call>; a value is raw text for string parameters, JSON otherwise.
- "json" (Qwen3, Hermes): <tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Literal

ToolFormat = Literal["xml", "json"]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One call the model made: a function name and its arguments as a JSON object's text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def template_tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None when it takes no tools."""
    if not template or "tools" not in template or CALL_START not in template:
        return None
    return "xml" if "<function=" in template else "json"


def parameter_types(tools: list[dict]) -> dict[str, dict[str, str]]:
    """For each tool name, the JSON-schema type of each parameter ("" when the schema names none)."""
    out = {}
    for tool in tools:
        function = tool.get("function", {})
        properties = (function.get("parameters") or {}).get("properties") or {}
        out[function.get("name", "")] = {
            name: schema.get("type", "") if isinstance(schema.get("type", ""), str) else ""
            for name, schema in properties.items()
        }
    return out


_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.S)
# A value runs to its </parameter>, never across the next <parameter=.
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?((?:(?!<parameter=).)*?)\n?</parameter>\s*", re.S)


def parse_call(block: str, fmt: ToolFormat, types: dict[str, dict[str, str]]) -> ToolCall | None:
    """The call inside one <tool_call>...</tool_call> block (tags excluded), or None when it is not
    a well-formed call of a known tool."""
    if fmt == "xml":
        m = _XML_FUNCTION.fullmatch(block)
        if not m or m[1] not in types:
            return None
        arguments, rest = {}, m[2]
        for p in _XML_PARAMETER.finditer(rest):
            arguments[p[1]] = _xml_value(p[2], types[m[1]].get(p[1], ""))
        if _XML_PARAMETER.sub("", rest).strip():  # text that is not a parameter
            return None
        return ToolCall(m[1], json.dumps(arguments, ensure_ascii=False))
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in types:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def _xml_value(text: str, kind: str):
    """A parameter's value: the raw text for strings, else the JSON it spells (raw text if none)."""
    if kind == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def arguments_object(arguments: str) -> dict | None:
    """A call's arguments text as the object templates iterate over, or None if it is not one."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
