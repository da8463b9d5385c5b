"""
The types every layer shares, below all of them: a job's stage, usage and
finish, and the model's output as one typed event union.

The model thread turns raw token bytes into L{Output} events (reasoning
text, content text, and tool calls as start / argument fragment / end);
each dialect's L{StreamRenderer} turns those into its own frames, and
L{Collector} folds them into one L{Collected} for a non-streaming body.
Nothing here imports another ds4tw module but L{ds4tw._errors}, so the
worker, the text pipeline and the dialects can all import it.

Covered by tests/unit/test_pipeline.py and every dialect's route tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ._errors import APIError


class Stage(StrEnum):
    #: Queued for a model that is still loading (L{ds4tw.Worker.on_demand}).
    LOADING = "loading"
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    #: Completion tokens generated inside a reasoning block.
    reasoning_tokens: int = 0
    #: Where the C{cached_tokens} came from: C{"slot"}, C{"copy"} (another
    #: slot), C{"ram"} or C{"disk"} (the prompt cache); None for none.
    cached_from: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds, measured where the work happens (monotonic clock)."""

    queued: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0


@dataclass
class Finish:
    #: C{"stop"} (end of turn or a stop sequence), C{"length"} (token
    #: budget or context full), or C{"tool_calls"} (the turn ended after
    #: at least one complete tool call).
    reason: str
    usage: Usage
    stop_sequence: str | None = None
    timings: Timings = field(default_factory=Timings)


# -- the model's output, as typed events --------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """One content token's log probability and the most likely alternatives."""

    token: str
    piece: bytes
    logprob: float
    #: C{(token, bytes, logprob)}, most likely first.
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class ReasoningText:
    text: str


@dataclass(frozen=True)
class ContentText:
    text: str
    #: The tokens this text came from, when the request asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallStart:
    """
    The model opened tool call number C{index} (from 0, in this turn) of
    the tool C{name}. Its arguments follow as L{ToolCallArgs} fragments.
    """

    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """
    A fragment of call C{index}'s arguments: the model's own JSON text, as
    written (the fragments concatenate to the arguments object), or, for
    a free-form tool, the raw input text.
    """

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """Call C{index} is complete; C{arguments} is all of its fragments."""

    index: int
    arguments: str


ToolCallEvent = ToolCallStart | ToolCallArgs | ToolCallEnd
Output = ReasoningText | ContentText | ToolCallEvent


class StreamRenderer(Protocol):
    """A dialect's frames for one streamed job."""

    def opening(self) -> list[bytes]:
        """Frames to send right after the headers (may be empty)."""

    def stage(self, stage: Stage) -> list[bytes]: ...

    def reasoning(self, text: str) -> list[bytes]:
        """Reasoning text; a dialect that hides it returns no frames."""

    def content(self, delta: ContentText) -> list[bytes]: ...

    def tool_call(self, event: ToolCallEvent) -> list[bytes]: ...

    def finish(self, finish: Finish) -> list[bytes]: ...

    def error(self, error: APIError) -> list[bytes]: ...


# -- a whole turn, for non-streaming bodies -----------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call: its tool's name and its arguments' JSON text."""

    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class Collected:
    content: str
    reasoning: str
    finish: Finish
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


class Collector:
    """Folds a job's L{Output} events into a L{Collected}."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._names: dict[int, str] = {}
        self._calls: list[ToolCall] = []

    def add(self, event: Output) -> None:
        match event:
            case ReasoningText(text):
                self._reasoning.append(text)
            case ContentText(text, logprobs):
                self._content.append(text)
                self._logprobs.extend(logprobs)
            case ToolCallStart(index, name):
                self._names[index] = name
            case ToolCallEnd(index, arguments):
                self._calls.append(ToolCall(index, self._names[index], arguments))
            case ToolCallArgs():
                pass  # the end event carries the whole text

    def collected(self, finish: Finish) -> Collected:
        return Collected(
            "".join(self._content),
            "".join(self._reasoning),
            finish,
            tuple(self._calls),
            tuple(self._logprobs),
        )


def replay(renderer: StreamRenderer, got: Collected) -> None:
    """
    Feed a collected turn through a stream's renderer, in the order a
    stream produces it (reasoning, the answer, then each call), dropping
    the frames: what a builder's C{body} reads is the state this leaves.
    """
    if got.reasoning:
        renderer.reasoning(got.reasoning)
    if got.content or got.logprobs:
        renderer.content(ContentText(got.content, got.logprobs))
    for call in got.tool_calls:
        renderer.tool_call(ToolCallStart(call.index, call.name))
        renderer.tool_call(ToolCallArgs(call.index, call.arguments))
        renderer.tool_call(ToolCallEnd(call.index, call.arguments))
    renderer.finish(got.finish)
