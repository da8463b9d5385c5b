"""
Anthropic Messages wire shapes: the message body, the stream's events,
the error body.

One L{MessageBuilder} serves both modes, as the other dialects' builders
do: it is the stream's L{StreamRenderer}, keeping the message's blocks as
their events go out, and its C{body} feeds a collected turn through the
same methods and returns the message those blocks make. The message
skeleton (C{message_start}'s and the body's), each block (empty in its
C{content_block_start}, whole in the body), the stop reason and the usage
are each built once, so a streamed message and a plain one cannot
disagree. Pure data and state built from engine results; no I/O.

Field names follow the official C{anthropic} SDK's types
(C{anthropic.types.Message}, C{RawMessageStreamEvent}); the unit tests
validate every body and event against them.

Covered by tests/unit/test_anthropic.py, tests/unit/test_render_agree.py
and, against the official SDK, tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic_core import from_json

from ..._errors import APIError, ContextExceeded
from ..._types import (
    Collected,
    ContentText,
    Finish,
    Stage,
    StreamRenderer,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallEvent,
    ToolCallStart,
    Usage,
    replay,
)
from ..ids import response_id
from ..sse import json_frame
from .schema import ThinkingDisplay

#: Anthropic's own keepalive event (the SDK skips it), offered instead of
#: the SSE comment with C{ServerConfig.anthropic_ping}.
PING = b'event: ping\ndata: {"type": "ping"}\n\n'

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def error_type(error: APIError) -> str:
    """
    Anthropic's error type for an L{APIError}. A full queue, a model
    still loading and a server shutting down all mean "try again shortly":
    Anthropic calls that C{overloaded_error}. Any other server-side failure is C{api_error}.
    """
    if error.code in ("server_busy", "model_not_ready", "server_shutting_down"):
        return "overloaded_error"
    if error.status >= 500:
        return "api_error"
    return _ERROR_TYPES.get(error.status, "invalid_request_error")


def error_body(error: APIError) -> dict[str, Any]:
    message = error.message
    if isinstance(error, ContextExceeded):
        # Anthropic's own words, which its clients match to tell a full
        # context (time to compact the conversation) from other 400s.
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.limit} maximum"
    return {"type": "error", "error": {"type": error_type(error), "message": message}}


StopReason = Literal[
    "end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"
]


def tool_use_id() -> str:
    return response_id("toolu")


def stop_reason(
    finish: Finish, stop_sequences: tuple[str, ...], context_capped: bool
) -> tuple[StopReason, str | None]:
    """
    C{(stop_reason, stop_sequence)} for a finished job.

    A matched stop string is C{stop_sequence} only when it is one of the
    client's; the chat template's end-of-turn string is the model ending
    its turn (C{end_turn}), as an end-of-generation token is. Running out
    of tokens is C{max_tokens}, unless the limit was the context window
    rather than the client's C{max_tokens} (C{context_capped}). A turn
    that ended after complete tool calls is C{tool_use}.
    """
    if finish.reason == "length":
        return ("model_context_window_exceeded" if context_capped else "max_tokens"), None
    if finish.reason == "tool_calls":
        return "tool_use", None
    if finish.stop_sequence is not None and finish.stop_sequence in stop_sequences:
        return "stop_sequence", finish.stop_sequence
    return "end_turn", None


def usage_body(usage: Usage) -> dict[str, Any]:
    """
    Anthropic counts fresh and cached input apart (their sum is the
    prompt): C{input_tokens} excludes what the KV cache reused.
    """
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens_details": {"thinking_tokens": usage.reasoning_tokens},
    }


def signature(thinking: str) -> str:
    """
    A thinking block's C{signature}. Anthropic's is an opaque token that
    lets it verify a block passed back to it; this server drops passed-back
    thinking (as Anthropic drops earlier turns'), so a digest of the text
    is enough: non-empty (clients keep blocks that have one) and stable.
    """
    return hashlib.sha256(thinking.encode()).hexdigest()


def tool_input(arguments: str) -> dict[str, Any]:
    """
    A call's C{input} object. A call cut short (by C{max_tokens}) has
    incomplete JSON: what of it parses is kept, as Anthropic's SDK does
    with a partial C{input_json_delta} stream.
    """
    try:
        value = from_json(arguments, allow_partial=True) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


BlockKind = Literal["thinking", "text", "tool_use"]


@dataclass
class _Block:
    kind: BlockKind
    parts: list[str] = field(default_factory=list)
    #: A C{tool_use} block's call id and tool name.
    id: str = ""
    name: str = ""
    #: Whether a thinking block's text is shown (C{display: "full"}).
    shown: bool = True
    closed: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def body(self) -> dict[str, Any]:
        """
        The block as it stands: empty as it opens (its
        C{content_block_start}), whole once closed (in the body). A
        thinking block is signed when it closes.
        """
        if self.kind == "thinking":
            sig = signature(self.text) if self.closed else ""
            shown = self.text if self.shown else ""
            return {"type": "thinking", "thinking": shown, "signature": sig}
        if self.kind == "text":
            return {"type": "text", "text": self.text}
        return {
            "type": "tool_use",
            "id": self.id,
            "name": self.name,
            "input": tool_input(self.text),
        }


def _event(payload: dict[str, Any]) -> bytes:
    # Anthropic names every event after its payload's type.
    return json_frame(payload, event=payload["type"])


class MessageBuilder:
    """
    One C{/v1/messages} reply: the events of its stream, or its body.

    C{message_start} goes out right after the headers, before the job
    leaves the queue: Anthropic's API and ds4-server both open with it,
    and with C{event: ping} keepalives a client must never see a ping
    before the message it belongs to. (The OpenAI dialect's role chunk
    waits for the prompt to be processed instead, as OpenAI's does; each
    dialect follows its reference.)

    Blocks are opened as text arrives: a C{thinking} block for reasoning
    (its C{signature_delta} goes out just before its C{content_block_stop}),
    then a C{text} block, and a C{tool_use} block per tool call: its
    C{content_block_start} carries the id, the name and an empty
    C{input}, each L{ToolCallArgs} fragment is an C{input_json_delta} as
    the model wrote it, and C{content_block_stop} goes out when the call
    ends (also when C{max_tokens} cut it). A block open before a call is
    closed first. A message with neither text nor a tool call gets an
    empty text block, so C{text_stream} and C{get_final_text} always
    have one to read; one with tool calls and no text has none, as
    Anthropic's own has none. The body is those blocks, whole: thinking,
    text, then one C{tool_use} block per call.

    @param input_tokens: the prompt's size, which C{message_start}
        reports before the prefill splits it into fresh and cached input.
    @param display: how reasoning shows: as C{thinking} blocks with their
        text (C{"full"}), with only their signature (C{"omitted"}), or not
        at all (C{"none"}).
    @param stop_sequences: the client's stop strings (see L{stop_reason}).
    @param context_capped: whether the context window, not the client's
        C{max_tokens}, bounds the turn (see L{stop_reason}).
    """

    def __init__(
        self,
        message_id: str,
        model: str,
        input_tokens: int,
        display: ThinkingDisplay,
        stop_sequences: tuple[str, ...] = (),
        context_capped: bool = False,
    ) -> None:
        self.id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.display = display
        self._stop_sequences = stop_sequences
        self._context_capped = context_capped
        self.blocks: list[_Block] = []
        self._open: _Block | None = None
        self._stop: tuple[StopReason, str | None] = ("end_turn", None)
        self._usage: dict[str, Any] = {}

    def message(
        self,
        content: list[dict[str, Any]],
        stop: tuple[StopReason | None, str | None],
        usage: dict[str, Any],
    ) -> dict[str, Any]:
        """The message object: C{message_start}'s (empty) and the body (whole)."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": usage,
        }

    def stream(self) -> StreamRenderer:
        return self

    def body(self, got: Collected) -> dict[str, Any]:
        """The message of a collected turn (the builder's one use)."""
        replay(self, got)
        return self.message([b.body() for b in self.blocks], self._stop, self._usage)

    def opening(self) -> list[bytes]:
        # Only the prompt's size is known before prefill; message_delta
        # carries the final split into fresh and cached input.
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        return [_event({"type": "message_start", "message": self.message([], (None, None), usage)})]

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        # Hidden reasoning writes nothing: the keepalive covers the silence.
        if self.display == "none":
            return []
        frames = self._enter("thinking")
        self.blocks[-1].parts.append(text)
        if self.display == "full":
            frames.append(self._delta({"type": "thinking_delta", "thinking": text}))
        return frames

    def content(self, delta: ContentText) -> list[bytes]:
        frames = self._enter("text")
        self.blocks[-1].parts.append(delta.text)
        return [*frames, self._delta({"type": "text_delta", "text": delta.text})]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        match event:
            case ToolCallStart(_, name):
                return self._close() + self._start(_Block("tool_use", id=tool_use_id(), name=name))
            case ToolCallArgs(_, text):
                self.blocks[-1].parts.append(text)
                return [self._delta({"type": "input_json_delta", "partial_json": text})]
            case ToolCallEnd(_, arguments):
                # The end carries the whole text (a call broken off by the
                # token budget ends with what was written).
                self.blocks[-1].parts = [arguments]
        return self._close()

    def finish(self, finish: Finish) -> list[bytes]:
        self._stop = stop_reason(finish, self._stop_sequences, self._context_capped)
        self._usage = usage_body(finish.usage)
        said = any(b.kind != "thinking" for b in self.blocks)
        frames = [] if said else self._enter("text")
        frames += self._close()
        delta = {"stop_reason": self._stop[0], "stop_sequence": self._stop[1]}
        frames.append(_event({"type": "message_delta", "delta": delta, "usage": self._usage}))
        frames.append(_event({"type": "message_stop"}))
        return frames

    def error(self, error: APIError) -> list[bytes]:
        # No message_stop after it: the message did not complete.
        return [_event(error_body(error))]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        index = len(self.blocks) - 1
        return _event({"type": "content_block_delta", "index": index, "delta": delta})

    def _enter(self, kind: Literal["thinking", "text"]) -> list[bytes]:
        if self._open is not None and self._open.kind == kind:
            return []
        return self._close() + self._start(_Block(kind, shown=self.display == "full"))

    def _start(self, block: _Block) -> list[bytes]:
        self.blocks.append(block)
        self._open = block
        start = {"type": "content_block_start", "index": len(self.blocks) - 1}
        return [_event({**start, "content_block": block.body()})]

    def _close(self) -> list[bytes]:
        block, self._open = self._open, None
        if block is None:
            return []
        block.closed = True
        frames = []
        if block.kind == "thinking":
            sig = {"type": "signature_delta", "signature": block.body()["signature"]}
            frames.append(self._delta(sig))
        frames.append(_event({"type": "content_block_stop", "index": len(self.blocks) - 1}))
        return frames
