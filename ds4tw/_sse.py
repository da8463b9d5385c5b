"""
Server-sent events on a twisted.web request, and the keepalive.

The keepalive is a per-stream L{LoopingCall} with interval K that writes
an SSE comment frame naming what the server is doing (C{: queued},
C{: prefill}, C{: decode}). Every real write calls L{LoopingCall.reset},
which pushes the next keepalive to K seconds after that write; so a busy
stream carries no comments at all and an idle one is never silent longer
than K, whatever the reason for the silence (waiting in the queue, a long
prefill, hidden reasoning, held-back stop-sequence bytes).

A write to a connection that is gone ends the turn: the stream marks
itself closed and calls C{on_lost}, which cancels the job.

Covered by tests/unit/test_keepalive.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

log = Logger()

SSE_HEADERS: dict[bytes, bytes] = {
    b"content-type": b"text/event-stream; charset=utf-8",
    b"cache-control": b"no-cache",
    # nginx buffers proxied responses unless told not to; a buffered
    # keepalive keeps nothing alive.
    b"x-accel-buffering": b"no",
}


def frame(data: str, event: str | None = None) -> bytes:
    """One SSE frame. C{data} must not contain newlines (JSON never does)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def json_frame(payload: Any, event: str | None = None) -> bytes:
    return frame(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event)


class SSEStream:
    """
    An open SSE response: headers out at once, frames as they come, a
    keepalive while nothing else is written.

    @param stage: names the current stage for the comment frame.
    @param keepalive_frame: builds the keepalive bytes from the stage name;
        the default is the SSE comment C{": <stage>\\n\\n"}. (Anthropic's
        dialect can send C{event: ping} instead.)
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        keepalive: float,
        stage: Callable[[], str],
        on_lost: Callable[[], None],
        keepalive_frame: Callable[[str], bytes] | None = None,
        on_keepalive: Callable[[str], None] | None = None,
    ) -> None:
        self._request = request
        self._stage = stage
        self._on_lost = on_lost
        self._frame = keepalive_frame or (lambda s: f": {s}\n\n".encode())
        self._on_keepalive = on_keepalive
        self._keepalive: LoopingCall | None = None
        if keepalive > 0:
            self._keepalive = LoopingCall(self._beat)
            self._keepalive.clock = clock
        self._interval = keepalive
        self.open = False
        self.bytes_written = 0

    def start(self) -> None:
        """Send the status line and headers now, and start the keepalive."""
        for name, value in SSE_HEADERS.items():
            self._request.setHeader(name, value)
        self._request.notifyFinish().addErrback(self._lost)
        self.open = True
        # An empty write flushes the headers without writing a chunk.
        self._request.write(b"")
        if self._keepalive is not None:
            self._keepalive.start(self._interval, now=False)

    def write(self, data: bytes) -> None:
        """A real write: send it and restart the idle interval."""
        if not self.open:
            return
        self._send(data)
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.reset()

    def close(self) -> None:
        """The stream is complete; stop the keepalive. Idempotent."""
        self.open = False
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()

    def _beat(self) -> None:
        stage = self._stage()
        self._send(self._frame(stage))
        if self._on_keepalive is not None:
            self._on_keepalive(stage)

    def _send(self, data: bytes) -> None:
        try:
            self._request.write(data)
        except Exception:
            # twisted.web raises once the request is gone; that is a
            # disconnect, whatever the stage.
            log.debug("ds4tw: write failed; ending the stream")
            self._lost(Failure())
            return
        self.bytes_written += len(data)

    def _lost(self, reason: Failure) -> None:
        if not self.open:
            return
        self.close()
        self._on_lost()
