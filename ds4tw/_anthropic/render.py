"""
Anthropic Messages wire shapes: the message body, the stream's events,
the error body. Pure functions of engine results; no I/O.

Field names follow the official C{anthropic} SDK's types
(C{anthropic.types.Message}, C{RawMessageStreamEvent}); the unit tests
validate every body and event against them.

Covered by tests/unit/test_anthropic.py and, against the official SDK,
tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic_core import from_json

from .._errors import APIError, ContextExceeded
from .._sse import json_frame
from .._types import (
    Collected,
    ContentText,
    Finish,
    Stage,
    ToolCall,
    ToolCallArgs,
    ToolCallEvent,
    ToolCallStart,
    Usage,
)
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
    return f"toolu_{uuid.uuid4().hex[:24]}"


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


def thinking_block(thinking: str, display: ThinkingDisplay) -> dict[str, Any]:
    shown = thinking if display == "full" else ""
    return {"type": "thinking", "thinking": shown, "signature": signature(thinking)}


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


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": tool_use_id(),
        "name": call.name,
        "input": tool_input(call.arguments),
    }


def message(
    message_id: str,
    model: str,
    got: Collected,
    display: ThinkingDisplay,
    stop: tuple[StopReason, str | None],
) -> dict[str, Any]:
    """
    The non-streaming response body: thinking, text, then one
    C{tool_use} block per call. A reply that is only tool calls has no
    text block, as Anthropic's has none; any other has one, even empty.
    """
    content: list[dict[str, Any]] = []
    if got.reasoning and display != "none":
        content.append(thinking_block(got.reasoning, display))
    if got.content or not got.tool_calls:
        content.append({"type": "text", "text": got.content})
    content += [tool_use_block(c) for c in got.tool_calls]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": usage_body(got.finish.usage),
    }


def _event(payload: dict[str, Any]) -> bytes:
    # Anthropic names every event after its payload's type.
    return json_frame(payload, event=payload["type"])


class MessageStream:
    """
    The events of one C{/v1/messages} stream.

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
    Anthropic's own has none.

    @param stop: maps the job's L{Finish} to C{(stop_reason, stop_sequence)}.
    """

    def __init__(
        self,
        message_id: str,
        model: str,
        input_tokens: int,
        display: ThinkingDisplay,
        stop: Callable[[Finish], tuple[StopReason, str | None]],
    ) -> None:
        self.id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.display = display
        self._stop = stop
        self._open: Literal["thinking", "text", "tool_use"] | None = None
        self._index = -1
        self._text_seen = False
        self._calls_seen = False
        self._thinking: list[str] = []

    def opening(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Only the prompt's size is known before prefill; message_delta
            # carries the final split into fresh and cached input.
            "usage": {
                "input_tokens": self.input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return [_event({"type": "message_start", "message": message})]

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        # Hidden reasoning writes nothing: the keepalive covers the silence.
        if self.display == "none":
            return []
        self._thinking.append(text)
        frames = self._enter("thinking")
        if self.display == "full":
            frames.append(self._delta({"type": "thinking_delta", "thinking": text}))
        return frames

    def content(self, delta: ContentText) -> list[bytes]:
        return [*self._enter("text"), self._delta({"type": "text_delta", "text": delta.text})]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        if isinstance(event, ToolCallStart):
            self._calls_seen = True
            frames = self._close()
            self._index += 1
            self._open = "tool_use"
            block = {"type": "tool_use", "id": tool_use_id(), "name": event.name, "input": {}}
            frames.append(
                _event(
                    {"type": "content_block_start", "index": self._index, "content_block": block}
                )
            )
            return frames
        if isinstance(event, ToolCallArgs):
            return [self._delta({"type": "input_json_delta", "partial_json": event.text})]
        return self._close()

    def finish(self, finish: Finish) -> list[bytes]:
        stop_reason, stop_sequence = self._stop(finish)
        frames = [] if self._text_seen or self._calls_seen else self._enter("text")
        frames += self._close()
        frames.append(
            _event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage_body(finish.usage),
                }
            )
        )
        frames.append(_event({"type": "message_stop"}))
        return frames

    def error(self, error: APIError) -> list[bytes]:
        # No message_stop after it: the message did not complete.
        return [_event(error_body(error))]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event({"type": "content_block_delta", "index": self._index, "delta": delta})

    def _enter(self, kind: Literal["thinking", "text"]) -> list[bytes]:
        if self._open == kind:
            return []
        frames = self._close()
        self._index += 1
        self._open = kind
        block: dict[str, Any]
        if kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            self._text_seen = True
            block = {"type": "text", "text": ""}
        frames.append(
            _event({"type": "content_block_start", "index": self._index, "content_block": block})
        )
        return frames

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        frames = []
        if self._open == "thinking":
            sig = signature("".join(self._thinking))
            frames.append(self._delta({"type": "signature_delta", "signature": sig}))
        frames.append(_event({"type": "content_block_stop", "index": self._index}))
        self._open = None
        return frames
