"""
Anthropic Messages request schemas (pydantic v2) and their translation to
engine terms: template messages, template kwargs, sampling parameters and
how much of the model's reasoning the client sees.

Unknown fields are ignored (clients send C{metadata}, C{cache_control},
C{service_tier} and more that change nothing here); known fields the
server cannot honour (tools, images, documents, structured output) are
rejected with a 400 that names them, never silently dropped.

Covered by tests/unit/test_anthropic.py and, through the official SDK,
tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._engine import SamplingParams
from .._errors import invalid

MAX_STOP_SEQUENCES = 16

#: How much of the model's reasoning a client sees:
#: C{"full"}: thinking blocks with the text; C{"omitted"}: thinking blocks
#: with empty text but a signature (Anthropic's C{display: "omitted"});
#: C{"none"}: no thinking blocks at all (keepalives cover the silence).
ThinkingDisplay = Literal["full", "omitted", "none"]

#: Block types Anthropic defines that this server cannot take as input,
#: and why, for the 400's message.
_TOOLS = "tool use is not supported yet"
_UNSUPPORTED_BLOCKS = {"tool_use": _TOOLS, "tool_result": _TOOLS, "server_tool_use": _TOOLS}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentBlock(_Lenient):
    """Any input block; only text (and, from the assistant, thinking) is used."""

    type: str
    text: str | None = None


class InputMessage(_Lenient):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    def text(self, where: str) -> str:
        """
        The message's text. Thinking blocks that a client passes back in
        an assistant turn are dropped, as Anthropic drops earlier turns'
        thinking from the context; any other non-text block is a 400.
        """
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, block in enumerate(self.content):
            if block.type in ("thinking", "redacted_thinking") and self.role == "assistant":
                continue
            out.append(_block_text(block, f"{where}.content.{j}"))
        return "".join(out)


def _block_text(block: ContentBlock, where: str) -> str:
    if block.type == "text":
        if block.text is None:
            raise invalid(f"{where}.text: a text block needs a 'text' field", f"{where}.text")
        return block.text
    why = _UNSUPPORTED_BLOCKS.get(block.type, "it takes text blocks only")
    raise invalid(
        f"{where}: content blocks of type {block.type!r} are not supported by this server ({why})",
        f"{where}.type",
    )


class ThinkingEnabled(_Lenient):
    type: Literal["enabled"]
    #: Accepted, not enforced: stopping a think at a budget needs the
    #: engine to close the block in the model's own context (see routes).
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


class OutputConfig(_Lenient):
    effort: str | None = None  # accepted and ignored: no effort knob on a local model
    format: dict[str, Any] | None = None


class Conversation(_Lenient):
    """What both C{/v1/messages} and C{/v1/messages/count_tokens} take."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    thinking: Thinking | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _no_tools(self) -> Conversation:
        if self.tools:
            raise ValueError("tools: tool use is not supported by this server yet")
        return self

    def thinking_display(self) -> ThinkingDisplay:
        """
        Anthropic's default is no thinking, so a request without the
        field sees none (the model may still think; that is hidden).
        """
        t = self.thinking
        if t is None or isinstance(t, ThinkingDisabled):
            return "none"
        return "omitted" if t.display == "omitted" else "full"

    def template_kwargs(self) -> dict[str, Any]:
        """
        Qwen3-style templates switch thinking with C{enable_thinking};
        templates without it ignore it. No C{thinking} field (and
        C{adaptive}) leaves the template's own default alone.
        """
        if isinstance(self.thinking, ThinkingDisabled):
            return {"enable_thinking": False}
        if isinstance(self.thinking, ThinkingEnabled):
            return {"enable_thinking": True}
        return {}

    def template_messages(self) -> tuple[list[dict[str, Any]], str]:
        """
        The chat template's messages, and the text of a trailing assistant
        turn: Anthropic continues that turn ("prefill") rather than answer
        after it, so it goes after the generation prompt, not into the
        template. Consecutive turns of one role are joined into one, as
        Anthropic does (and as templates that insist on alternation need).
        """
        turns: list[tuple[str, str]] = []
        if self.system is not None:
            turns.append(("system", self._system_text()))
        for i, m in enumerate(self.messages):
            text = m.text(f"messages.{i}")
            if turns and turns[-1][0] == m.role:
                turns[-1] = (m.role, turns[-1][1] + "\n\n" + text)
            else:
                turns.append((m.role, text))
        prefill = ""
        if len(turns) > 1 and turns[-1][0] == "assistant":
            prefill = turns.pop()[1]
        return [{"role": r, "content": c} for r, c in turns], prefill

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

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        return v

    @model_validator(mode="after")
    def _no_structured_output(self) -> MessagesRequest:
        if self.output_config is not None and self.output_config.format is not None:
            raise ValueError(
                "output_config.format: structured output is not supported by this server"
            )
        return self

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
