"""
OpenAI wire shapes: chat.completion(.chunk), text_completion, errors.

One builder per response kind (L{ChatBuilder}, L{CompletionBuilder})
serves both modes, as the Responses dialect's does: it is the stream's
L{StreamRenderer}, keeping the turn's state as its chunks go out, and
its C{body} feeds a collected turn through the very same methods and
assembles the object from that state. The envelope, the choice, a tool
call, the usage and the logprobs are each built by one method for both,
so a streamed reply and a plain one cannot disagree. Pure data and state
built from engine results; no I/O.

Covered by tests/unit/test_openai_routes.py, tests/unit/test_render_agree.py
and, against the official SDK, tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
from ..ids import response_id
from ..sse import frame, json_frame

DONE = frame("[DONE]")


def call_id() -> str:
    return response_id("call")


def logprob_entry(t: TokenLogprob) -> dict[str, Any]:
    """One token of C{choices[].logprobs.content}, OpenAI's chat shape."""
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.piece),
        "top_logprobs": [
            {"token": tok, "logprob": lp, "bytes": list(piece)} for tok, piece, lp in t.top
        ],
    }


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [logprob_entry(t) for t in tokens], "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, alternatives as a mapping."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{tok: lp for tok, _, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def error_body(error: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def tool_call_body(cid: str, name: str, arguments: str) -> dict[str, Any]:
    """A tool call: whole in a message, with empty arguments in its first chunk."""
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


class _Builder:
    """
    What both OpenAI kinds share: the envelope (one C{created} for the
    whole reply, stream or not), the choice, the stream's tail, its error.
    The state a subclass keeps is its C{body}'s only source.
    """

    #: The C{object} of a plain body and of a stream's chunk.
    object = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._tokens: list[TokenLogprob] = []
        self._finish: Finish | None = None

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    @staticmethod
    def choice(
        key: str, value: Any, logprobs: dict[str, Any] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        return {"index": 0, key: value, "logprobs": logprobs, "finish_reason": finish_reason}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return json_frame(self.envelope(self.chunk_object, choices, **extra))

    def opening(self) -> list[bytes]:
        return []

    def error(self, error: APIError) -> list[bytes]:
        # The stream's last frames: the error, then [DONE], so that a
        # client reading to [DONE] ends too (the SDK raises at the error).
        return [json_frame(error_body(error), event="error"), DONE]

    def _tail(self, finish: Finish, last: bytes) -> list[bytes]:
        self._finish = finish
        frames = [last]
        if self.include_usage:
            frames.append(self._chunk([], usage=usage_body(finish.usage)))
        frames.append(DONE)
        return frames

    def _body(self, key: str, value: Any, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        assert self._finish is not None, "replayed to its finish"
        choice = self.choice(key, value, logprobs, self._finish.reason)
        return self.envelope(self.object, [choice], usage=usage_body(self._finish.usage))


@dataclass
class _Call:
    id: str
    name: str
    parts: list[str] = field(default_factory=list)


class ChatBuilder(_Builder):
    """
    One C{/v1/chat/completions} reply: its chunks with C{stream: true},
    its C{chat.completion} body without.

    @param include_usage: whether a stream ends with a usage chunk.
    @param show_reasoning: whether reasoning goes out (as
        C{reasoning_content}); when not, it changes nothing.
    @param logprobs: whether the answer's tokens carry their logprobs.
    """

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        model: str,
        include_usage: bool = False,
        show_reasoning: bool = True,
        logprobs: bool = False,
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self._role_sent = False
        self._show_reasoning = show_reasoning
        self._logprobs = logprobs
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, _Call] = {}

    def _delta(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        return self._chunk([self.choice("delta", delta, logprobs, finish_reason)])

    def stream(self) -> StreamRenderer:
        return self

    def _role(self) -> list[bytes]:
        if self._role_sent:
            return []
        self._role_sent = True
        # No content key, not OpenAI's "": llama.cpp's test client refuses
        # an empty content delta, and the AI SDK's OpenAI provider starts an
        # empty text part for one (in a turn that is only a tool call too).
        # Not null either (llama-server's), which breaks the common
        # delta.get("content", "") (our own tests had five). A delta without
        # content is one every client already meets: the finish chunk's {}.
        # The openai SDK (chunks, and its .stream() accumulator) and the AI
        # SDK read it as no text.
        return [self._delta({"role": "assistant"})]

    def stage(self, stage: Stage) -> list[bytes]:
        # The role chunk goes out when the prompt is processed, as in
        # OpenAI's and ds4-server's streams.
        return self._role() if stage is Stage.DECODE else []

    def reasoning(self, text: str) -> list[bytes]:
        # Hidden reasoning writes nothing: the keepalive covers the silence.
        if not self._show_reasoning:
            return []
        self._reasoning.append(text)
        return [*self._role(), self._delta({"reasoning_content": text})]

    def content(self, delta: ContentText) -> list[bytes]:
        self._content.append(delta.text)
        logprobs = None
        if self._logprobs:
            self._tokens += delta.logprobs
            logprobs = chat_logprobs(delta.logprobs)
        return [*self._role(), self._delta({"content": delta.text}, logprobs=logprobs)]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        """
        The call's id, type and name go out first, then its arguments as
        the model writes them, in OpenAI's C{delta.tool_calls} shape.
        """
        match event:
            case ToolCallStart(index, name):
                call = self._calls[index] = _Call(call_id(), name)
                head = {"index": index, **tool_call_body(call.id, name, "")}
                return [*self._role(), self._delta({"tool_calls": [head]})]
            case ToolCallArgs(index, text):
                self._calls[index].parts.append(text)
                part = {"index": index, "function": {"arguments": text}}
                return [self._delta({"tool_calls": [part]})]
            case ToolCallEnd(index, arguments):
                # The end carries the whole text (a call broken off by the
                # token budget ends with what was written).
                self._calls[index].parts = [arguments]
        return []

    def finish(self, finish: Finish) -> list[bytes]:
        return self._role() + self._tail(finish, self._delta({}, finish.reason))

    def body(self, got: Collected) -> dict[str, Any]:
        """The C{chat.completion} of a collected turn (the builder's one use)."""
        replay(self, got)
        content = "".join(self._content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._calls:
            message["content"] = content or None
            message["tool_calls"] = [
                tool_call_body(c.id, c.name, "".join(c.parts)) for c in self._calls.values()
            ]
        logprobs = chat_logprobs(self._tokens) if self._logprobs else None
        return self._body("message", message, logprobs)


class CompletionBuilder(_Builder):
    """
    One C{/v1/completions} reply: its chunks with C{stream: true}, its
    C{text_completion} body without.

    @param include_usage: whether a stream ends with a usage chunk.
    @param logprobs: whether the text's tokens carry their logprobs.
    """

    object = chunk_object = "text_completion"

    def __init__(
        self, request_id: str, model: str, include_usage: bool = False, logprobs: bool = False
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self._logprobs = logprobs
        self._text: list[str] = []
        self._offset = 0

    def _choice(
        self,
        text: str,
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        return self._chunk([self.choice("text", text, logprobs, finish_reason)])

    def stream(self) -> StreamRenderer:
        return self

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        return []  # completions never split reasoning out (see routes)

    def content(self, delta: ContentText) -> list[bytes]:
        self._text.append(delta.text)
        logprobs = None
        if self._logprobs:
            self._tokens += delta.logprobs
            logprobs = completion_logprobs(delta.logprobs, self._offset)
        self._offset += len(delta.text)
        return [self._choice(delta.text, logprobs=logprobs)]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        return []  # completions offer no tools

    def finish(self, finish: Finish) -> list[bytes]:
        return self._tail(finish, self._choice("", finish.reason))

    def body(self, got: Collected) -> dict[str, Any]:
        """The C{text_completion} of a collected turn (the builder's one use)."""
        replay(self, got)
        logprobs = completion_logprobs(self._tokens) if self._logprobs else None
        return self._body("text", "".join(self._text), logprobs)


def model_card(
    model_id: str,
    created: int,
    n_ctx: int,
    *,
    kind: str = "chat",
    state: str = "ready",
    aliases: Sequence[str] = (),
    alias_of: str | None = None,
) -> dict[str, Any]:
    """
    A model in OpenAI's shape; C{meta} says what ds4tw knows of it (its
    context, whether it is loaded now, the names that reach it).
    """
    meta: dict[str, Any] = {
        "n_ctx": n_ctx,
        "kind": kind,
        "loaded": state == "ready",
        "state": state,
        "aliases": list(aliases),
    }
    if alias_of is not None:
        meta["alias_of"] = alias_of
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "ds4tw",
        "meta": meta,
    }
