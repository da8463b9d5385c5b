"""
Test doubles for ds4tw and for applications that embed it (as
C{treq.testing} is for treq): a scripted engine, a worker thread that a
test advances one engine step at a time, and an in-memory HTTP exchange
with a controllable clock.

    engine = ScriptedEngine(["Hello there."])
    threads = SteppedThreads()
    clock = Clock()
    server = Server(engine, ServerConfig(keepalive=15), clock=clock, threads=threads)
    server.startService()
    http = HTTPHarness(server.resource(), clock)
    exchange = http.post("/v1/chat/completions", {...})
    clock.advance(15)          # a ": queued" / ": prefill" / ": decode" frame
    threads.step()             # one engine step (a prefill batch or a token)
    exchange.disconnect()      # connectionLost: the job is cancelled

Nothing here sleeps or opens a socket.

Covered by every unit test (through tests/unit/conftest.py) and, for its
public names, tests/unit/test_exports.py.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from ._engine.embed import ScriptedEmbedder
from ._engine.scripted import Reply, ScriptedEngine
from ._server.http import DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT, LimitedSite

__all__ = [
    "Exchange",
    "HTTPHarness",
    "Reply",
    "ScriptedEmbedder",
    "ScriptedEngine",
    "SteppedThreads",
]

_T = TypeVar("_T")


class SteppedThreads:
    """
    A L{ds4tw._runtime.worker.WorkerThreads} with no threads: model-thread work
    runs only when the test calls L{step}, one engine step of the batch loop per step, and
    "from the model thread to the reactor" calls happen inline.
    """

    def __init__(self) -> None:
        #: The batch loops on the "model thread", stepped in turn (several
        #: models share one thread: L{ds4tw._runtime.modelthread}).
        self._loops: deque[tuple[Iterator[None], Deferred[None]]] = deque()
        self.steps_taken = 0
        #: While True, L{call} work (a model's load or unload) waits in
        #: L{called} until L{release_calls}; otherwise it runs inline.
        self.hold_calls = False
        self.called: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.stopped = False
        #: While True, L{offload} work (chat templating, tokenization) waits
        #: in L{offloaded} until L{release}; otherwise it runs inline.
        self.hold_offload = False
        self.offloaded: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def start(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if self.hold_calls:
            d: Deferred[_T] = Deferred()
            self.called.append((lambda: f(*args), d))
            return d
        return _now(f, *args)

    def release_calls(self, n: int | None = None) -> None:
        """Run the first C{n} held calls (all by default), in order."""
        count = len(self.called) if n is None else n
        held, self.called = self.called[:count], self.called[count:]
        for work, d in held:
            _now(work).chainDeferred(d)

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if not self.hold_offload:
            return _now(f, *args)
        # Like deferToThreadPool's Deferred: no canceller (the work cannot
        # be stopped; a cancelled caller just stops waiting for it).
        d: Deferred[_T] = Deferred()
        self.offloaded.append((lambda: f(*args), d))
        return d

    def release(self) -> None:
        """Run the held offload work, in order, and fire each caller's Deferred."""
        held, self.offloaded = self.offloaded, []
        for work, d in held:
            _now(work).chainDeferred(d)

    def run(self, steps: Iterator[None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._loops.append((steps, d))
        return d

    def to_reactor(self, f: Callable[..., object], *args: Any) -> None:
        f(*args)

    @property
    def busy(self) -> bool:
        """A job is on the model thread."""
        return bool(self._loops)

    def step(self, n: int = 1) -> None:
        """
        Let the model thread take C{n} engine steps (across jobs). With
        several models' loops, each step is the next loop's, in turn.
        """
        for _ in range(n):
            if not self._loops:
                return
            steps, d = self._loops.popleft()
            try:
                next(steps)
                self.steps_taken += 1
            except StopIteration:
                d.callback(None)
            except BaseException:
                d.errback(Failure())
            else:
                self._loops.append((steps, d))

    def run_until_idle(self, limit: int = 100_000) -> None:
        """Step until no job is on the model thread (including queued ones it picks up)."""
        for _ in range(limit):
            if not self._loops:
                return
            self.step()
        raise AssertionError(f"still busy after {limit} steps")


def _now(f: Callable[..., _T], *args: Any) -> Deferred[_T]:
    try:
        return succeed(f(*args))
    except BaseException:
        return fail(Failure())


class Exchange:
    """One HTTP request on its own in-memory connection."""

    def __init__(self, site: Site, raw: bytes) -> None:
        self.transport = StringTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        if raw:
            self.channel.dataReceived(raw)
        self.lost = False

    def send(self, data: bytes) -> None:
        """More bytes from the client (the rest of a body, say)."""
        self.channel.dataReceived(data)

    @property
    def closed(self) -> bool:
        """The server closed (or is closing) the connection."""
        return bool(self.transport.disconnecting)

    def pause(self) -> None:
        """The client stops reading: the transport's buffer is full."""
        producer: Any = self.transport.producer
        producer.pauseProducing()

    def resume(self) -> None:
        """The client reads again: the transport's buffer drained."""
        producer: Any = self.transport.producer
        producer.resumeProducing()

    @property
    def raw(self) -> bytes:
        """Everything written so far, as on the wire."""
        return bytes(self.transport.value())

    def _split(self) -> tuple[bytes, bytes]:
        raw = self.raw
        head, sep, body = raw.partition(b"\r\n\r\n")
        return (head, body) if sep else (raw, b"")

    @property
    def headers_sent(self) -> bool:
        return b"\r\n\r\n" in self.raw

    @property
    def status(self) -> int:
        head = self._split()[0]
        return int(head.split(b" ", 2)[1]) if head else 0

    def header(self, name: str) -> str | None:
        for line in self._split()[0].split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode()
        return None

    @property
    def body(self) -> bytes:
        """The body so far, with chunked framing removed."""
        head, data = self._split()
        if b"transfer-encoding: chunked" not in head.lower():
            return data
        out = b""
        while data:
            size_line, sep, rest = data.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0 or len(rest) < size:
                break
            out += rest[:size]
            data = rest[size + 2 :]
        return out

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def finished(self) -> bool:
        """The response is complete (last chunk or full body written)."""
        head, data = self._split()
        if b"transfer-encoding: chunked" in head.lower():
            return data.endswith(b"0\r\n\r\n")
        length = self.header("content-length")
        return length is not None and len(data) >= int(length)

    def events(self) -> list[tuple[str | None, str]]:
        """The SSE frames so far: (event name or None, data); comments as ("comment", text)."""
        frames: list[tuple[str | None, str]] = []
        for block in self.body.decode().split("\n\n"):
            if not block:
                continue
            event, data = None, []
            for line in block.split("\n"):
                if line.startswith(":"):
                    frames.append(("comment", line[1:].strip()))
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
            if data:
                frames.append((event, "\n".join(data)))
        return frames

    def comments(self) -> list[str]:
        return [d for e, d in self.events() if e == "comment"]

    def data(self) -> list[Any]:
        """Decoded JSON of each data frame (C{[DONE]} as the string)."""
        out = []
        for e, d in self.events():
            if e == "comment":
                continue
            out.append(d if d == "[DONE]" else json.loads(d))
        return out

    def lines(self) -> list[Any]:
        """
        Decoded JSON of each complete line of a newline-delimited JSON
        body so far (Ollama's streams). A blank line fails, as it fails
        a client that parses every line.
        """
        return [json.loads(line) for line in self.body.split(b"\n")[:-1]]

    def disconnect(self) -> None:
        """The client goes away (connectionLost)."""
        self.lost = True
        self.transport.loseConnection()
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))


class HTTPHarness:
    """
    Drives a resource through twisted.web's real HTTP parser, in memory.

    With C{max_body_bytes} or C{request_timeout}, the site is a
    L{ds4tw._server.http.LimitedSite} (as C{twistd ds4tw} serves), the other limit
    at its default; otherwise a plain L{Site} with no timeout.
    """

    def __init__(
        self,
        resource: IResource,
        clock: Clock | None = None,
        *,
        max_body_bytes: int | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.site: Site
        if max_body_bytes is None and request_timeout is None:
            self.site = Site(resource, reactor=self.clock)
            self.site.timeOut = None
        else:
            self.site = LimitedSite(
                resource,
                max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                request_timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT,
                reactor=self.clock,
            )

    def connect(self, raw: bytes = b"") -> Exchange:
        """A connection that has sent C{raw} so far (send more with L{Exchange.send})."""
        return Exchange(self.site, raw)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Exchange:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return Exchange(self.site, raw)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Exchange:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> Exchange:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, body, h)
