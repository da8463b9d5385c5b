"""
The tools the route tests offer, written once as ds4tw's own L{ToolSpec}
and put in each dialect's wire shape by one function per dialect; the
Hermes markup the scripted model writes to call one (the scripted
engine's ChatML template has no tool support, so calls are parsed by the
Hermes fallback); and a reply split at every character.
"""

from __future__ import annotations

from typing import Any

from ds4tw._tools.spec import ToolSpec
from ds4tw.testing import Reply

WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
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
