"""
The tools the parser and route tests offer, written once as ds4tw's own
L{ToolSpec} and put in each dialect's wire shape by one function per
dialect; the
Hermes markup the scripted model writes to call one (the scripted
engine's ChatML template has no tool support, so calls are parsed by the
Hermes fallback); and a reply split at every character.
"""

from __future__ import annotations

from typing import Any

from ds4tw._formats.tools.spec import ToolSpec
from ds4tw.testing import Reply

WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "units": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
)
#: Arguments of every JSON type a call syntax must carry: a string, a
#: nested object, a boolean and an array.
RUN = ToolSpec(
    "run",
    "Run a command.",
    {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "options": {
                "type": "object",
                "properties": {"timeout": {"type": "number"}, "env": {"type": "object"}},
            },
            "dry": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["command"],
    },
)
#: A free-form tool (Codex's apply_patch): its input is decoded, not streamed.
PATCH = ToolSpec("apply_patch", "Edit files.", kind="custom")
TIME = ToolSpec(
    "get_time",
    "The time in a timezone.",
    {"type": "object", "properties": {"tz": {"type": "string"}}},
)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat_tool(spec: ToolSpec) -> dict[str, Any]:
    """OpenAI chat completions' C{{"type": "function", "function": {...}}}."""
    function = {"name": spec.name, "description": spec.description, "parameters": spec.parameters}
    return {"type": "function", "function": function}


def anthropic_tool(spec: ToolSpec) -> dict[str, Any]:
    """Anthropic's C{{"name", "description", "input_schema"}}."""
    return {"name": spec.name, "description": spec.description, "input_schema": spec.parameters}


def responses_tool(spec: ToolSpec) -> dict[str, Any]:
    """The Responses API's flat C{{"type": "function", "name", ...}}."""
    return {
        "type": "function",
        "name": spec.name,
        "description": spec.description,
        "parameters": spec.parameters,
    }


def chars(text: str, eos: bool = True) -> Reply:
    """One piece per character: every tag and argument split everywhere."""
    return Reply.of(*text, eos=eos)
