"""
Server-sent events on a twisted.web request (or newline-delimited JSON,
for Ollama's dialect: L{Framing}), the keepalive, and the stream's end,
whichever way it comes.

The keepalive is a per-stream L{LoopingCall} with interval K that writes
an SSE comment frame naming what the server is doing (C{: queued},
C{: prefill}, C{: decode}). Every real write calls L{LoopingCall.reset},
which pushes the next keepalive to K seconds after that write; so a busy
stream carries no comments at all and an idle one is never silent longer
than K, whatever the reason for the silence (waiting in the queue, a long
prefill, hidden reasoning, held-back stop-sequence bytes).

Every way a stream can be left meets in L{SSEStream.lost}, which stops
the keepalive and calls C{on_lost} (which cancels the job) once: the
connection closing (C{notifyFinish} errbacks, or the channel calls
C{stopProducing}), Klein cancelling the route's Deferred (the turn's
canceller calls L{SSEStream.lost}), and a client that stopped reading
while more than C{max_unsent} bytes piled up. A write to a connection
that is gone is dropped by twisted.web and followed by its connectionLost
(the first signal); a write after the stream finished is a bug, and
raises.

Back-pressure: the stream is a push producer registered with the request.
When the transport's buffer is full twisted.web calls L{pauseProducing};
frames are then held here (the model thread is never paused: there is one,
and other requests share it) up to C{max_unsent} bytes, and sent on
L{resumeProducing}. Past the bound the job is cancelled
(C{client not reading}) and the connection aborted. No keepalive is
written while paused: the client is not reading what is already buffered,
so one more frame would only add to it, and the TCP connection itself is
alive.

Progress, for a client that asks (C{X-DS4TW-Progress: 1}, L{wants_progress};
the chat page does): the same comments also on every stage change and,
while the text changes, at most once per L{PROGRESS_INTERVAL}, with
numbers (L{progress_text}): C{: queued 2} (place in the queue, 1 is
next), C{: prefill 1024/3641} (prompt tokens in the KV cache, of all),
C{: decode}. Its keepalives carry the numbers too. Other streams are
untouched: a busy stream carries no comments, and a keepalive is the bare
stage name, which clients and ds4tw's own benchmark match exactly.
docs/ui.md has the format.

NDJSON (L{NDJSON}) has no comment lines, and its clients parse every line
as JSON: such a stream's keepalive is a frame of the dialect's own that
its clients ignore (an empty chunk), given by the answer's renderer, and
it carries no progress comments.

Covered by tests/unit/test_keepalive.py, tests/unit/test_cancel.py and
tests/unit/test_ollama.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from .._types import Stage
from .host import ServerConfig

if TYPE_CHECKING:
    from .._runtime.job import Job

log = Logger()

DEFAULT_MAX_UNSENT = ServerConfig.max_unsent_bytes
NOT_READING = "client not reading"
DISCONNECTED = "client disconnected"

SSE_HEADERS: dict[bytes, bytes] = {
    b"content-type": b"text/event-stream; charset=utf-8",
    b"cache-control": b"no-cache",
    # nginx buffers proxied responses unless told not to; a buffered
    # keepalive keeps nothing alive.
    b"x-accel-buffering": b"no",
}

NDJSON_HEADERS: dict[bytes, bytes] = {
    # Ollama's own content type for its streams.
    b"content-type": b"application/x-ndjson",
    b"cache-control": b"no-cache",
    b"x-accel-buffering": b"no",
}


@dataclass(frozen=True)
class Framing:
    """
    How a dialect's streams look on the wire.

    @param headers: the response's headers, sent before the first frame.
    @param comments: the format has comment frames (SSE does): the
        default keepalive and progress comments are possible. Without
        them a stream needs a keepalive frame of the dialect's own.
    """

    headers: Mapping[bytes, bytes]
    comments: bool = True


#: Server-sent events: the OpenAI, Responses and Anthropic dialects.
SSE = Framing(SSE_HEADERS)
#: Newline-delimited JSON: Ollama's dialect.
NDJSON = Framing(NDJSON_HEADERS, comments=False)


#: The request header that opts a stream into progress comments.
PROGRESS_HEADER = b"x-ds4tw-progress"
#: Seconds between two progress comments, at least (stage changes aside).
PROGRESS_INTERVAL = 1.0


def wants_progress(request: Request) -> bool:
    """The client asked for progress comments (C{X-DS4TW-Progress: 1})."""
    value = request.getHeader(PROGRESS_HEADER)
    return value is not None and value.strip() == b"1"


def progress_text(job: Job) -> str:
    """
    What an opted-in stream's comment says about C{job}: C{loading 40%},
    C{queued 2},
    C{prefill 1024/3641} or C{decode}. Never more than the stage name and
    two numbers, so a client can parse it with one split.

    A job that has a slot says C{prefill 0/N} even in the moment before
    the model thread takes it up (its stage is still C{queued} until then,
    and its place in the queue gone): the wait is for the engine step in
    progress, not for the queue.
    """
    stage = job.stage
    if stage is Stage.LOADING:
        return f"loading {job.load_percent}%"
    if stage is Stage.QUEUED:
        position = job.queue_position
        if position is not None:
            return f"queued {position}"
        stage = Stage.PREFILL
    if stage is Stage.PREFILL:
        return f"prefill {job.prefill_done}/{job.prefill_total}"
    return Stage.DECODE.value


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def frame(data: str, event: str | None = None) -> bytes:
    """One SSE frame. C{data} must not contain newlines (JSON never does)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def json_frame(payload: Any, event: str | None = None) -> bytes:
    return frame(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event)


@implementer(IPushProducer)
class SSEStream:
    """
    An open SSE response: headers out at once, frames as they come, a
    keepalive while nothing else is written.

    @param stage: names the current stage for the comment frame.
    @param on_lost: called once if the stream ends before L{close}
        (L{lost_reason} says why).
    @param keepalive_frame: builds the keepalive bytes from the stage name
        (or the progress text); the default is the SSE comment
        C{": <stage>\\n\\n"}. (Anthropic's dialect can send C{event: ping}
        instead.)
    @param on_keepalive: called with the stage name after each keepalive
        (never the progress text: a metric label must stay bounded).
    @param max_unsent: bytes held for a paused client before giving up on it.
    @param progress: the progress text (L{progress_text}), for a client
        that asked for it; None for every other stream.
    @param framing: the stream's headers, and whether it has comments
        (without them, a C{keepalive_frame} is required).
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
        max_unsent: int = DEFAULT_MAX_UNSENT,
        progress: Callable[[], str] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        framing: Framing = SSE,
    ) -> None:
        if not framing.comments and (keepalive_frame is None or progress is not None):
            raise ValueError("a stream without comments needs a keepalive frame and no progress")
        self._request = request
        self._headers = framing.headers
        self._stage = stage
        self._on_lost = on_lost
        self._frame = keepalive_frame or comment
        #: The keepalive frame says the progress text (not a ping).
        self._frame_tells = keepalive_frame is None
        self._on_keepalive = on_keepalive
        self._progress = progress
        #: The progress text last written, so that only a change is sent.
        self._told: str | None = None
        self._progress_call: LoopingCall | None = None
        if progress is not None:
            self._progress_call = LoopingCall(self.report_progress)
            self._progress_call.clock = clock
        self._progress_interval = progress_interval
        self._keepalive: LoopingCall | None = None
        if keepalive > 0:
            self._keepalive = LoopingCall(self._beat)
            self._keepalive.clock = clock
        self._interval = keepalive
        self._max_unsent = max_unsent
        self._held: list[bytes] = []
        self.held_bytes = 0
        self._registered = False
        #: Started, and neither closed nor lost.
        self.open = False
        #: L{close} was called: a later write is a bug.
        self.finished = False
        #: Why the stream was lost (None while it was not).
        self.lost_reason: str | None = None
        self.paused = False
        self.bytes_written = 0

    def start(self) -> None:
        """Send the status line and headers now, and start the keepalive."""
        for name, value in self._headers.items():
            self._request.setHeader(name, value)
        self._request.notifyFinish().addErrback(lambda _: self.lost(DISCONNECTED))
        self.open = True
        self._request.registerProducer(self, True)
        self._registered = True
        # An empty write flushes the headers without writing a chunk.
        self._request.write(b"")
        if self._keepalive is not None:
            self._keepalive.start(self._interval, now=False)
        if self._progress_call is not None:
            # The client hears where it stands at once (": queued 3").
            self.report_progress()
            self._progress_call.start(self._progress_interval, now=False)

    def report_progress(self) -> None:
        """
        Write the progress comment now if its text changed since the last
        one (a stage change calls this; so does the per-interval poll).
        A no-op for a stream that did not ask for progress.
        """
        if self._progress is None or not self.open or self.paused:
            return
        text = self._progress()
        if text == self._told:
            return
        self._told = text
        self._send(comment(text))
        self._reset()
        if self._progress_call is not None and self._progress_call.running:
            # Progress at most once per interval: the next poll is a whole
            # interval after this comment.
            self._progress_call.reset()

    def write(self, data: bytes) -> None:
        """A real write: send it (or hold it while paused) and restart the idle interval."""
        if self.finished:
            raise RuntimeError("SSEStream.write after the stream finished")
        if self.lost_reason is not None:
            return  # frames still in flight for a cancelled job
        if not self.open:
            raise RuntimeError("SSEStream.write before start")
        if self.paused:
            self._held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > self._max_unsent:
                log.info(
                    "ds4tw: {n} bytes unsent to a client that stopped reading "
                    "(more than {bound}); cancelling",
                    n=self.held_bytes,
                    bound=self._max_unsent,
                )
                self.lost(NOT_READING)
            return
        self._send(data)
        self._reset()

    def close(self) -> None:
        """The stream is complete: send what is held, stop the keepalive. Idempotent."""
        if self.open:
            self._flush()
            self.open = False
        self.finished = True
        self._stop()
        self._unregister()

    def lost(self, reason: str) -> None:
        """
        The stream ends before it is complete: the one place every way of
        leaving meets. Calls C{on_lost} once; a no-op after L{close}.
        """
        if self.finished or self.lost_reason is not None:
            return
        self.lost_reason = reason
        self.open = False
        self._held, self.held_bytes = [], 0
        self._stop()
        self._unregister()
        if reason == NOT_READING:
            channel = self._request.channel
            if channel is not None and channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]
        self._on_lost()

    # IPushProducer, called by twisted.web as the transport's buffer fills and drains.

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.open and self._held:
            self._flush()
            self._reset()

    def stopProducing(self) -> None:
        self.lost(DISCONNECTED)

    def _flush(self) -> None:
        held, self._held, self.held_bytes = self._held, [], 0
        for data in held:
            self._send(data)

    def _reset(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.reset()

    def _stop(self) -> None:
        for call in (self._keepalive, self._progress_call):
            if call is not None and call.running:
                call.stop()

    def _unregister(self) -> None:
        # After a disconnect the request has no channel left to unregister from.
        if self._registered and self._request.channel is not None:
            self._request.unregisterProducer()
        self._registered = False

    def _beat(self) -> None:
        if self.paused:
            return
        stage = self._stage()
        if self._progress is not None:
            text = self._progress()
            self._send(self._frame(text))
            if self._frame_tells:
                self._told = text
        else:
            self._send(self._frame(stage))
        if self._on_keepalive is not None:
            self._on_keepalive(stage)

    def _send(self, data: bytes) -> None:
        # No try/except: twisted.web drops writes to a connection that is
        # gone (its connectionLost follows), and raises for a write after
        # finish, which is a bug to see, not a disconnect.
        self._request.write(data)
        self.bytes_written += len(data)
