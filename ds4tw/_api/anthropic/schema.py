"""
Anthropic Messages request schemas (pydantic v2) and their translation to
engine terms: template messages, template kwargs, tools, structured
output, sampling parameters and how much of the model's reasoning the
client sees.

Unknown fields are ignored (clients send C{metadata}, C{cache_control},
C{service_tier} and more that change nothing here); known fields the
server cannot honour (images, documents, Anthropic-defined client tools
such as C{bash_20250124}) are rejected with a 400 that names them, never
silently dropped. Anthropic's server tools (C{web_search_20250305} and
the like, which Anthropic runs itself) are the exception: they are left
out of the prompt with a warning in the log, since agents send them by
default and the rest of their tools work; a C{tool_choice} naming one is
a 400.

Tool use: custom tools (C{name}, C{description}, C{input_schema}) and
C{tool_choice} become a L{Tooling}; an assistant turn's C{tool_use}
blocks become Hugging Face C{tool_calls}, and a user turn's
C{tool_result} blocks become C{tool} messages, placed before the rest of
that turn's text (L{ds4tw._formats.tools.prompt} says how both reach the
template). A result with C{is_error} reaches the model as its text with
L{ERROR_PREFIX} in front: chat templates have no field for it.

Covered by tests/unit/test_anthropic.py, tests/unit/test_anthropic_tools.py
and, through the official SDK, tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..._engine.interface import SamplingParams
from ..._errors import invalid
from ..._formats.reasoning.settings import ReasoningSettings
from ..._formats.tools.spec import (
    CallLedger,
    ResponseFormat,
    ToolChoice,
    Tooling,
    ToolSpec,
    check_choice,
    check_schema,
    check_tools,
    left_out,
)

MAX_STOP_SEQUENCES = 16

#: What an error result's text starts with in the prompt (C{is_error}).
ERROR_PREFIX = "Error: "

#: How much of the model's reasoning a client sees:
#: C{"full"}: thinking blocks with the text; C{"omitted"}: thinking blocks
#: with empty text but a signature (Anthropic's C{display: "omitted"});
#: C{"none"}: no thinking blocks at all (keepalives cover the silence).
ThinkingDisplay = Literal["full", "omitted", "none"]

#: Anthropic's server tools (C{type} prefixes): Anthropic runs them, a local
#: model cannot; they are left out of the prompt (L{left_out}).
SERVER_TOOL_TYPES = (
    "web_search_",
    "web_fetch_",
    "code_execution_",
    "tool_search_tool_",
    "mcp_toolset",
)

#: Block types Anthropic defines that this server cannot take as input,
#: and why, for the 400's message.
_SERVER_TOOLS = "Anthropic's server tools are not available on a local model"
_UNSUPPORTED_BLOCKS = {
    "server_tool_use": _SERVER_TOOLS,
    "web_search_tool_result": _SERVER_TOOLS,
    "web_fetch_tool_result": _SERVER_TOOLS,
    "code_execution_tool_result": _SERVER_TOOLS,
    "mcp_tool_use": _SERVER_TOOLS,
    "mcp_tool_result": _SERVER_TOOLS,
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentBlock(_Lenient):
    """
    Any input block; text, thinking (from the assistant), C{tool_use}
    (from the assistant) and C{tool_result} (from the user) are used.
    """

    type: str
    text: str | None = None
    # thinking (an earlier turn's, sent back)
    thinking: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool = False


class InputMessage(_Lenient):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


def _block_text(block: ContentBlock, where: str) -> str:
    if block.type == "text":
        if block.text is None:
            raise invalid(f"{where}.text: a text block needs a 'text' field", f"{where}.text")
        return block.text
    why = _UNSUPPORTED_BLOCKS.get(block.type, "it takes text blocks only here")
    raise invalid(
        f"{where}: content blocks of type {block.type!r} are not supported by this server ({why})",
        f"{where}.type",
    )


class _Turn:
    """One Hugging Face message being built from Anthropic blocks."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.texts: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.thinking: list[str] = []

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": "".join(self.texts)}
        if self.calls:
            out["tool_calls"] = self.calls
        if self.thinking:
            out["reasoning_content"] = "\n\n".join(self.thinking)
        return out


class _Conversation:
    """
    Walks the messages in order, building template messages: a
    C{tool_result} must answer a C{tool_use} of an earlier assistant turn.
    """

    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self._ledger = CallLedger()
        self._names: dict[str, str] = {}

    def add(self, m: InputMessage, where: str) -> None:
        if isinstance(m.content, str):
            self._append({"role": m.role, "content": m.content})
            return
        turn = _Turn(m.role)
        results: list[dict[str, Any]] = []
        for j, block in enumerate(m.content):
            at = f"{where}.content.{j}"
            if block.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                # Offered to the template, which keeps it within a tool loop
                # (interleaved thinking) and drops earlier turns', as
                # Anthropic does. Redacted thinking is unreadable.
                if block.type == "thinking" and block.thinking:
                    turn.thinking.append(block.thinking)
                continue
            if block.type == "tool_use" and m.role == "assistant":
                turn.calls.append(self._call(block, at))
            elif block.type == "tool_result" and m.role == "user":
                results.append(self._result(block, at))
            elif block.type in ("tool_use", "tool_result"):
                raise invalid(
                    f"{at}: a {block.type} block cannot appear in a {m.role} turn",
                    f"{at}.type",
                )
            else:
                turn.texts.append(_block_text(block, at))
        # Results answer the calls just made, so they come before the
        # turn's own text (Anthropic requires them first in the turn).
        for r in results:
            self.out.append(r)
        if turn.texts or turn.calls or not results:
            self._append(turn.message())

    def _call(self, block: ContentBlock, at: str) -> dict[str, Any]:
        if not block.id:
            raise invalid(f"{at}.id: a tool_use block needs an 'id'", f"{at}.id")
        if not block.name:
            raise invalid(f"{at}.name: a tool_use block needs a 'name'", f"{at}.name")
        if not isinstance(block.input, dict):
            raise invalid(f"{at}.input: a tool_use block needs an 'input' object", f"{at}.input")
        self._ledger.called(block.id)
        self._names[block.id] = block.name
        return {
            "id": block.id,
            "type": "function",
            "function": {"name": block.name, "arguments": json.dumps(block.input)},
        }

    def _result(self, block: ContentBlock, at: str) -> dict[str, Any]:
        self._ledger.answered(block.tool_use_id, f"{at}.tool_use_id")
        assert block.tool_use_id is not None
        if block.content is None:
            text = ""
        elif isinstance(block.content, str):
            text = block.content
        else:
            text = "\n".join(
                _block_text(b, f"{at}.content.{k}") for k, b in enumerate(block.content)
            )
        if block.is_error:
            text = ERROR_PREFIX + text
        return {
            "role": "tool",
            "tool_call_id": block.tool_use_id,
            "name": self._names[block.tool_use_id],
            "content": text,
        }

    def _append(self, message: dict[str, Any]) -> None:
        # Consecutive turns of one role are joined into one, as Anthropic
        # does (and as templates that insist on alternation need); tool
        # messages are never joined.
        last = self.out[-1] if self.out else None
        if last is None or last["role"] != message["role"] or message["role"] == "tool":
            self.out.append(message)
            return
        texts = [t for t in (last["content"], message["content"]) if t]
        last["content"] = "\n\n".join(texts)
        if message.get("tool_calls"):
            last["tool_calls"] = [*last.get("tool_calls", []), *message["tool_calls"]]


class ThinkingEnabled(_Lenient):
    type: Literal["enabled"]
    #: The engine closes the reasoning block after this many tokens.
    budget_tokens: int = Field(ge=1)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Lenient):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Lenient):
    type: Literal["disabled"]


Thinking = Annotated[
    ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")
]


class ToolDef(_Lenient):
    """
    A tool as sent. Everything is optional here so that an Anthropic
    tool type (which has no C{input_schema}) is refused by its type, not
    by a missing field; L{Conversation.tooling} does the checks.
    """

    type: str | None = None
    name: str = ""
    description: str = ""
    input_schema: Any = None


class ToolChoiceAuto(_Lenient):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Lenient):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Lenient):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Lenient):
    type: Literal["none"]


AnthropicToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class JSONSchemaOutput(_Lenient):
    type: Literal["json_schema"]
    #: Anthropic's field is named "schema" (a BaseModel attribute name).
    schema_: Any = Field(alias="schema")


class OutputConfig(_Lenient):
    #: Reaches templates that read an effort (gpt-oss's C{reasoning_effort}).
    effort: str | None = None
    format: JSONSchemaOutput | None = None


class Conversation(_Lenient):
    """What both C{/v1/messages} and C{/v1/messages/count_tokens} take."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    thinking: Thinking | None = None
    tools: list[ToolDef] | None = None
    tool_choice: AnthropicToolChoice | None = None

    def thinking_display(self) -> ThinkingDisplay:
        """
        Anthropic's default is no thinking, so a request without the
        field sees none (the model may still think; that is hidden).
        """
        t = self.thinking
        if t is None or isinstance(t, ThinkingDisabled):
            return "none"
        return "omitted" if t.display == "omitted" else "full"

    def reasoning_settings(self, effort: str | None = None) -> ReasoningSettings:
        """
        No C{thinking} field (and C{adaptive}) leaves the template's own
        default alone; C{enabled} turns thinking on with its budget.
        """
        if isinstance(self.thinking, ThinkingDisabled):
            return ReasoningSettings(False)
        if isinstance(self.thinking, ThinkingEnabled):
            return ReasoningSettings(True, effort, self.thinking.budget_tokens)
        return ReasoningSettings(None, effort)

    def tooling(self) -> Tooling | None:
        """
        The request's tools and choice, checked (400s name the field), or
        None without tools. C{any} is a required call of any tool, C{tool}
        a required call of the named one; C{disable_parallel_tool_use}
        ends the turn after the first call.
        """
        specs, params, server_tools = [], [], set()
        for i, t in enumerate(self.tools or ()):
            where = f"tools.{i}"
            if t.type is not None and t.type.startswith(SERVER_TOOL_TYPES):
                left_out("messages", t.type)
                server_tools.add(t.name)
                continue
            if t.type not in (None, "custom"):
                raise invalid(
                    f"{where}.type: tools of type {t.type!r} are not supported by this server "
                    "(Anthropic's server and client tools run on Anthropic's platform; define "
                    "a custom tool with name, description and input_schema)",
                    f"{where}.type",
                )
            if t.input_schema is None:
                raise invalid(f"{where}.input_schema: Field required", f"{where}.input_schema")
            check_schema(t.input_schema, f"{where}.input_schema")
            if t.input_schema.get("type") != "object":
                raise invalid(
                    f"{where}.input_schema.type: a tool's input_schema must have type 'object'",
                    f"{where}.input_schema.type",
                )
            specs.append(ToolSpec(t.name, t.description, t.input_schema))
            params.append(where)
        tools = tuple(specs)
        check_tools(tools, params, "input_schema")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceTool) and choice.name in server_tools:
            raise invalid(
                f"tool_choice.name: {choice.name!r} is one of Anthropic's server tools, which "
                "a local model cannot run, so it cannot be required",
                "tool_choice.name",
            )
        match choice:
            case None | ToolChoiceAuto():
                picked = ToolChoice("auto")
            case ToolChoiceAny():
                picked = ToolChoice("required")
            case ToolChoiceTool():
                picked = ToolChoice("required", choice.name)
            case ToolChoiceNone():
                picked = ToolChoice("none")
        parallel = not getattr(choice, "disable_parallel_tool_use", False)
        tooling = Tooling(tools, picked, parallel)
        check_choice(tooling, "tool_choice")
        return tooling if tools else None

    def template_messages(self) -> tuple[list[dict[str, Any]], str]:
        """
        The chat template's messages (Hugging Face shape, with
        C{tool_calls} and C{tool} messages), and the text of a trailing
        assistant turn: Anthropic continues that turn ("prefill") rather
        than answer after it, so it goes after the generation prompt, not
        into the template. Consecutive turns of one role are joined.
        """
        conv = _Conversation()
        if self.system is not None:
            conv.out.append({"role": "system", "content": self._system_text()})
        for i, m in enumerate(self.messages):
            conv.add(m, f"messages.{i}")
        turns = conv.out
        prefill = ""
        if len(turns) > 1 and turns[-1]["role"] == "assistant":
            last = turns[-1]
            if last.get("tool_calls"):
                i = len(self.messages) - 1
                ids = ", ".join(c["id"] for c in last["tool_calls"])
                raise invalid(
                    f"messages.{i}: tool_use ids were found without tool_result blocks "
                    f"after them: {ids}. Each tool_use block must have a corresponding "
                    "tool_result block in the next message.",
                    f"messages.{i}",
                )
            prefill = turns.pop()["content"]
        return turns, prefill

    def _system_text(self) -> str:
        if isinstance(self.system, str):
            return self.system
        assert self.system is not None
        return "\n\n".join(_block_text(b, f"system.{j}") for j, b in enumerate(self.system))


class CountTokensRequest(Conversation):
    """C{POST /v1/messages/count_tokens}."""


class MessagesRequest(Conversation):
    """C{POST /v1/messages}."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None  # accepted, ignored (user_id is for abuse tracking)
    stream: bool = False
    output_config: OutputConfig | None = None

    def reasoning_settings(self, effort: str | None = None) -> ReasoningSettings:
        given = self.output_config.effort if self.output_config is not None else None
        return super().reasoning_settings(effort or given)

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        return v

    def structured(self, tooling: Tooling | None) -> ResponseFormat | None:
        """
        C{output_config.format}: the reply is JSON valid against the
        schema, constrained by a grammar. Beside tools the model may call,
        the reply is either tool calls or such JSON (L{ds4tw._formats.tools.parsers}).
        """
        fmt = self.output_config.format if self.output_config is not None else None
        if fmt is None:
            return None
        param = "output_config.format.schema"
        check_schema(fmt.schema_, param)
        return ResponseFormat("json_schema", fmt.schema_)

    def stops(self) -> tuple[str, ...]:
        """The client's own stop sequences (the only ones it may be told matched)."""
        return tuple(self.stop_sequences or ())

    def sampling(self, max_tokens: int, template_stops: tuple[str, ...]) -> SamplingParams:
        d = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            stop=self.stops() + template_stops,
        )
