"""llama.cpp grammars (GBNF) that make a reply valid by construction: a forced tool call in the
template's own format, or JSON matching a schema. JSON rules come from llama-cpp-python's
JSON-schema converter (llama_cpp.llama_grammar), used as a library."""

from __future__ import annotations

import json
import re

from llama_cpp.llama_grammar import SchemaConverter

from .tools import CALL_END, CALL_START, ToolFormat

NL = "\n"
# The converter spells a bounded repetition (maxLength 20000) as that many nested optional groups,
# and llama.cpp's recursive grammar parser overflows its stack on deep nesting (a crash, seen at
# 20000): bounds above this are refused.
MAX_REPEAT = 500
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaError(ValueError):
    """A JSON schema the grammar converter cannot turn into a grammar."""


def json_grammar(schema: dict | None) -> str:
    """A grammar for one JSON value matching `schema`, or for any JSON object when it is None."""
    converter = _converter()
    _visit(converter, schema if schema is not None else {"type": "object"}, "")
    return converter.format_grammar()


def tool_call_grammar(tools: list[dict], fmt: ToolFormat, *, parallel: bool) -> str:
    """A grammar for one call (or several when `parallel`) of one of `tools` (OpenAI tool objects
    whose function.parameters are JSON schemas), written in the template's format `fmt`."""
    converter = _converter()
    rules = ["root ::= call" + (f" ( {_literal(NL)} call )*" if parallel else "")]
    alternatives = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        name, parameters = function["name"], function.get("parameters") or {"type": "object", "properties": {}}
        if fmt == "json":
            schema = {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
            }
            alternatives.append(_visit(converter, schema, f"tool-{i}"))
        else:
            alternatives.append(f"tool-{i}")
            opening, closing = _literal(f"<function={name}>{NL}"), _literal(f"</function>{NL}")
            rules.append(f"tool-{i} ::= {opening} {_xml_parameters(converter, parameters, i)} {closing}")
    closing = _literal((NL if fmt == "json" else "") + CALL_END)
    rules.append(f"call ::= {_literal(CALL_START + NL)} ( {' | '.join(alternatives)} ) {closing}")
    return "\n".join(rules) + "\n" + converter.format_grammar()


def _xml_parameters(converter: SchemaConverter, parameters: dict, tool: int) -> str:
    """The <parameter=..> blocks of one tool in the schema's order, each optional one or not. String
    values are raw text (without '<'), others JSON."""
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    parts = []
    for j, (name, schema) in enumerate(properties.items()):
        _check_repeats(schema)
        if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
            limit = schema.get("maxLength")
            value = f"[^<]{{0,{int(limit)}}}" if isinstance(limit, int) else "[^<]*"
        elif schema.get("type") == "string":
            options = schema["enum"] if "enum" in schema else [schema["const"]]
            value = "( " + " | ".join(_literal(str(o)) for o in options) + " )"
        else:
            value = _visit(converter, schema, f"tool-{tool}-{j}")
        block = f"{_literal(f'<parameter={name}>{NL}')} {value} {_literal(f'{NL}</parameter>{NL}')}"
        parts.append(block if name in required else f"( {block} )?")
    return " ".join(parts) or '""'


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: SchemaConverter, schema: dict, name: str) -> str:
    _check_repeats(schema)
    try:
        return converter.visit(converter.resolve_refs(schema, "request"), name)
    except Exception as e:  # the converter raises plain errors on schemas it does not handle
        raise SchemaError(f"cannot build a grammar from this JSON schema: {e}") from None


def _check_repeats(schema) -> None:
    """SchemaError for a repetition bound over MAX_REPEAT anywhere in `schema` (a length or count
    keyword, or a {n,m} in a pattern)."""
    if isinstance(schema, list):
        for item in schema:
            _check_repeats(item)
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        counts = [value] if key in _REPEAT_KEYS and isinstance(value, int) else []
        if key == "pattern" and isinstance(value, str):
            counts = [int(n) for m in _PATTERN_COUNT.finditer(value) for n in m.groups() if n]
        if any(n > MAX_REPEAT for n in counts):
            raise SchemaError(f"{key}: repetition bounds above {MAX_REPEAT} are not supported in grammars")
        _check_repeats(value)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
