"""
OpenAI Responses wire shapes: the response object, its output items, and
the stream events that build it, in the shapes the official C{openai} SDK
parses (C{openai.types.responses}).

One L{ResponseBuilder} serves both modes, so a streamed response and a
non-streamed one cannot disagree: it keeps the output items as text
arrives and returns, for every change, the stream events announcing it.
L{ResponsesStream} numbers and frames those events for a stream (every
event carries C{sequence_number}, from 0, with no gaps); the non-streaming
route feeds the builder the collected text and discards the events.

Output items appear as their text arrives: a C{reasoning} item (its
C{content} is the reasoning text; C{summary} is always empty, as this
server writes no summaries) while the model thinks and the client may see
it, then a C{message} item for the answer. A response with no text at all
still gets one empty message, so C{output} is never empty.

Pure data and state built from engine results; no I/O.

Covered by tests/unit/test_responses.py and, against the official SDK,
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import APIError
from .._sse import json_frame
from .._types import Collected, ContentText, Finish, Stage, ToolCallEvent, Usage

ItemKind = Literal["reasoning", "message"]
Event = dict[str, Any]


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # ds4tw has no billed prompt-cache writes to report.
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def text_part(kind: ItemKind, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class _Item:
    kind: ItemKind
    id: str
    output_index: int
    parts: list[str] = field(default_factory=list)
    status: str = "in_progress"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def body(self, with_content: bool = True) -> dict[str, Any]:
        content = [text_part(self.kind, self.text)] if with_content else []
        if self.kind == "reasoning":
            return {
                "type": "reasoning",
                "id": self.id,
                "summary": [],
                "content": content,
                "status": self.status,
            }
        return {
            "type": "message",
            "id": self.id,
            "status": self.status,
            "role": "assistant",
            "content": content,
        }

    def where(self) -> dict[str, Any]:
        """The fields locating this item's (only) content part."""
        return {"item_id": self.id, "output_index": self.output_index, "content_index": 0}


class ResponseBuilder:
    """
    One response as it is generated. Each method updates the state and
    returns the (unnumbered) stream events that announce the change.

    @param echo: the request settings the response object repeats
        (L{ds4tw._responses.schema.ResponsesRequest.echo}).
    @param show_reasoning: whether reasoning becomes an output item; when
        it does not, reasoning text changes nothing (and a stream stays
        silent but for its keepalive).
    """

    def __init__(
        self, response_id: str, created_at: int, echo: dict[str, Any], show_reasoning: bool
    ) -> None:
        self.id = response_id
        self._suffix = response_id.removeprefix("resp_")
        self.created_at = created_at
        self._echo = echo
        self._show_reasoning = show_reasoning
        self.items: list[_Item] = []
        self._open: _Item | None = None
        self.status = "in_progress"
        self._usage: Usage | None = None
        self._incomplete: dict[str, str] | None = None
        self._error: dict[str, str] | None = None
        self._completed_at: int | None = None

    def response(self) -> dict[str, Any]:
        """The response object as it stands."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": self._completed_at,
            "error": self._error,
            "incomplete_details": self._incomplete,
            **self._echo,
            "output": [item.body() for item in self.items],
            "usage": None if self._usage is None else usage_body(self._usage),
        }

    def created(self) -> list[Event]:
        return [
            {"type": "response.created", "response": self.response()},
            {"type": "response.in_progress", "response": self.response()},
        ]

    def text(self, kind: ItemKind, text: str) -> list[Event]:
        """
        More text of C{kind}. A change of kind closes the open item and
        opens the next one (reasoning, then the answer), so every item is
        announced, filled and finished in order, as the SDK requires.
        """
        if not text or (kind == "reasoning" and not self._show_reasoning):
            return []
        events: list[Event] = []
        if self._open is None or self._open.kind != kind:
            events += self._close("completed")
            events += self._start(kind)
        item = self._open
        assert item is not None
        item.parts.append(text)
        if kind == "message":
            delta: Event = {"type": "response.output_text.delta", **item.where(), "delta": text}
            delta["logprobs"] = []
        else:
            delta = {"type": "response.reasoning_text.delta", **item.where(), "delta": text}
        events.append(delta)
        return events

    def finish(self, finish: Finish) -> list[Event]:
        """
        Close the open item and end with C{response.completed}, or with
        C{response.incomplete} when the token budget ran out (the open
        item is then C{incomplete} too).
        """
        incomplete = finish.reason == "length"
        status = "incomplete" if incomplete else "completed"
        events = self._close(status)
        if not self.items:
            # Nothing was said: still one (empty) message.
            events += self._start("message") + self._close(status)
        self.status = status
        self._usage = finish.usage
        if incomplete:
            self._incomplete = {"reason": "max_output_tokens"}
        else:
            self._completed_at = int(time.time())
        events.append({"type": f"response.{status}", "response": self.response()})
        return events

    def fail(self, error: APIError) -> list[Event]:
        """
        The generation failed after the stream began: an C{error} event
        (OpenAI's mid-stream error shape), then C{response.failed}, the
        terminal event, whose response says what went wrong.
        """
        if self._open is not None:
            self._open.status = "incomplete"
            self._open = None
        self.status = "failed"
        self._error = {
            "code": "server_error" if error.status >= 500 else "invalid_prompt",
            "message": error.message,
        }
        return [
            {
                "type": "error",
                "code": error.code or error.type,
                "message": error.message,
                "param": error.param,
            },
            {"type": "response.failed", "response": self.response()},
        ]

    # -- items -----------------------------------------------------------

    def _start(self, kind: ItemKind) -> list[Event]:
        index = len(self.items)
        prefix = "rs" if kind == "reasoning" else "msg"
        item = _Item(kind, f"{prefix}_{self._suffix}_{index}", index)
        self.items.append(item)
        self._open = item
        return [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": item.body(with_content=False),
            },
            {"type": "response.content_part.added", **item.where(), "part": text_part(kind, "")},
        ]

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        if item.kind == "message":
            done: Event = {
                "type": "response.output_text.done",
                **item.where(),
                "text": item.text,
                "logprobs": [],
            }
        else:
            done = {"type": "response.reasoning_text.done", **item.where(), "text": item.text}
        return [
            done,
            {
                "type": "response.content_part.done",
                **item.where(),
                "part": text_part(item.kind, item.text),
            },
            {
                "type": "response.output_item.done",
                "output_index": item.output_index,
                "item": item.body(),
            },
        ]


class ResponsesStream:
    """
    The L{ds4tw._turn.StreamRenderer} of C{/v1/responses} with
    C{stream: true}: named SSE events (C{event: <type>}), numbered from 0.
    """

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self._sequence = 0

    def _frames(self, events: list[Event]) -> list[bytes]:
        frames = []
        for event in events:
            payload = {"type": event["type"], "sequence_number": self._sequence, **event}
            self._sequence += 1
            frames.append(json_frame(payload, event=event["type"]))
        return frames

    def opening(self) -> list[bytes]:
        # Right after the headers, even while queued: the client has its
        # response id at once.
        return self._frames(self.builder.created())

    def stage(self, stage: Stage) -> list[bytes]:
        return []  # the keepalive comments name the stage

    def reasoning(self, text: str) -> list[bytes]:
        return self._frames(self.builder.text("reasoning", text))

    def content(self, delta: ContentText) -> list[bytes]:
        return self._frames(self.builder.text("message", delta.text))

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        return []

    def finish(self, finish: Finish) -> list[bytes]:
        return self._frames(self.builder.finish(finish))

    def error(self, error: APIError) -> list[bytes]:
        return self._frames(self.builder.fail(error))


def response_body(builder: ResponseBuilder, got: Collected) -> dict[str, Any]:
    """The non-streamed response: the builder fed the collected text."""
    builder.text("reasoning", got.reasoning)
    builder.text("message", got.content)
    builder.finish(got.finish)
    return builder.response()
