"""
The OpenAI Responses request (C{POST /v1/responses}) in pydantic v2, and
its translation to engine terms: chat messages, tools, structured output,
sampling parameters, and the request fields a response object echoes.

Unknown fields are ignored, as OpenAI-compatible servers do. Known fields
that this server cannot honour are refused with a 400 that names them,
never dropped: a client that asks for stored state, hosted tools or
images must learn at once that it will not get them.

Choices worth knowing:

  - C{store}: OpenAI's default is true, and the SDK omits the field unless
    the caller sets it. ds4tw stores nothing; an absent C{store} is taken
    as "not stored" (nothing the client can do later depends on it, since
    C{previous_response_id} is refused) and every response says
    C{"store": false}. An explicit C{store: true} is refused.
  - input items are one discriminated union on C{type} (a message may
    omit it): messages, reasoning (an earlier turn's, left out of the
    prompt, as thinking models' chat templates drop earlier reasoning
    themselves), C{function_call} / C{custom_tool_call} (an earlier turn's
    calls) and their C{*_output} items. Consecutive calls, with the
    assistant text right before them, form one assistant turn; outputs
    become C{tool} messages and must answer an earlier call. Other item
    types (images, files, hosted tools' calls, item references) are 400s
    naming the type.
  - C{tools}: C{function} and C{custom} (free-form) tools, and
    C{namespace} tools grouping them (Codex's C{multi_agent_v1}): the model
    calls a member as C{namespace.name}, and the call item carries C{name}
    and C{namespace} apart, as OpenAI's do and Codex routes them. A custom
    tool's C{format} grammar (Codex's C{apply_patch} sends a Lark grammar)
    is not enforced by the sampler; its definition is added to the tool's
    description so that the model can follow it. Hosted tools
    (C{web_search}, C{file_search}, ...) are left out of the prompt with a
    warning in the log: the model cannot call them, and the client's other
    tools still work. A C{tool_choice} that forces one is a 400.
  - C{text.format} (structured output) together with tools the model may
    call is refused, as in chat completions: one grammar constrains a
    turn, and the format would otherwise be silently unenforced.
  - C{reasoning.summary}: summaries are never generated; the reasoning
    item carries the model's whole reasoning text instead (its C{summary}
    list is empty).
  - C{truncation: "auto"} is accepted: a prompt that fits is unaffected,
    and one that does not gets the usual C{context_length_exceeded} 400
    (ds4tw never drops input silently).

Covered by tests/unit/test_responses.py and tests/unit/test_responses_tools.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ..._engine.interface import SamplingParams
from ..._errors import APIError, invalid
from ..._formats.reasoning.settings import ReasoningSettings
from ..._formats.tools.spec import (
    ANY_OBJECT,
    OPENAI_HOSTED_TOOLS,
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

ROLES = ("user", "assistant", "system", "developer")
#: Efforts that switch thinking off (and hide whatever thinking remains).
NO_THINKING = ("none", "minimal")
TEXT_PARTS = ("input_text", "output_text")
#: What C{include} may ask for.
INCLUDABLE = ("reasoning.encrypted_content", "message.output_text.logprobs")
LOGPROBS = "message.output_text.logprobs"
MAX_TOP_LOGPROBS = 20


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- input items -------------------------------------------------------------
#
# Discriminator tags start with "~" so that they can be dropped from an
# error's location (pydantic puts the tag in it): "input.3.call_id", not
# "input.3.~function_call.call_id".


class TextPart(_Lenient):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v not in TEXT_PARTS:
            raise ValueError(f"content of type {v!r} is not supported by this server (text only)")
        return v


def _content_tag(v: Any) -> str | None:
    return "~str" if isinstance(v, str) else "~list" if isinstance(v, list) else None


Content = Annotated[
    Annotated[str, Tag("~str")] | Annotated[list[TextPart], Tag("~list")],
    Discriminator(
        _content_tag,
        custom_error_type="content_shape",
        custom_error_message="expected a string or a list of text parts",
    ),
]


def content_text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    #: C{reasoning_text} parts (this server's items carry the whole text)
    #: and summary parts (OpenAI's).
    content: list[dict[str, Any]] | None = None
    summary: list[dict[str, Any]] | None = None

    def text(self) -> str:
        parts = self.content or self.summary or []
        return "\n\n".join(p["text"] for p in parts if isinstance(p.get("text"), str))


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    #: JSON text, as the Responses API sends it.
    arguments: str
    #: The namespace tool the function belongs to (Codex's C{multi_agent_v1}).
    namespace: str | None = None


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class CustomToolCallItem(_Lenient):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None


class CustomToolCallOutputItem(_Lenient):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: Content


InputItem = (
    MessageItem
    | ReasoningItem
    | FunctionCallItem
    | FunctionCallOutputItem
    | CustomToolCallItem
    | CustomToolCallOutputItem
)
ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "reasoning": ReasoningItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": CustomToolCallOutputItem,
}


def _item_tag(v: Any) -> str | None:
    return f"~{v.get('type', 'message')}" if isinstance(v, dict) else None


_ITEM = TypeAdapter[InputItem](
    Annotated[
        Annotated[MessageItem, Tag("~message")]
        | Annotated[ReasoningItem, Tag("~reasoning")]
        | Annotated[FunctionCallItem, Tag("~function_call")]
        | Annotated[FunctionCallOutputItem, Tag("~function_call_output")]
        | Annotated[CustomToolCallItem, Tag("~custom_tool_call")]
        | Annotated[CustomToolCallOutputItem, Tag("~custom_tool_call_output")],
        Discriminator(_item_tag),
    ]
)


def validation_error(e: ValidationError, where: tuple[str | int, ...] = ()) -> APIError:
    """The first error, said plainly, located at C{where} (union tags left out)."""
    first = e.errors(include_url=False)[0]
    loc = [*where, *(p for p in first["loc"] if not str(p).startswith(("~", "function-")))]
    param = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    return invalid(f"{param}: {msg}" if param else msg, param or None)


def _validated(adapter: TypeAdapter[Any], value: Any, where: tuple[str | int, ...]) -> Any:
    """C{value} through C{adapter}; the first error is a 400 located at C{where}."""
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise validation_error(e, where) from e


def input_item(i: int, raw: Any) -> InputItem:
    if not isinstance(raw, dict):
        raise invalid(f"input.{i}: expected an input item object", f"input.{i}")
    kind = raw.get("type", "message")
    if kind not in ITEM_TYPES:
        supported = ", ".join(ITEM_TYPES)
        raise invalid(
            f"input.{i}.type: input items of type {kind!r} are not supported by this server "
            f"(supported: {supported})",
            f"input.{i}.type",
        )
    item: InputItem = _validated(_ITEM, raw, ("input", i))
    return item


# -- tools ---------------------------------------------------------------------


_NAME = r"^[a-zA-Z0-9_.:-]+$"


def qualified(namespace: str | None, name: str) -> str:
    """
    The name the model calls a tool by: a namespace member's is qualified
    (C{multi_agent_v1.spawn_agent}), as OpenAI's harmony format writes
    calls into a namespace; the call item names the two apart again.
    """
    return f"{namespace}.{name}" if namespace else name


class _OfferedTool(_Lenient):
    """
    What function and custom tools share: the name the model calls them
    by, and the namespace tool they may belong to (set by L{tool_defs},
    never read from the request: OpenAI's tools have no such field).
    """

    name: str = Field(min_length=1, max_length=64, pattern=_NAME)
    description: str | None = None
    _namespace: str | None = PrivateAttr(default=None)
    _namespace_description: str = PrivateAttr(default="")

    def join(self, namespace: NamespaceToolDef) -> None:
        self._namespace, self._namespace_description = namespace.name, namespace.description

    @property
    def namespace(self) -> str | None:
        return self._namespace

    @property
    def called_as(self) -> str:
        return qualified(self._namespace, self.name)

    def described(self) -> str:
        """The tool's description, with its namespace's for a namespace member."""
        text = self.description or ""
        if self._namespace and self._namespace_description:
            part = f"(Part of {self._namespace}: {self._namespace_description})"
            text = f"{text}\n\n{part}" if text else part
        return text


class FunctionToolDef(_OfferedTool):
    type: Literal["function"]
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def spec(self) -> ToolSpec:
        params = self.parameters if self.parameters is not None else ANY_OBJECT
        return ToolSpec(self.called_as, self.described(), params)

    def echo(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class TextInputFormat(_Lenient):
    type: Literal["text"]


class GrammarInputFormat(_Lenient):
    type: Literal["grammar"]
    syntax: Literal["lark", "regex"]
    definition: str


def _type_tag(v: Any) -> str | None:
    return f"~{v.get('type')}" if isinstance(v, dict) else None


class CustomToolDef(_OfferedTool):
    type: Literal["custom"]
    format: (
        Annotated[
            Annotated[TextInputFormat, Tag("~text")]
            | Annotated[GrammarInputFormat, Tag("~grammar")],
            Discriminator(_type_tag),
        ]
        | None
    ) = None

    def spec(self) -> ToolSpec:
        description = self.described()
        fmt = self.format
        if isinstance(fmt, GrammarInputFormat):
            # Not enforced by the sampler (no Lark or regex to GBNF here);
            # without it in the prompt the model could not know the syntax.
            grammar = f"The input must match this {fmt.syntax} grammar:\n{fmt.definition}"
            description = f"{description}\n\n{grammar}" if description else grammar
        return ToolSpec(self.called_as, description, kind="custom")

    def echo(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "custom", "name": self.name}
        if self.description is not None:
            out["description"] = self.description
        if self.format is not None:
            out["format"] = self.format.model_dump()
        return out


ToolDef = FunctionToolDef | CustomToolDef
_TOOL = TypeAdapter[ToolDef](
    Annotated[
        Annotated[FunctionToolDef, Tag("~function")] | Annotated[CustomToolDef, Tag("~custom")],
        Discriminator(_type_tag),
    ]
)


class NamespaceToolDef(_Lenient):
    """A group of function and custom tools under one name (Codex sends these)."""

    type: Literal["namespace"]
    name: str = Field(min_length=1, max_length=64, pattern=_NAME)
    description: str = ""
    tools: list[Any] = Field(min_length=1)


def tool_defs(i: int, raw: Any) -> list[ToolDef]:
    """
    The tools that C{tools[i]} offers the model: itself, a namespace's
    members, or nothing for a hosted tool (left out, with a warning).
    """
    where = f"tools.{i}"
    if not isinstance(raw, dict):
        raise invalid(f"{where}: expected a tool object", where)
    kind = raw.get("type")
    if not isinstance(kind, str):
        # A list or an object is not a tool type (and would not hash below).
        raise invalid(f"{where}.type: expected a string", f"{where}.type")
    if kind in OPENAI_HOSTED_TOOLS:
        left_out("responses", str(kind))
        return []
    if kind == "namespace":
        group: NamespaceToolDef = _validated(TypeAdapter(NamespaceToolDef), raw, ("tools", i))
        members = []
        for j, member in enumerate(group.tools):
            inner = f"{where}.tools.{j}"
            if not isinstance(member, dict) or member.get("type") not in ("function", "custom"):
                raise invalid(
                    f"{inner}.type: a namespace holds only 'function' and 'custom' tools",
                    f"{inner}.type",
                )
            tool: ToolDef = _validated(_TOOL, member, ("tools", i, "tools", j))
            tool.join(group)
            members.append(tool)
        return members
    if kind not in ("function", "custom"):
        raise invalid(
            f"{where}.type: tools of type {kind!r} are not supported by this server "
            "(only 'function', 'custom' and 'namespace' tools)",
            f"{where}.type",
        )
    return [_validated(_TOOL, raw, ("tools", i))]


class NamedChoice(_Lenient):
    type: Literal["function", "custom"]
    name: str
    namespace: str | None = None


class AllowedToolRef(_Lenient):
    type: Literal["function", "custom"]
    name: str
    namespace: str | None = None


class AllowedTools(_Lenient):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedToolRef] = Field(min_length=1)


# -- structured output ---------------------------------------------------------


class TextFormat(_Lenient):
    type: Literal["text"]


class JSONObjectFormat(_Lenient):
    type: Literal["json_object"]


class JSONSchemaFormat(_Lenient):
    type: Literal["json_schema"]
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    #: OpenAI's field is named "schema" (a BaseModel attribute name).
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    def echo(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "json_schema", "name": self.name, "schema": self.schema_}
        if self.description is not None:
            out["description"] = self.description
        if self.strict is not None:
            out["strict"] = self.strict
        return out


class ReasoningConfig(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextConfig(_Lenient):
    format: (
        Annotated[
            Annotated[TextFormat, Tag("~text")]
            | Annotated[JSONObjectFormat, Tag("~json_object")]
            | Annotated[JSONSchemaFormat, Tag("~json_schema")],
            Discriminator(_type_tag),
        ]
        | None
    ) = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, v: Any) -> Any:
        # Said once, instead of pydantic's one error per union member.
        if isinstance(v, dict) and v.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError(
                f"a format of type {v.get('type')!r} is not supported "
                "(only 'text', 'json_object' or 'json_schema')"
            )
        return v


class ResponsesRequest(_Lenient):
    model: str | None = None
    #: A string (one user message) or a list of input items; checked item
    #: by item in L{parse}, so that an error names the item at fault.
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    #: Checked tool by tool in L{parse}, like C{input}.
    tools: list[Any] | None = None
    tool_choice: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    # Known, and refused when used (see _refuse_unsupported).
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    context_management: list[Any] | None = None
    moderation: Any = None

    _messages: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _tools: list[ToolDef] = PrivateAttr(default_factory=list)
    #: Each offered tool's request field (C{tools.4.tools.2} for a member).
    _tool_params: list[str] = PrivateAttr(default_factory=list)
    #: The tools as a response object repeats them, hosted ones included.
    _echo_tools: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _tooling: Tooling | None = PrivateAttr(default=None)
    _format: ResponseFormat | None = PrivateAttr(default=None)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        # Said once, instead of pydantic's one error per union member.
        if not isinstance(v, str | list):
            raise ValueError("expected a string or a list of input items")
        return v

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> ResponsesRequest:
        """
        Validate C{payload} completely: schema, unsupported features, every
        input item and tool. Raises L{APIError} (a 400) for the first
        problem, so that nothing is queued for a request that cannot be
        served.
        """
        try:
            req = cls.model_validate(payload)
        except ValidationError as e:
            raise validation_error(e) from e
        req._refuse_unsupported()
        req._read_tools()
        req._tooling = req._build_tooling()
        req._format = req._build_format()
        req._messages = req._translate()
        return req

    def _refuse_unsupported(self) -> None:
        def no(param: str, why: str) -> APIError:
            return invalid(f"{param}: {why}", param=param)

        if self.store:
            raise no("store", "stored responses are not supported by this server (store=false)")
        if self.previous_response_id is not None:
            raise no(
                "previous_response_id",
                "this server stores no responses; send the whole conversation in input",
            )
        if self.conversation is not None:
            raise no("conversation", "conversations are not supported by this server")
        if self.background:
            raise no("background", "background responses are not supported by this server")
        if self.text and self.text.verbosity not in (None, "medium"):
            raise no("text.verbosity", "only 'medium' is supported by this server")
        # Stateless agents (store=false) ask for encrypted reasoning so they
        # can send it back next turn. With no server-side secret to protect,
        # the reasoning item already carries its text in the clear and is
        # accepted back as input, so that request is met as it stands.
        extra = [i for i in self.include or () if i not in INCLUDABLE]
        if extra:
            raise no("include", f"extra output data ({', '.join(extra)}) is not supported")
        if self.top_logprobs and not self.logprobs_wanted():
            raise no("top_logprobs", f"needs include=[{LOGPROBS!r}]")
        if self.prompt is not None:
            raise no("prompt", "prompt templates are not supported by this server")
        if self.context_management:
            raise no("context_management", "context compaction is not supported by this server")
        if self.moderation is not None:
            raise no("moderation", "moderation is not supported by this server")

    # -- tools and formats -----------------------------------------------

    def _read_tools(self) -> None:
        for i, raw in enumerate(self.tools or ()):
            offered = tool_defs(i, raw)
            namespaced = isinstance(raw, dict) and raw.get("type") == "namespace"
            for j, tool in enumerate(offered):
                self._tools.append(tool)
                self._tool_params.append(f"tools.{i}.tools.{j}" if namespaced else f"tools.{i}")
            if namespaced:
                self._echo_tools.append(
                    {
                        "type": "namespace",
                        "name": raw["name"],
                        "description": raw.get("description", ""),
                        "tools": [t.echo() for t in offered],
                    }
                )
            elif offered:
                self._echo_tools.append(offered[0].echo())
            else:
                self._echo_tools.append(raw)  # a hosted tool, as sent

    def _choice(self) -> tuple[ToolChoice, tuple[str, ...] | None]:
        """The choice, and the names C{allowed_tools} narrows the tools to."""
        raw = self.tool_choice
        if raw is None:
            return ToolChoice("auto" if self._tools else "none"), None
        if raw in ("auto", "none", "required"):
            return ToolChoice(raw), None
        if not isinstance(raw, dict):
            raise invalid(
                "tool_choice: expected 'auto', 'none', 'required' or a tool choice object",
                "tool_choice",
            )
        kind = raw.get("type")
        if kind == "allowed_tools":
            allowed: AllowedTools = _validated(TypeAdapter(AllowedTools), raw, ("tool_choice",))
            names = tuple(qualified(t.namespace, t.name) for t in allowed.tools)
            return ToolChoice(allowed.mode), names
        if kind in OPENAI_HOSTED_TOOLS:
            raise invalid(
                f"tool_choice.type: {kind!r} is a tool OpenAI hosts; this server runs a local "
                "model and cannot provide it, so it cannot be required",
                "tool_choice.type",
            )
        if kind not in ("function", "custom"):
            raise invalid(
                f"tool_choice.type: {kind!r} is not supported by this server (only 'function', "
                "'custom' or 'allowed_tools' objects)",
                "tool_choice.type",
            )
        named: NamedChoice = _validated(TypeAdapter(NamedChoice), raw, ("tool_choice",))
        return ToolChoice("required", qualified(named.namespace, named.name)), None

    def _build_tooling(self) -> Tooling | None:
        specs = tuple(t.spec() for t in self._tools)
        check_tools(specs, self._tool_params)
        choice, allowed = self._choice()
        if allowed is not None:
            known = {t.name for t in specs}
            for j, name in enumerate(allowed):
                if name not in known:
                    raise invalid(
                        f"tool_choice.tools.{j}: no tool named {name!r} is defined",
                        f"tool_choice.tools.{j}",
                    )
            # Only the allowed tools are offered: the model cannot call what
            # it is not shown.
            specs = tuple(t for t in specs if t.name in allowed)
        tooling = Tooling(specs, choice, self.parallel_tool_calls is not False)
        check_choice(tooling, "tool_choice")
        if isinstance(self.tool_choice, dict) and self.tool_choice.get("type") in (
            "function",
            "custom",
        ):
            spec = tooling.spec(str(choice.name))
            if spec is not None and spec.kind != self.tool_choice["type"]:
                raise invalid(
                    f"tool_choice: {choice.name!r} is a {spec.kind} tool, not a "
                    f"{self.tool_choice['type']} tool",
                    "tool_choice",
                )
        return tooling if specs else None

    def _build_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text else None
        if fmt is None or isinstance(fmt, TextFormat):
            return None
        if isinstance(fmt, JSONObjectFormat):
            return ResponseFormat("json_object")
        check_schema(fmt.schema_, "text.format.schema")
        return ResponseFormat("json_schema", fmt.schema_, fmt.name)

    def tooling(self) -> Tooling | None:
        """The request's tools, checked in L{parse}; None without tools."""
        return self._tooling

    def structured(self) -> ResponseFormat | None:
        return self._format

    def tool_kinds(self) -> dict[str, str]:
        """Each tool's kind by name: which output item a call of it becomes."""
        return {t.called_as: t.type for t in self._tools}

    def tool_namespaces(self) -> dict[str, tuple[str, str]]:
        """C{(namespace, name)} of each namespace member, by the name the model calls."""
        return {t.called_as: (t.namespace, t.name) for t in self._tools if t.namespace}

    def logprobs_wanted(self) -> bool:
        return LOGPROBS in (self.include or ())

    # -- the conversation --------------------------------------------------

    def _translate(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        if not self.input:
            raise invalid("input: at least one input item is required", param="input")
        ledger = CallLedger()
        names: dict[str, str] = {}
        # The assistant turn calls may still join: the last message, if it
        # is the assistant's and nothing but reasoning came after it.
        turn: dict[str, Any] | None = None
        # Reasoning goes to the assistant turn after it: the template keeps
        # it within a tool loop (interleaved thinking) and drops the rest.
        thought: list[str] = []
        for i, raw in enumerate(self.input):
            item = input_item(i, raw)
            if isinstance(item, ReasoningItem):
                if item.text():
                    thought.append(item.text())
                continue
            if isinstance(item, FunctionCallItem | CustomToolCallItem):
                if turn is None:
                    turn = {"role": "assistant", "content": ""}
                    messages.append(turn)
                _think(turn, thought)
                ledger.called(item.call_id)
                names[item.call_id] = qualified(item.namespace, item.name)
                turn.setdefault("tool_calls", []).append(_call(item))
                continue
            if isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
                ledger.answered(item.call_id, f"input.{i}.call_id")
                message = {
                    "role": "tool",
                    "tool_call_id": item.call_id,
                    "name": names[item.call_id],
                    "content": content_text(item.output),
                }
                messages.append(message)
                turn = None
                continue
            role = "system" if item.role == "developer" else item.role
            message = {"role": role, "content": content_text(item.content)}
            if role == "assistant":
                _think(message, thought)
            messages.append(message)
            turn = message if role == "assistant" else None
        return messages

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as Hugging Face chat messages (validated in L{parse})."""
        return self._messages

    def thinking(self) -> bool:
        """Whether the model should think, and the client see it."""
        effort = self.reasoning.effort if self.reasoning else None
        return effort not in NO_THINKING

    def reasoning_settings(self) -> ReasoningSettings:
        effort = self.reasoning.effort if self.reasoning else None
        return ReasoningSettings(None if effort is None else self.thinking(), effort)

    def sampling(self, max_tokens: int, stops: tuple[str, ...] = ()) -> SamplingParams:
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stops,
            logprobs=(self.top_logprobs or 0) if self.logprobs_wanted() else None,
        )

    def echo(self, model: str, params: SamplingParams) -> dict[str, Any]:
        """
        The request settings every response object repeats (the SDK's
        C{Response} requires several of them), with the sampling values
        actually used.
        """
        reasoning = self.reasoning or ReasoningConfig()
        fmt = self.text.format if self.text else None
        if isinstance(fmt, JSONSchemaFormat):
            text_format: dict[str, Any] = fmt.echo()
        else:
            text_format = {"type": fmt.type if fmt is not None else "text"}
        # OpenAI says "auto" when the field was left out, tools or not.
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        return {
            "background": False,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "metadata": self.metadata or {},
            "model": model,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary},
            "store": False,
            "temperature": params.temperature,
            "text": {"format": text_format, "verbosity": "medium"},
            "tool_choice": choice,
            "tools": self._echo_tools,
            "top_logprobs": self.top_logprobs,
            "top_p": params.top_p,
            "truncation": self.truncation or "disabled",
            "user": self.user,
        }


def custom_arguments(text: str) -> str:
    """A free-form call's input as the arguments object the model writes it as."""
    return json.dumps({"input": text}, ensure_ascii=False)


def _think(message: dict[str, Any], thought: list[str]) -> None:
    """Give C{message} the reasoning items that came before it, and clear them."""
    if thought:
        earlier = message.get("reasoning_content")
        message["reasoning_content"] = "\n\n".join([*([earlier] if earlier else []), *thought])
        thought.clear()


def _call(item: FunctionCallItem | CustomToolCallItem) -> dict[str, Any]:
    arguments = (
        item.arguments if isinstance(item, FunctionCallItem) else custom_arguments(item.input)
    )
    return {
        "id": item.call_id,
        "type": "function",
        "function": {"name": qualified(item.namespace, item.name), "arguments": arguments},
    }
