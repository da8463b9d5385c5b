"""
OpenAI wire shapes: chat.completion(.chunk), text_completion, errors.
Pure functions of engine results; no I/O.

Covered by tests/unit/test_openai_routes.py and, against the official
SDK, tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import time
from typing import Any

from .._errors import APIError
from .._sse import frame, json_frame
from .._worker import Finish, Stage, Usage

DONE = frame("[DONE]")


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
        return [json_frame(error_body(error), event="error")]

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
        self, request_id: str, model: str, include_usage: bool, show_reasoning: bool = True
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self._role_sent = False
        self._show_reasoning = show_reasoning

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def _role(self) -> list[bytes]:
        if self._role_sent:
            return []
        self._role_sent = True
        return [self._delta({"role": "assistant", "content": ""})]

    def stage(self, stage: Stage) -> list[bytes]:
        # The role chunk goes out when the prompt is processed, as in
        # OpenAI's and ds4-server's streams.
        return self._role() if stage is Stage.DECODE else []

    def reasoning(self, text: str) -> list[bytes]:
        # Hidden reasoning writes nothing: the keepalive covers the silence.
        if not self._show_reasoning:
            return []
        return [*self._role(), self._delta({"reasoning_content": text})]

    def content(self, text: str) -> list[bytes]:
        return [*self._role(), self._delta({"content": text})]

    def finish(self, finish: Finish) -> list[bytes]:
        return self._role() + self._tail(finish, self._delta({}, finish.reason))


class CompletionStream(_Base):
    """Chunks of C{/v1/completions} with C{stream: true}."""

    object = "text_completion"

    def _choice(self, text: str, finish_reason: str | None = None) -> bytes:
        return self._chunk(
            [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        )

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        return []  # completions never split reasoning out (see routes)

    def content(self, text: str) -> list[bytes]:
        return [self._choice(text)]

    def finish(self, finish: Finish) -> list[bytes]:
        return self._tail(finish, self._choice("", finish.reason))


def chat_completion(
    request_id: str, model: str, text: str, reasoning: str | None, finish: Finish
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish.reason,
            }
        ],
        "usage": usage_body(finish.usage),
    }


def completion(request_id: str, model: str, text: str, finish: Finish) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}],
        "usage": usage_body(finish.usage),
    }


def model_card(model_id: str, created: int, n_ctx: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "ds4tw",
        "meta": {"n_ctx": n_ctx},
    }
