"""
OpenAI Responses wire shapes: the response object, its output items, and
the stream events that build it, in the shapes the official C{openai} SDK
parses (C{openai.types.responses}).

One L{ResponseBuilder} serves both modes, as the other dialects' builders
do, so a streamed response and a non-streamed one cannot disagree: it
keeps the output items as output arrives and returns, for every change,
the stream events announcing it. Its C{stream} is a L{ResponsesStream},
which numbers and frames those events (every event carries
C{sequence_number}, from 0, with no gaps); its C{body} feeds the
collected output through that same stream, drops the frames, and returns
the response object the last event would carry.

Output items appear as their output arrives: a C{reasoning} item (its
C{content} is the reasoning text; C{summary} is always empty, as this
server writes no summaries) while the model thinks and the client may see
it, a C{message} item for the answer, and one item per tool call: a
C{function_call} (its arguments streamed as the model writes them) or a
C{custom_tool_call} (a free-form tool: its input is announced whole, once
decoded). An open item is finished before the next one opens. A response
with no output at all still gets one empty message, so C{output} is never
empty.

Logprobs, when the request includes C{message.output_text.logprobs}: each
C{response.output_text.delta} carries its tokens' entries, and the
message's C{output_text} part all of them.

Pure data and state built from engine results; no I/O.

Covered by tests/unit/test_responses.py, tests/unit/test_responses_tools.py,
tests/unit/test_render_agree.py and, against the official SDK,
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..._errors import APIError
from ..._types import (
    Collected,
    ContentText,
    Finish,
    Stage,
    StreamRenderer,
    TokenLogprob,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallEvent,
    ToolCallStart,
    Usage,
    replay,
)
from ..openai.render import logprob_entry
from ..sse import json_frame

TextKind = Literal["reasoning", "message"]
ItemKind = Literal["reasoning", "message", "function_call", "custom_tool_call"]
Event = dict[str, Any]

_PREFIX: dict[ItemKind, str] = {
    "reasoning": "rs",
    "message": "msg",
    "function_call": "fc",
    "custom_tool_call": "ctc",
}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # ds4tw has no billed prompt-cache writes to report.
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def delta_logprob(t: TokenLogprob) -> dict[str, Any]:
    """One token in a C{response.output_text.delta} (the SDK's shape has no bytes)."""
    return {
        "token": t.token,
        "logprob": t.logprob,
        "top_logprobs": [{"token": tok, "logprob": lp} for tok, _, lp in t.top],
    }


def text_part(kind: TextKind, text: str, logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {
        "type": "output_text",
        "text": text,
        "annotations": [],
        "logprobs": [logprob_entry(t) for t in logprobs],
    }


@dataclass
class _Item:
    kind: ItemKind
    id: str
    output_index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: str = "in_progress"
    #: A call's tool name and call id, and its tool's namespace if any.
    name: str = ""
    call_id: str = ""
    namespace: str = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def is_call(self) -> bool:
        return self.kind in ("function_call", "custom_tool_call")

    def part(self) -> dict[str, Any]:
        assert self.kind in ("reasoning", "message")
        kind: TextKind = "reasoning" if self.kind == "reasoning" else "message"
        return text_part(kind, self.text, self.logprobs)

    def body(self, with_content: bool = True) -> dict[str, Any]:
        head = {"type": self.kind, "id": self.id}
        if self.namespace:
            head["namespace"] = self.namespace
        if self.kind == "function_call":
            return {
                **head,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": self.text,
                "status": self.status,
            }
        if self.kind == "custom_tool_call":
            # The SDK's custom_tool_call item has no status field.
            return {**head, "call_id": self.call_id, "name": self.name, "input": self.text}
        content = [self.part()] if with_content else []
        if self.kind == "reasoning":
            return {**head, "summary": [], "content": content, "status": self.status}
        return {**head, "status": self.status, "role": "assistant", "content": content}

    def where(self) -> dict[str, Any]:
        """The fields locating this item (and its only content part, if it has one)."""
        if self.is_call:
            return {"item_id": self.id, "output_index": self.output_index}
        return {"item_id": self.id, "output_index": self.output_index, "content_index": 0}


class ResponseBuilder:
    """
    One response as it is generated. Each method updates the state and
    returns the (unnumbered) stream events that announce the change.

    @param echo: the request settings the response object repeats
        (L{ds4tw._api.responses.schema.ResponsesRequest.echo}).
    @param show_reasoning: whether reasoning becomes an output item; when
        it does not, reasoning text changes nothing (and a stream stays
        silent but for its keepalive).
    @param tool_kinds: each offered tool's kind by name (C{"function"} or
        C{"custom"}): which item its calls become.
    @param namespaces: C{(namespace, name)} of each namespace member, by
        the qualified name the model calls it by: its call items carry
        the two apart (Codex routes a call by both).
    @param logprobs: whether the request included the output's logprobs.
    """

    def __init__(
        self,
        response_id: str,
        echo: dict[str, Any],
        show_reasoning: bool,
        tool_kinds: Mapping[str, str] | None = None,
        logprobs: bool = False,
        namespaces: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self.id = response_id
        self._suffix = response_id.removeprefix("resp_")
        self.created_at = int(time.time())
        self._echo = echo
        self._show_reasoning = show_reasoning
        self._tool_kinds = dict(tool_kinds or {})
        self._namespaces = dict(namespaces or {})
        self._logprobs = logprobs
        self.items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self.status = "in_progress"
        self._usage: Usage | None = None
        self._incomplete: dict[str, str] | None = None
        self._error: dict[str, str] | None = None
        self._completed_at: int | None = None

    def stream(self) -> StreamRenderer:
        return ResponsesStream(self)

    def body(self, got: Collected) -> dict[str, Any]:
        """The response to a collected turn (the builder's one use)."""
        replay(self.stream(), got)
        return self.response()

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

    def text(self, kind: TextKind, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[Event]:
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
            shown = list(logprobs) if self._logprobs else []
            item.logprobs += shown
            delta: Event = {"type": "response.output_text.delta", **item.where(), "delta": text}
            delta["logprobs"] = [delta_logprob(t) for t in shown]
        else:
            delta = {"type": "response.reasoning_text.delta", **item.where(), "delta": text}
        events.append(delta)
        return events

    def tool_call(self, event: ToolCallEvent) -> list[Event]:
        """
        A call opens its own item (closing any open text item), streams its
        arguments (a function's, as the model writes them) and is finished
        when it ends.
        """
        match event:
            case ToolCallStart(index, name):
                events = self._close("completed")
                custom = self._tool_kinds.get(name) == "custom"
                kind: ItemKind = "custom_tool_call" if custom else "function_call"
                call_id = f"call_{self._suffix[:20]}_{index}"
                namespace, name = self._namespaces.get(name, ("", name))
                events += self._start(kind, name, call_id, namespace)
                assert self._open is not None
                self._calls[index] = self._open
                return events
            case ToolCallArgs(index, text):
                item = self._calls[index]
                item.parts.append(text)
                field = (
                    "function_call_arguments"
                    if item.kind == "function_call"
                    else ("custom_tool_call_input")
                )
                return [{"type": f"response.{field}.delta", **item.where(), "delta": text}]
            case ToolCallEnd(index, arguments):
                item = self._calls[index]
                # The end carries the whole text (a call broken off by the
                # token budget ends with what was written).
                item.parts = [arguments]
                return self._close("completed")
        return []

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

    def _start(
        self, kind: ItemKind, name: str = "", call_id: str = "", namespace: str = ""
    ) -> list[Event]:
        index = len(self.items)
        item_id = f"{_PREFIX[kind]}_{self._suffix}_{index}"
        item = _Item(kind, item_id, index, name=name, call_id=call_id, namespace=namespace)
        self.items.append(item)
        self._open = item
        added: Event = {
            "type": "response.output_item.added",
            "output_index": index,
            "item": item.body(with_content=False),
        }
        if item.is_call:
            return [added]
        return [added, {"type": "response.content_part.added", **item.where(), "part": item.part()}]

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        done_item: Event = {
            "type": "response.output_item.done",
            "output_index": item.output_index,
            "item": item.body(),
        }
        if item.kind == "function_call":
            done = {"type": "response.function_call_arguments.done", **item.where()}
            return [{**done, "arguments": item.text}, done_item]
        if item.kind == "custom_tool_call":
            done = {"type": "response.custom_tool_call_input.done", **item.where()}
            return [{**done, "input": item.text}, done_item]
        if item.kind == "message":
            done = {"type": "response.output_text.done", **item.where(), "text": item.text}
            done["logprobs"] = [logprob_entry(t) for t in item.logprobs]
        else:
            done = {"type": "response.reasoning_text.done", **item.where(), "text": item.text}
        part_done = {"type": "response.content_part.done", **item.where(), "part": item.part()}
        return [done, part_done, done_item]


class ResponsesStream:
    """
    The L{ds4tw._types.StreamRenderer} of C{/v1/responses} with
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
        return self._frames(self.builder.text("message", delta.text, delta.logprobs))

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        return self._frames(self.builder.tool_call(event))

    def finish(self, finish: Finish) -> list[bytes]:
        return self._frames(self.builder.finish(finish))

    def error(self, error: APIError) -> list[bytes]:
        return self._frames(self.builder.fail(error))
