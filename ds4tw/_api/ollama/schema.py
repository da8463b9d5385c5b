"""
Ollama's request bodies (pydantic v2) for C{/api/chat} and
C{/api/generate}, and their translation to engine terms.

As Ollama does, unknown fields are ignored, and so are the C{options}
that set up a model at load time (C{num_gpu}, C{num_thread},
C{use_mmap}...): here the server's command line sets those. Fields the
server cannot honour are refused with a clear 400 instead of being
dropped: C{images} (no vision yet), a C{template} or C{suffix} override,
a C{context} from an old-style C{/api/generate} conversation.

C{options} maps onto sampling: C{temperature}, C{top_p}, C{top_k},
C{min_p}, C{seed}, C{stop}, C{repeat_penalty}, C{presence_penalty},
C{frequency_penalty}, C{num_predict} (C{-1}, C{-2} and C{0}: as much as
the context leaves, as Ollama's runner reads them) and C{num_ctx}: a
context smaller than the model's slot caps what the request may use
(a prompt that does not fit it is a 400); a larger one cannot be given
(the slot's size is fixed when the model loads) and is ignored.

C{think} is a bool or an effort (C{low}, C{medium}, C{high}); unset, the
model thinks as its template does by default and the thinking is shown,
as Ollama shows it for a thinking model.

Covered by tests/unit/test_ollama.py.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..._engine.interface import SamplingParams
from ..._errors import invalid
from ..._formats.reasoning.settings import ReasoningSettings
from ..._formats.tools.spec import (
    ANY_OBJECT,
    ResponseFormat,
    ToolChoice,
    Tooling,
    ToolSpec,
    check_schema,
    check_tools,
)
from ..openai.schema import MAX_STOP

#: Ollama's C{think} efforts (C{max} is its newest, read as C{high} by gpt-oss).
THINK_EFFORTS = ("low", "medium", "high", "max")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Lenient):
    """C{options}: the sampling fields; the load-time ones are accepted and ignored."""

    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are supported")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def max_tokens(self) -> int | None:
        """C{num_predict}; C{-1} (no limit), C{-2} (fill the context) and 0 mean the context's."""
        n = self.num_predict
        return n if n is not None and n > 0 else None


def _duration(value: Any) -> float | None:
    """
    Ollama's C{keep_alive} in seconds: a number of seconds or a Go
    duration (C{"5m"}, C{"1h30m"}, C{"-1"}); negative means forever (None).
    """
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration such as '5m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = re.fullmatch(r"-?((\d+(\.\d+)?)(h|ms|us|µs|ns|m|s))+", text)
            if parts is None:
                raise ValueError(
                    f"keep_alive: {text!r} is not a duration such as '5m', '30s' or '-1'"
                ) from None
            scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
            seconds = sum(
                float(n) * scale[unit]
                for n, _, unit in re.findall(r"(\d+(\.\d+)?)(h|ms|us|µs|ns|m|s)", text)
            )
            if text.startswith("-"):
                seconds = -seconds
    if not math.isfinite(seconds):
        raise ValueError("keep_alive must be finite")
    return None if seconds < 0 else seconds


class FunctionCall(_Lenient):
    name: str
    #: An object, as Ollama sends it (a JSON string from an OpenAI-minded client is read too).
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    index: int | None = None

    def arguments_text(self, param: str) -> str:
        if isinstance(self.arguments, dict):
            return json.dumps(self.arguments, ensure_ascii=False)
        try:
            parsed = json.loads(self.arguments or "{}")
        except ValueError:
            raise invalid(f"{param}: the arguments are not a JSON object", param) from None
        if not isinstance(parsed, dict):
            raise invalid(f"{param}: the arguments are not a JSON object", param)
        return json.dumps(parsed, ensure_ascii=False)


class ToolCallIn(_Lenient):
    id: str | None = None
    function: FunctionCall


class Message(_Lenient):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        # Ollama lower-cases the role before it looks at it.
        role = v.lower()
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {v!r} (system, user, assistant or tool)")
        return role


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.:-]+$")
    description: str = ""
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


def _no_images(images: list[Any] | None, param: str) -> None:
    if images:
        raise invalid(
            f"{param}: images are not supported by this server yet (text-only models)", param
        )


class _Request(_Lenient):
    """What both turns share: the model, the stream switch, format, options, think."""

    model: str = ""
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    keep_alive: float | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        if v is None:
            return None
        seconds = _duration(v)
        return -1.0 if seconds is None else seconds

    @property
    def opts(self) -> Options:
        return self.options or Options()

    def keep_alive_seconds(self) -> float | None:
        """C{keep_alive} in seconds; None when unset; C{-1} for forever."""
        return self.keep_alive if isinstance(self.keep_alive, float) else None

    def sampling(self, max_tokens: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        o = self.opts
        defaults = SamplingParams()
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(o.temperature, defaults.temperature),
            # Ollama's options omit zeros (Go's omitempty): a 0 is unset.
            top_p=pick(o.top_p, defaults.top_p) or defaults.top_p,
            top_k=pick(o.top_k, defaults.top_k),
            min_p=pick(o.min_p, defaults.min_p),
            repeat_penalty=pick(o.repeat_penalty, defaults.repeat_penalty) or 1.0,
            presence_penalty=pick(o.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(o.frequency_penalty, defaults.frequency_penalty),
            seed=o.seed if o.seed is not None and o.seed >= 0 else None,
            stop=o.stops() + extra_stops,
            logprobs=self.top_logprobs if self.logprobs else None,
        )

    def structured(self) -> ResponseFormat | None:
        fmt = self.format
        if fmt is None or fmt == "":
            return None
        if fmt == "json":
            return ResponseFormat("json_object")
        assert isinstance(fmt, dict)
        check_schema(fmt, "format")
        return ResponseFormat("json_schema", fmt, "format")

    def reasoning_settings(self) -> ReasoningSettings:
        think = self.think
        if think is None:
            return ReasoningSettings()
        if isinstance(think, bool):
            return ReasoningSettings(think)
        return ReasoningSettings(True, think)

    def show_thinking(self) -> bool:
        return self.think is not False


class ChatRequest(_Request):
    """The body of C{POST /api/chat}."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    def is_load(self) -> bool:
        """No messages: Ollama's way to load (or, with C{keep_alive: 0}, unload) a model."""
        return not self.messages

    def tooling(self) -> Tooling | None:
        tools = tuple(
            ToolSpec(
                t.function.name,
                t.function.description,
                t.function.parameters if t.function.parameters is not None else ANY_OBJECT,
            )
            for t in self.tools or ()
        )
        if not tools:
            return None
        check_tools(tools, (f"tools.{i}.function" for i in range(len(tools))))
        # Ollama has no tool_choice: the model decides.
        return Tooling(tools, ToolChoice("auto"), parallel=True)

    def template_messages(self) -> list[dict[str, Any]]:
        """
        The conversation as Hugging Face chat messages. Ollama's tool
        results name their tool (C{tool_name}) and seldom their call: a
        result without C{tool_call_id} answers the earliest unanswered
        call of that tool (else the earliest unanswered call), so that a
        template that pairs results with calls by id gets one.
        """
        out: list[dict[str, Any]] = []
        pending: list[tuple[str, str]] = []  # (id, name) of unanswered calls
        n = 0
        for i, m in enumerate(self.messages):
            _no_images(m.images, f"messages.{i}.images")
            message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
            if m.role == "assistant" and m.thinking:
                message["reasoning_content"] = m.thinking
            if m.role == "assistant" and m.tool_calls:
                message["tool_calls"] = []
                for j, call in enumerate(m.tool_calls):
                    cid = call.id or f"call_{n}"
                    n += 1
                    pending.append((cid, call.function.name))
                    arguments = call.function.arguments_text(
                        f"messages.{i}.tool_calls.{j}.function.arguments"
                    )
                    message["tool_calls"].append(
                        {
                            "id": cid,
                            "type": "function",
                            "function": {"name": call.function.name, "arguments": arguments},
                        }
                    )
            if m.role == "tool":
                answers, name = _answered(pending, m.tool_call_id, m.tool_name)
                if answers is not None:
                    message["tool_call_id"] = answers
                if name:
                    message["name"] = name
            out.append(message)
        return out


def _answered(
    pending: list[tuple[str, str]], call_id: str | None, name: str | None
) -> tuple[str | None, str | None]:
    """The call a tool result answers (taken off C{pending}), and the tool's name."""
    for k, (cid, cname) in enumerate(pending):
        if cid == call_id or (call_id is None and (name is None or cname == name)):
            del pending[k]
            return cid, name or cname
    return call_id, name


class GenerateRequest(_Request):
    """The body of C{POST /api/generate}."""

    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None

    def is_load(self) -> bool:
        return not self.prompt

    def check(self) -> None:
        _no_images(self.images, "images")
        if self.suffix:
            raise invalid(
                "suffix: fill-in-the-middle is not supported by this server "
                "(use the OpenAI or Ollama chat routes)",
                "suffix",
            )
        if self.template:
            raise invalid(
                "template: this server uses the model's own chat template; "
                "send raw: true with a prompt you formatted yourself instead",
                "template",
            )
        if self.context:
            raise invalid(
                "context: this server keeps no /api/generate conversations "
                "(use /api/chat with the messages)",
                "context",
            )

    def template_messages(self) -> list[dict[str, Any]]:
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.prompt})
        return messages
