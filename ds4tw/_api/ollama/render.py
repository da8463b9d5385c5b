"""
Ollama's wire shapes: C{/api/chat} and C{/api/generate} chunks and
bodies, the keepalive chunk, the error line.

A stream is newline-delimited JSON (L{ds4tw._api.sse.NDJSON}): every
line one object, C{done: false} until the last, which carries Ollama's
counters (durations in nanoseconds). As the other dialects' builders do,
one L{TurnBuilder} serves both modes: it is the stream's renderer, and
its C{body} replays a collected turn through the same methods, so a
streamed answer and a plain one cannot disagree.

The keepalive (L{TurnBuilder.keepalive}) is a chunk with empty content
and C{done: false}, the form Ollama itself sends while its tool-call
parser holds text back: its clients (the C{ollama} Python and JS
libraries, LangChain, Open WebUI) parse every line as JSON, and an empty
chunk adds nothing to the text they join. A blank line or an SSE comment
would break them.

Tool calls go out whole when complete, in a chunk of their own, with
their arguments as an object (Ollama's own shape). Reasoning goes to
C{thinking} unless the request said C{think: false}.

Covered by tests/unit/test_ollama.py and, with the official C{ollama}
library, tests/integration/test_ollama_sdk.py.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from ..._errors import APIError, ModelNotFound
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
    replay,
)
from ..ids import response_id

#: Ollama's C{done_reason}s by ds4tw's finish reasons: a turn that ended in
#: tool calls ended at the model's own stop.
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}

Kind = Literal["chat", "generate"]


def rfc3339(when: datetime) -> str:
    """C{when} (aware, UTC) as Ollama writes its timestamps: RFC 3339, microseconds, C{Z}."""
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def created_at() -> str:
    """Now, as Ollama writes it."""
    return rfc3339(datetime.now(UTC))


def line(payload: Any) -> bytes:
    """One NDJSON line."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_body(error: APIError) -> dict[str, Any]:
    """Ollama's error: one field, the message (a missing model in Ollama's words)."""
    if isinstance(error, ModelNotFound):
        return {"error": f"model '{error.name}' not found"}
    return {"error": error.message}


def nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _logprob(t: TokenLogprob) -> dict[str, Any]:
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.piece),
        "top_logprobs": [
            {"token": tok, "logprob": lp, "bytes": list(piece)} for tok, piece, lp in t.top
        ],
    }


def _arguments(text: str) -> Any:
    """A call's arguments as the object Ollama sends (the model's text if it is not one)."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text


class TurnBuilder:
    """
    One C{/api/chat} (C{kind="chat"}) or C{/api/generate} answer.

    @param model: the name the request used.
    @param started: C{time.monotonic()} when the request's handler began,
        for C{total_duration}.
    @param show_thinking: reasoning goes out as C{thinking}; else it is dropped.
    @param logprobs: the content carries its tokens' log probabilities.
    """

    def __init__(
        self,
        kind: Kind,
        model: str,
        started: float,
        show_thinking: bool = True,
        logprobs: bool = False,
    ) -> None:
        self.kind = kind
        self.model = model
        self.started = started
        self._show_thinking = show_thinking
        self._logprobs = logprobs
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._tokens: list[TokenLogprob] = []
        self._names: dict[int, str] = {}
        self._calls: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None

    # -- the pieces both modes share ----------------------------------------

    def _chunk(
        self,
        content: str = "",
        thinking: str = "",
        calls: list[dict[str, Any]] | None = None,
        done: bool = False,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        return out

    def keepalive(self, _stage: str) -> bytes:
        """The chunk that keeps a stream alive: no text, not done."""
        return line(self._chunk())

    # -- StreamRenderer --------------------------------------------------------

    def stream(self) -> StreamRenderer:
        return self

    def opening(self) -> list[bytes]:
        return []

    def stage(self, stage: Stage) -> list[bytes]:
        return []

    def reasoning(self, text: str) -> list[bytes]:
        if not self._show_thinking or not text:
            return []
        self._thinking.append(text)
        return [line(self._chunk(thinking=text))]

    def content(self, delta: ContentText) -> list[bytes]:
        self._content.append(delta.text)
        chunk = self._chunk(delta.text)
        if self._logprobs:
            self._tokens.extend(delta.logprobs)
            chunk["logprobs"] = [_logprob(t) for t in delta.logprobs]
        elif not delta.text:
            return []
        return [line(chunk)]

    def tool_call(self, event: ToolCallEvent) -> list[bytes]:
        match event:
            case ToolCallStart(index, name):
                self._names[index] = name
            case ToolCallEnd(index, arguments):
                call = {
                    "id": response_id("call"),
                    "function": {
                        "index": index,
                        "name": self._names[index],
                        "arguments": _arguments(arguments),
                    },
                }
                self._calls.append(call)
                return [line(self._chunk(calls=[call]))]
            case ToolCallArgs():
                pass  # a call goes out whole, as Ollama sends it
        return []

    def finish(self, finish: Finish) -> list[bytes]:
        usage, timings = finish.usage, finish.timings
        final = self._chunk(done=True)
        final.update(
            done_reason=DONE_REASONS.get(finish.reason, finish.reason),
            total_duration=nanoseconds(time.monotonic() - self.started),
            load_duration=nanoseconds(timings.queued),
            prompt_eval_count=usage.prompt_tokens,
            prompt_eval_duration=nanoseconds(timings.prefill),
            eval_count=usage.completion_tokens,
            eval_duration=nanoseconds(timings.decode),
        )
        self._final = final
        return [line(final)]

    def error(self, error: APIError) -> list[bytes]:
        # The stream's last line; Ollama's clients raise on it.
        return [line(error_body(error))]

    # -- one body ----------------------------------------------------------------

    def body(self, got: Collected) -> dict[str, Any]:
        """The whole answer of a collected turn (the builder's one use)."""
        replay(self, got)
        assert self._final is not None, "replayed to its finish"
        whole = self._chunk("".join(self._content), "".join(self._thinking), self._calls, done=True)
        whole.update({k: v for k, v in self._final.items() if k not in whole})
        if self._logprobs:
            whole["logprobs"] = [_logprob(t) for t in self._tokens]
        return whole


def loaded_body(kind: Kind, model: str, reason: Literal["load", "unload"]) -> dict[str, Any]:
    """The answer to Ollama's load (or unload) request: done, nothing said."""
    builder = TurnBuilder(kind, model, time.monotonic())
    body = builder._chunk(done=True)
    body["done_reason"] = reason
    return body
