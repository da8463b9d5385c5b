"""
The OpenAI Responses request (C{POST /v1/responses}) in pydantic v2, and
its translation to engine terms: chat messages, template arguments,
sampling parameters, and the request fields a response object echoes.

Unknown fields are ignored, as OpenAI-compatible servers do. Known fields
that this server cannot honour are refused with a 400 that names them,
never dropped: a client that asks for stored state, tools or structured
output must learn at once that it will not get them.

Choices worth knowing:

  - C{store}: OpenAI's default is true, and the SDK omits the field unless
    the caller sets it. ds4tw stores nothing; an absent C{store} is taken
    as "not stored" (nothing the client can do later depends on it, since
    C{previous_response_id} is refused) and every response says
    C{"store": false}. An explicit C{store: true} is refused.
  - reasoning items in C{input} (a previous turn's output sent back, the
    stateless multi-turn pattern) are accepted and left out of the
    prompt, as thinking models' chat templates drop earlier turns'
    reasoning themselves.
  - C{reasoning.summary}: summaries are never generated; the reasoning
    item carries the model's whole reasoning text instead (its C{summary}
    list is empty).
  - C{truncation: "auto"} is accepted: a prompt that fits is unaffected,
    and one that does not gets the usual C{context_length_exceeded} 400
    (ds4tw never drops input silently).

Covered by tests/unit/test_responses.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from .._engine import SamplingParams
from .._errors import APIError, from_validation, invalid

ROLES = ("user", "assistant", "system", "developer")
#: Efforts that switch thinking off (and hide whatever thinking remains).
NO_THINKING = ("none", "minimal")
TEXT_PARTS = ("input_text", "output_text")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ReasoningConfig(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(_Lenient):
    type: str = "text"


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


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

    # Known, and refused when used (see _refuse_unsupported).
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    prompt: Any = None
    context_management: list[Any] | None = None
    moderation: Any = None

    _messages: list[dict[str, str]] = PrivateAttr(default_factory=list)

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
        Validate C{payload} completely: schema, unsupported features and
        every input item. Raises L{APIError} (a 400) for the first problem,
        so that nothing is queued for a request that cannot be served.
        """
        try:
            req = cls.model_validate(payload)
        except ValidationError as e:
            raise from_validation(e) from e
        req._refuse_unsupported()
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
        if self.tools:
            raise no("tools", "tools (function or hosted) are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise no("tool_choice", "only 'none' or 'auto' (there are no tools to choose)")
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type != "text":
            raise no("text.format", f"only {{'type': 'text'}} is supported, not {fmt.type!r}")
        if self.text and self.text.verbosity not in (None, "medium"):
            raise no("text.verbosity", "only 'medium' is supported by this server")
        # Stateless agents (store=false) ask for encrypted reasoning so they
        # can send it back next turn. With no server-side secret to protect,
        # the reasoning item already carries its text in the clear and is
        # accepted back as input, so that request is met as it stands.
        extra = [i for i in self.include or () if i != "reasoning.encrypted_content"]
        if extra:
            raise no("include", f"extra output data ({', '.join(extra)}) is not supported")
        if self.top_logprobs:
            raise no("top_logprobs", "log probabilities are not supported by this server")
        if self.prompt is not None:
            raise no("prompt", "prompt templates are not supported by this server")
        if self.context_management:
            raise no("context_management", "context compaction is not supported by this server")
        if self.moderation is not None:
            raise no("moderation", "moderation is not supported by this server")

    def _translate(self) -> list[dict[str, str]]:
        messages = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        if not self.input:
            raise invalid("input: at least one input item is required", param="input")
        for i, item in enumerate(self.input):
            message = _message(i, item)
            if message is not None:
                messages.append(message)
        return messages

    # -- translation, used by the route ----------------------------------

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages (validated in L{parse})."""
        return self._messages

    def thinking(self) -> bool:
        """Whether the model should think, and the client see it."""
        effort = self.reasoning.effort if self.reasoning else None
        return effort not in NO_THINKING

    def template_kwargs(self) -> dict[str, Any]:
        # Qwen3-style templates switch thinking off with this flag;
        # templates without it ignore it.
        return {} if self.thinking() else {"enable_thinking": False}

    def sampling(self, max_tokens: int, stops: tuple[str, ...] = ()) -> SamplingParams:
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stops,
        )

    def echo(self, model: str, params: SamplingParams) -> dict[str, Any]:
        """
        The request settings every response object repeats (the SDK's
        C{Response} requires several of them), with the sampling values
        actually used.
        """
        reasoning = self.reasoning or ReasoningConfig()
        return {
            "background": False,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "metadata": self.metadata or {},
            "model": model,
            "parallel_tool_calls": True
            if self.parallel_tool_calls is None
            else self.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary},
            "store": False,
            "temperature": params.temperature,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": self.tool_choice or "auto",
            "tools": [],
            "top_p": params.top_p,
            "truncation": self.truncation or "disabled",
            "user": self.user,
        }


def _message(i: int, item: Any) -> dict[str, str] | None:
    """One input item as a chat message; None for items left out."""
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise invalid(f"{where}: expected an input item object", param=f"input.{i}")
    kind = item.get("type", "message")
    if kind == "reasoning":
        return None  # an earlier turn's reasoning: templates drop it anyway
    if kind != "message":
        raise invalid(
            f"{where}: input items of type {kind!r} are not supported by this server "
            "(only messages: no tools, files or images)",
            param=f"input.{i}.type",
        )
    role = item.get("role")
    if role not in ROLES:
        raise invalid(
            f"{where}.role: expected one of {', '.join(map(repr, ROLES))}, got {role!r}",
            param=f"input.{i}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(_part_text(i, j, part) for j, part in enumerate(content))
    else:
        raise invalid(
            f"{where}.content: expected a string or a list of text parts",
            param=f"input.{i}.content",
        )
    return {"role": "system" if role == "developer" else role, "content": text}


def _part_text(i: int, j: int, part: Any) -> str:
    where, param = f"input[{i}].content[{j}]", f"input.{i}.content.{j}"
    if not isinstance(part, dict):
        raise invalid(f"{where}: expected a content part object", param=param)
    kind = part.get("type")
    if kind not in TEXT_PARTS:
        raise invalid(
            f"{where}: content of type {kind!r} is not supported by this server (text only)",
            param=f"{param}.type",
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text: expected a string", param=f"{param}.text")
    return text
