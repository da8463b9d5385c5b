"""
OpenAI wire shapes: chat.completion(.chunk), text_completion, errors.
Pure functions of engine results; no I/O.

Covered by tests/unit/test_openai_routes.py and, against the official
SDK, tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from .._errors import APIError
from .._sse import frame, json_frame
from .._types import (
    Collected,
    ContentText,
    Finish,
    Stage,
    TokenLogprob,
    ToolCallArgs,
    ToolCallEvent,
    ToolCallStart,
    Usage,
)

DONE = frame("[DONE]")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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


class _Base:
    object = ""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return json_frame(
            {
                "id": self.id,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            }
        )

    def opening(self) -> list[bytes]:
        return []

    def error(self, error: APIError) -> list[bytes]:
        # The stream's last frames: the error, then [DONE], so that a
        # client reading to [DONE] ends too (the SDK raises at the error).
        return [json_frame(error_body(error), event="error"), DONE]

    def _tail(self, finish: Finish, last: bytes) -> list[bytes]:
        frames = [last]
        if self.include_usage:
            frames.append(self._chunk([], usage=usage_body(finish.usage)))
        frames.append(DONE)
        return frames


class ChatStream(_Base):
    """Chunks of C{/v1/chat/completions} with C{stream: true}."""

    object = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        model: str,
        include_usage: bool,
        show_reasoning: bool = True,
        logprobs: bool = False,
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self._role_sent = False
        self._show_reasoning = show_reasoning
        self._logprobs = logprobs
        self._call_ids: dict[int, str] = {}

    def _delta(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        )

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
        return [*self._role(), self._delta({"reasoning_content": text})]

    def content(self, delta: ContentText) -> list[bytes]:
        logprobs = chat_logprobs(delta.logprobs) if self._logprobs else None
        return [*self._role(), self._delta({"content": delta.text}, logprobs=logprobs)]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        """
        The call's id, type and name go out first, then its arguments as
        the model writes them, in OpenAI's C{delta.tool_calls} shape.
        """
        if isinstance(event, ToolCallStart):
            cid = self._call_ids[event.index] = call_id()
            head = {
                "index": event.index,
                "id": cid,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return [*self._role(), self._delta({"tool_calls": [head]})]
        if isinstance(event, ToolCallArgs):
            part = {"index": event.index, "function": {"arguments": event.text}}
            return [self._delta({"tool_calls": [part]})]
        return []

    def finish(self, finish: Finish) -> list[bytes]:
        return self._role() + self._tail(finish, self._delta({}, finish.reason))


class CompletionStream(_Base):
    """Chunks of C{/v1/completions} with C{stream: true}."""

    object = "text_completion"

    def __init__(
        self, request_id: str, model: str, include_usage: bool, logprobs: bool = False
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self._logprobs = logprobs
        self._offset = 0

    def _choice(
        self,
        text: str,
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        return self._chunk(
            [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
        )

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        return []  # completions never split reasoning out (see routes)

    def content(self, delta: ContentText) -> list[bytes]:
        logprobs = None
        if self._logprobs:
            logprobs = completion_logprobs(delta.logprobs, self._offset)
        self._offset += len(delta.text)
        return [self._choice(delta.text, logprobs=logprobs)]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        return []  # completions offer no tools

    def finish(self, finish: Finish) -> list[bytes]:
        return self._tail(finish, self._choice("", finish.reason))


def chat_completion(
    request_id: str,
    model: str,
    got: Collected,
    show_reasoning: bool,
    logprobs: bool = False,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": got.content}
    if got.reasoning and show_reasoning:
        message["reasoning_content"] = got.reasoning
    if got.tool_calls:
        message["content"] = got.content or None
        message["tool_calls"] = [
            {
                "id": call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in got.tool_calls
        ]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(got.logprobs) if logprobs else None,
                "finish_reason": got.finish.reason,
            }
        ],
        "usage": usage_body(got.finish.usage),
    }


def completion(
    request_id: str, model: str, got: Collected, logprobs: bool = False
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": got.content,
                "logprobs": completion_logprobs(got.logprobs) if logprobs else None,
                "finish_reason": got.finish.reason,
            }
        ],
        "usage": usage_body(got.finish.usage),
    }


def model_card(model_id: str, created: int, n_ctx: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "ds4tw",
        "meta": {"n_ctx": n_ctx},
    }
