"""
The client side of a streamed HTTP response, from timed socket reads.

Every measurement in the benchmark is a list of C{(time, bytes)} socket
reads; this module turns them into the HTTP status, the body, and SSE
events, each stamped with the time of the read that completed it. It is
pure (no sockets, no clock) so that the timing logic is unit-tested on
hand-made byte streams, and incremental so that a client can decide to
hang up in the middle of a stream (the cancel measurements).

Both servers answer with chunked transfer encoding; ds4tw ends SSE lines
with C{\\n}, llama_cpp.server (sse-starlette) too; C{\\r\\n} is accepted.

Covered by tests/unit/test_bench.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["comment", "data"]


@dataclass(frozen=True)
class SSEEvent:
    """
    A comment line (C{": queued"}) as soon as the line is complete, or a
    data event at its terminating blank line.
    """

    t: float
    kind: EventKind
    text: str
    event: str | None = None


class ChunkedDecoder:
    """Incremental HTTP/1.1 chunked transfer decoding."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # data bytes left in the current chunk
        self._state: Literal["size", "data", "crlf", "trailer", "done"] = "size"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bytes:
        """The body bytes carried by C{data} (possibly none yet)."""
        self._buf += data
        out = bytearray()
        while self._buf and self._state != "done":
            if self._state == "size":
                line, sep, rest = self._buf.partition(b"\r\n")
                if not sep:
                    break
                self._buf = rest
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left, self._state = size, "data"
            elif self._state == "data":
                take = self._buf[: self._left]
                out += take
                self._buf = self._buf[len(take) :]
                self._left -= len(take)
                if self._left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    break
                self._buf = self._buf[2:]
                self._state = "size"
            else:  # trailer: header lines until an empty one
                line, sep, rest = self._buf.partition(b"\r\n")
                if not sep:
                    break
                self._buf = rest
                if not line:
                    self._state = "done"
        return bytes(out)


class SSEParser:
    """Incremental SSE: comment lines at once, data events at the blank line."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, t: float, data: bytes) -> list[SSEEvent]:
        self._buf += data
        out: list[SSEEvent] = []
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if not sep:
                return out
            self._buf = rest
            text = line.rstrip(b"\r").decode("utf-8", errors="replace")
            if not text:
                if self._data:
                    out.append(SSEEvent(t, "data", "\n".join(self._data), self._event))
                self._data, self._event = [], None
            elif text.startswith(":"):
                out.append(SSEEvent(t, "comment", text[1:].strip()))
            else:
                name, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    self._data.append(value)
                elif name == "event":
                    self._event = value


@dataclass
class ResponseReader:
    """
    One HTTP response read incrementally: L{feed} each socket read with
    its time; the status, headers, events and completion follow.
    """

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    #: Time of the read that completed the status line and headers.
    head_t: float | None = None
    events: list[SSEEvent] = field(default_factory=list)
    #: Every read, as (time, length): the byte-arrival timeline.
    reads: list[tuple[float, int]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    #: (time, body length after that read) for every read that carried body
    #: bytes: when any byte of the body arrived, whatever its framing (an
    #: NDJSON line's time is that of the read that completed it).
    body_ends: list[tuple[float, int]] = field(default_factory=list)
    complete: bool = False
    _head: bytes = b""
    _chunked: ChunkedDecoder | None = None
    _length: int | None = None
    _sse: SSEParser = field(default_factory=SSEParser)

    def feed(self, t: float, data: bytes) -> list[SSEEvent]:
        """Add one read; returns the SSE events it completed."""
        self.reads.append((t, len(data)))
        if self.head_t is None:
            self._head += data
            head, sep, rest = self._head.partition(b"\r\n\r\n")
            if not sep:
                return []
            self._parse_head(head)
            self.head_t = t
            self._head = b""
            data = rest
        if self._chunked is not None:
            body = self._chunked.feed(data)
            if self._chunked.done:
                self.complete = True
        else:
            body = data
            if self._length is not None and len(self.body) + len(body) >= self._length:
                self.complete = True
        self.body += body
        if body:
            self.body_ends.append((t, len(self.body)))
        new = self._sse.feed(t, body)
        self.events.extend(new)
        return new

    def eof(self) -> None:
        """The server closed the connection (ends a body without framing)."""
        if self.head_t is not None and self._chunked is None and self._length is None:
            self.complete = True

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = ChunkedDecoder()
        elif "content-length" in self.headers:
            self._length = int(self.headers["content-length"])
            if self._length == 0:
                self.complete = True


# -- OpenAI stream content -------------------------------------------------


def payload(event: SSEEvent) -> Any:
    """The JSON of a data event, or None (comments, [DONE], non-JSON)."""
    if event.kind != "data" or event.text == "[DONE]":
        return None
    try:
        return json.loads(event.text)
    except ValueError:
        return None


def delta_text(event: SSEEvent) -> tuple[str, str] | None:
    """
    C{(kind, text)} of an OpenAI completion or chat chunk that carries
    generated text (kind C{"content"} or C{"reasoning"}), else None.
    """
    body = payload(event)
    if not isinstance(body, dict):
        return None
    choices = body.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    text = choice.get("text")
    if isinstance(text, str) and text:
        return ("content", text)
    delta = choice.get("delta") or {}
    if isinstance(delta, dict):
        for key, kind in (("content", "content"), ("reasoning_content", "reasoning")):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return (kind, value)
    return None


def text_times(events: list[SSEEvent], kind: str | None = "content") -> list[float]:
    """Arrival times of the events that carry generated text of C{kind} (any if None)."""
    out = []
    for e in events:
        got = delta_text(e)
        if got is not None and (kind is None or got[0] == kind):
            out.append(e.t)
    return out


def finish_reason(events: list[SSEEvent]) -> str | None:
    for e in reversed(events):
        body = payload(e)
        if isinstance(body, dict):
            for choice in body.get("choices") or []:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    return str(choice["finish_reason"])
    return None


def usage(events: list[SSEEvent]) -> dict[str, Any] | None:
    for e in reversed(events):
        body = payload(e)
        if isinstance(body, dict) and isinstance(body.get("usage"), dict):
            return dict(body["usage"])
    return None


def saw_done(events: list[SSEEvent]) -> bool:
    return any(e.kind == "data" and e.text == "[DONE]" for e in events)


def comments(events: list[SSEEvent]) -> list[str]:
    return [e.text for e in events if e.kind == "comment"]
