"""
Tools and structured output in dialect-neutral terms, and the checks
every dialect applies before anything is queued.

Each dialect's schema turns its own request fields into a L{Tooling} (the
tools, which of them the model may or must call, and whether several
calls may come in one turn) and a L{ResponseFormat}; the checks here
raise L{APIError} 400s that name the dialect's own field.

Covered by tests/unit/test_openai_tools.py (through the chat route).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from twisted.logger import Logger

from ..._errors import invalid

#: The schema of a tool that declares no parameters: any object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

#: OpenAI's hosted tools: OpenAI runs them; a local model cannot, so they
#: are left out of the prompt (L{left_out}).
OPENAI_HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "web_search_2025_08_26",
        "file_search",
        "computer",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
        "programmatic_tool_calling",
    }
)

log = Logger()
_LEFT_OUT: set[tuple[str, str]] = set()


def left_out(dialect: str, kind: str) -> None:
    """
    A tool that the API's provider runs itself (OpenAI's hosted tools,
    Anthropic's server tools) is left out of the prompt: a local model
    cannot run it, and refusing the request would lock out agents that
    send one by default (Codex's C{web_search}). Said once per kind, not
    every turn.
    """
    if (dialect, kind) not in _LEFT_OUT:
        _LEFT_OUT.add((dialect, kind))
        log.warn(
            "{dialect}: {kind!r} tools run on the API provider's side; left out of the "
            "prompt (this and later requests)",
            dialect=dialect,
            kind=kind,
        )


@dataclass(frozen=True)
class ToolSpec:
    """
    One tool the model may call.

    @param parameters: the JSON Schema of the arguments object.
    @param kind: C{"function"}: the model writes a JSON arguments object;
        C{"custom"}: a free-form tool (OpenAI Responses' C{custom} tools,
        Codex's C{apply_patch}) whose input is raw text. The model writes
        it as the string C{input} of an arguments object, and ds4tw hands
        the client the decoded text.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: ANY_OBJECT)
    kind: Literal["function", "custom"] = "function"

    def arguments_schema(self) -> Mapping[str, Any]:
        if self.kind == "custom":
            return {
                "type": "object",
                "properties": {"input": {"type": "string"}},
                "required": ["input"],
                "additionalProperties": False,
            }
        return self.parameters

    def template_entry(self) -> dict[str, Any]:
        """The tool as Hugging Face chat templates expect it in C{tools}."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.arguments_schema()),
            },
        }


@dataclass(frozen=True)
class ToolChoice:
    """
    C{auto}: the model decides; C{none}: no calls; C{required}: at least
    one call, of C{name} when set (a named choice).
    """

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class Tooling:
    tools: tuple[ToolSpec, ...]
    choice: ToolChoice = ToolChoice()
    #: Several calls in one turn; when false, decoding ends after the first.
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the model is offered tools at all in this turn."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice.mode == "required"

    def callable(self) -> tuple[ToolSpec, ...]:
        """The tools the model may call now (only the named one, if named)."""
        if self.choice.name is not None:
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools

    def spec(self, name: str) -> ToolSpec | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None

    def key(self) -> str:
        """A stable key for caches of what is built from these tools."""
        return json.dumps(
            [[t.name, t.kind, t.description, t.arguments_schema()] for t in self.callable()]
            + [self.choice.mode, self.parallel],
            sort_keys=True,
        )


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON valid against C{schema}."""

    kind: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str = ""

    def json_schema(self) -> Mapping[str, Any]:
        return self.schema if self.schema is not None else ANY_OBJECT


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming C{param} unless C{schema} is a valid JSON Schema."""
    if not isinstance(schema, dict):
        raise invalid(f"{param}: a JSON Schema must be an object", param)
    problem = _schema_problem(json.dumps(schema, sort_keys=True))
    if problem is not None:
        raise invalid(f"{param}: {problem}", param)


@functools.lru_cache(maxsize=1024)
def _schema_problem(text: str) -> str | None:
    """
    What is wrong with a schema (by its canonical text), or None. Cached:
    checking against the metaschema runs on the reactor thread, agents
    send the same tools every turn, and Claude Code's twelve took 56 ms
    of jsonschema a request, measured; the key costs well under 1 ms.
    """
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        at = f" at {where}" if where else ""
        return f"not a valid JSON Schema{at}: {e.message}"
    return None


def check_tools(
    tools: Sequence[ToolSpec], params: Iterable[str], schema_field: str = "parameters"
) -> None:
    """
    Names present and unique, schemas valid; C{params} names each tool's
    field, C{schema_field} the schema's field within it.
    """
    seen: set[str] = set()
    for tool, param in zip(tools, params, strict=True):
        if not tool.name:
            raise invalid(f"{param}: a tool needs a name", param)
        if tool.name in seen:
            raise invalid(f"{param}: the tool name {tool.name!r} is defined twice", param)
        seen.add(tool.name)
        check_schema(tool.parameters, f"{param}.{schema_field}")


def check_choice(tooling: Tooling, param: str) -> None:
    name = tooling.choice.name
    if tooling.choice.mode == "required" and not tooling.tools:
        raise invalid(f"{param}: a tool call is required but no tools are defined", param)
    if name is not None and tooling.spec(name) is None:
        known = ", ".join(repr(t.name) for t in tooling.tools) or "none"
        raise invalid(f"{param}: no tool named {name!r} is defined (tools: {known})", param)


class CallLedger:
    """
    Checks, walking a conversation in order, that every tool result
    answers a call an earlier assistant turn made: a result for an unknown
    id is a 400 naming where it is.
    """

    def __init__(self) -> None:
        self._called: set[str] = set()

    def called(self, call_id: str) -> None:
        self._called.add(call_id)

    def answered(self, call_id: str | None, param: str) -> None:
        if call_id not in self._called:
            raise invalid(
                f"{param}: this tool result answers {call_id!r}, which no earlier "
                "assistant turn called",
                param,
            )


def arguments_value(text: str) -> Any:
    """
    A call's arguments for a chat template: the parsed object (Hugging
    Face templates expect a mapping), or the text itself if it is not JSON.
    """
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text
