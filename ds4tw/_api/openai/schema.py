"""
OpenAI request schemas (pydantic v2) and their translation to engine
terms. Unknown fields are ignored, as OpenAI-compatible servers do;
known fields the server cannot honour are rejected with a clear 400
rather than silently dropped.

Covered by tests/unit/test_openai_routes.py and tests/unit/test_openai_tools.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..._engine.interface import SamplingParams
from ..._errors import invalid
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

MAX_STOP = 16
#: OpenAI allows 20 alternatives per token in chat, 5 in completions;
#: both are served up to 20.
MAX_TOP_LOGPROBS = 20


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    #: JSON text, as OpenAI sends it.
    arguments: str = "{}"


class ToolCallIn(_Lenient):
    """A call an earlier assistant turn made."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    #: An earlier turn's reasoning sent back (llama-server's and DeepSeek's
    #: field; vLLM's newer name is C{reasoning}).
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise invalid(
                    f"messages[{index}].content[{j}]: content of type {part.type!r} is not "
                    "supported by this server (text only)",
                    param=f"messages.{index}.content.{j}.type",
                )
            out.append(part.text)
        return "".join(out)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    n: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are supported")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.n not in (None, 1):
            raise ValueError("n: only n=1 is supported")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_count(self) -> int | None:
        """L{SamplingParams.logprobs}: None, or how many alternatives per token."""
        return None

    def sampling(self, max_tokens: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        defaults = SamplingParams()
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            min_p=pick(self.min_p, defaults.min_p),
            repeat_penalty=pick(self.repeat_penalty, defaults.repeat_penalty),
            presence_penalty=pick(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, defaults.frequency_penalty),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=self.stops() + extra_stops,
            logprobs=self.logprobs_count(),
        )

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.:-]+$")
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Lenient):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    #: OpenAI's field is named "schema" (a BaseModel attribute name).
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Lenient):
    type: Literal["text"]


class JSONObjectFormat(_Lenient):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ChatResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ChatResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("tools", mode="before")
    @classmethod
    def _without_hosted(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        kept = []
        for tool in v:
            kind = tool.get("type") if isinstance(tool, dict) else None
            # A type that is not a string (a fuzzer's dict) is left for
            # validation to refuse by name, not a TypeError here.
            if isinstance(kind, str) and kind in OPENAI_HOSTED_TOOLS:
                left_out("chat.completions", str(kind))
            else:
                kept.append(tool)
        return kept

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            # Not a ValueError: pydantic would lose which field it was.
            raise invalid("top_logprobs: needs logprobs set to true", "top_logprobs")
        return self

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tooling(self) -> Tooling | None:
        """The request's tools, checked (400s name the field), or None."""
        tools = tuple(
            ToolSpec(
                t.function.name,
                t.function.description,
                t.function.parameters if t.function.parameters is not None else ANY_OBJECT,
            )
            for t in self.tools or ()
        )
        check_tools(tools, (f"tools.{i}.function" for i in range(len(tools))))
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            picked = ToolChoice("required", choice.function.name)
        else:
            # OpenAI's default: "auto" with tools, "none" without.
            picked = ToolChoice(choice or ("auto" if tools else "none"))
        tooling = Tooling(tools, picked, self.parallel_tool_calls is not False)
        check_choice(tooling, "tool_choice")
        if not tools:
            return None
        return tooling

    def structured(self) -> ResponseFormat | None:
        fmt = self.response_format
        if isinstance(fmt, JSONObjectFormat):
            return ResponseFormat("json_object")
        if isinstance(fmt, JSONSchemaResponseFormat):
            schema = fmt.json_schema.schema_
            if schema is None:
                return ResponseFormat("json_object", name=fmt.json_schema.name)
            check_schema(schema, "response_format.json_schema.schema")
            return ResponseFormat("json_schema", schema, fmt.json_schema.name)
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def thinking(self) -> bool:
        """Whether the client wants the model to think (and to see it)."""
        return self.reasoning_effort != "none"

    def reasoning_settings(self) -> ReasoningSettings:
        effort = self.reasoning_effort
        enabled = None if effort is None else effort != "none"
        return ReasoningSettings(enabled, effort, template=self.chat_template_kwargs or {})

    def template_messages(self) -> list[dict[str, Any]]:
        """
        The conversation as Hugging Face chat messages; a C{tool} message
        must answer a call an earlier assistant turn made.
        """
        out = []
        ledger = CallLedger()
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": m.text(i)}
            thought = m.reasoning_content or m.reasoning
            if m.role == "assistant" and thought:
                message["reasoning_content"] = thought
            if m.role == "assistant" and m.tool_calls:
                message["tool_calls"] = []
                for call in m.tool_calls:
                    ledger.called(call.id)
                    message["tool_calls"].append(
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.function.name,
                                "arguments": call.function.arguments,
                            },
                        }
                    )
            if m.role == "tool":
                ledger.answered(m.tool_call_id, f"messages.{i}.tool_call_id")
                message["tool_call_id"] = m.tool_call_id
                if m.name:
                    message["name"] = m.name
            out.append(message)
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    #: How many alternatives per token (0: only the sampled token's).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _completion_unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported by this server")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str) and len(p) != 1:
            raise ValueError("prompt: only one prompt per request is supported")
        return self

    def prompt_text_or_tokens(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            return ""
        if isinstance(p[0], str):
            return str(p[0])
        return [int(t) for t in p]
