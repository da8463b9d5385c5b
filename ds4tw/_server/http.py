"""
Limits that twisted.web cannot apply from inside a resource: it reads the
whole request body before any resource sees the request, and its idle
timeout resets on every byte, so a client that announces a huge body, or
dribbles its headers a byte at a time, is waited for. L{LimitedSite} is a
L{twisted.web.server.Site} whose connections refuse such requests at the
transport level:

  - a C{Content-Length} over C{max_body_bytes} gets 413 as soon as the
    headers are parsed, before a byte of the body is read (and before any
    C{100 Continue}); a chunked body is cut off with 413 at the same bound;
  - headers over twisted.web's limits (a line of 16 KB, 16 KB in all,
    500 headers) get 431 (414 for the request line), and what it cannot
    parse a JSON 400, where twisted.web drops the connection without a
    word or answers a bare 400;
  - a request must arrive whole (request line, headers, body) within
    C{request_timeout} seconds of the connection opening or of the
    previous response ending, or the connection is closed (408 if part of
    a request had arrived). The clock stops while a request is being
    handled, so a long stream is never touched by it.

The refusals are written by the connection, not by a dialect, so their
JSON body satisfies both error shapes: OpenAI's C{error.message/type/code}
and Anthropic's C{type: "error"} with C{error.type/message}. Each carries
an C{X-Request-Id} (the client's, when its headers had arrived) and is
logged in one line naming it, as the app's own errors are.

C{twistd ds4tw} serves through it; an embedder can too:

    site = LimitedSite(resource, max_body_bytes=1 << 20, request_timeout=30)

At shutdown, once the ports are closed, L{LimitedSite.close_connections}
closes the open connections without cutting a request or a response
short (the reactor's own shutdown drops them all at once, which a proxy
in front answers with a 502).

Connections speak HTTP/1.1 only (no HTTP/2 negotiation over TLS ALPN,
which plain twisted.web offers when the C{h2} package is installed).

Covered by tests/unit/test_limits.py, tests/unit/test_connections.py,
tests/integration/test_limits.py and tests/integration/test_twistd.py.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from .._api.host import ServerConfig
from .._api.ids import header_text, new_request_id, one_line, sane

log = Logger()

DEFAULT_MAX_BODY_BYTES = ServerConfig.max_body_bytes
DEFAULT_REQUEST_TIMEOUT = ServerConfig.request_timeout
#: At shutdown (L{LimitedSite.close_connections}): seconds in which open
#: connections still get answers, then seconds for responses to finish.
CLOSE_SETTLE = 0.5
CLOSE_GRACE = 5.0

# -- refusals --------------------------------------------------------------

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}
_KINDS = {
    400: "invalid_request_error",
    408: "request_timeout",
    413: "request_too_large",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
}


def refusal(status: int, message: str, request_id: str) -> bytes:
    """
    A whole HTTP/1.1 response that closes the connection, with a JSON error
    body and the C{X-Request-Id} its log line names.
    """
    kind = _KINDS[status]
    body = json.dumps(
        {
            "type": "error",
            "error": {"message": message, "type": kind, "param": None, "code": kind},
        }
    ).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-request-id: %s\r\nconnection: close\r\n\r\n"
        % (status, _REASONS[status], len(body), request_id.encode())
    )
    return head + body


class LimitedChannel(HTTPChannel):
    """An HTTP/1.1 connection that applies its L{LimitedSite}'s limits."""

    _deadline: IDelayedCall | None = None
    #: Bytes of the next request have arrived since the deadline was armed.
    _partial = False
    #: A refusal was written; everything else the client sends is dropped.
    refused = False

    def _limit(self, name: str, default: Any) -> Any:
        return getattr(getattr(self, "site", None), name, default)

    @property
    def _site(self) -> LimitedSite | None:
        """The site, when it is a L{LimitedSite} (it tracks its connections)."""
        site = getattr(self, "site", None)
        return site if isinstance(site, LimitedSite) else None

    def connectionMade(self) -> None:
        super().connectionMade()
        if (site := self._site) is not None:
            site.channels.add(self)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if data:
            self._partial = True
        super().dataReceived(data)

    # twisted.web's header limits (a line of MAX_LENGTH bytes, totalHeadersSize
    # bytes in all, maxHeaders headers) drop the connection without a word (a
    # line too long) or answer a bare 400: answered here with the status that
    # says which, in JSON, and logged.

    def _in_request_line(self) -> bool:
        # HTTPChannel sets _command once it has parsed a request line, and
        # deletes it when the request has arrived whole.
        return getattr(self, "_command", None) is None

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_request_line():
            self.refuse(414, f"the request line is longer than {self.MAX_LENGTH} bytes")
        else:
            self.refuse(431, f"a request header line is longer than {self.MAX_LENGTH} bytes")

    def lineReceived(self, line: bytes) -> None:
        limit = self.totalHeadersSize
        if self._receivedHeaderSize + len(line) > limit:
            if self._in_request_line():
                self.refuse(414, f"the request line is longer than {limit} bytes")
            else:
                self.refuse(431, f"the request's headers are larger than {limit} bytes in all")
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(431, f"the request has more than {self.maxHeaders} headers")
            return False
        return bool(super().headerReceived(line))

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Every other request twisted.web cannot parse: a malformed request
        # line or header, a bad Content-Length or chunked body.
        self.refuse(400, "the request is not valid HTTP/1.1")

    @property
    def idle(self) -> bool:
        """No request in progress, not even a part of one."""
        return not self.requests and not self._partial

    def allHeadersReceived(self) -> None:
        limit = self._limit("max_body_bytes", None)
        if limit is not None and self.length is not None and self.length > limit:
            # Before gotLength (which would open a temporary file for the
            # body) and before any 100 Continue: not a byte of it is read.
            self.refuse(413, f"request body of {self.length} bytes is larger than {limit} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._disarm()
        super().allContentReceived()

    def _closing(self) -> bool:
        site = self._site
        return site is not None and site.closing

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if self._closing():
            # Shutting down: the response says it is the connection's last.
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def requestDone(self, request: Request) -> None:
        if self._closing():
            # A request that began before the shutdown: its response is the
            # connection's last too.
            self.persistent = False
        # The next request's clock starts when this response ends (requests
        # the client pipelined are replayed inside requestDone, and disarm
        # it again when they are complete).
        if self.persistent:
            self._arm()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self._disarm()
        super().connectionLost(reason)
        if (site := self._site) is not None:
            site._closed(self)

    def refuse(self, status: int, message: str) -> None:
        """Answer C{status} before the request reaches any resource, and close."""
        if self.refused:
            return
        self.refused = True
        self._disarm()
        rid = self._request_id()
        log.info(
            "ds4tw: {status} for {route} request={rid}: {message} (refused by the connection, "
            "from {peer})",
            status=status,
            route=self._route(),
            rid=rid,
            message=message,
            peer=str(self.transport.getPeer()) if self.transport else "?",
        )
        if self.transport is not None:
            self.transport.write(refusal(status, message, rid))
        self.loseConnection()

    def _request_id(self) -> str:
        """The client's X-Request-Id, if its headers have arrived and it is sane; else a new one."""
        text = header_text(self.requests[-1], b"x-request-id") if self.requests else ""
        return sane(text) or new_request_id()

    def _route(self) -> str:
        """The request line's method and path, once it has been parsed."""
        command: bytes | None = getattr(self, "_command", None)
        path: bytes | None = getattr(self, "_path", None)
        if command is None or path is None:
            return "a request not yet begun"
        path_only = path.partition(b"?")[0]
        return one_line(f"{command.decode('latin-1')} {path_only.decode('latin-1')}", 300)

    def _arm(self) -> None:
        timeout = self._limit("request_timeout", None)
        self._disarm()
        self._partial = False
        if timeout:
            self._deadline = self.callLater(timeout, lambda: self._expired(timeout))

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self, timeout: float) -> None:
        self._deadline = None
        if self._partial:
            self.refuse(408, f"the request did not arrive whole within {timeout:g} seconds")
        else:
            # An idle keep-alive connection: close it without a word (an
            # unsolicited 408 could be read as the next request's answer).
            self.loseConnection()


class LimitedRequest(Request):
    """Counts a chunked body as it arrives and has the connection refuse it past the bound."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if getattr(channel, "refused", False):
            return
        limit = getattr(getattr(channel, "site", None), "max_body_bytes", None)
        self._received += len(data)
        if limit is not None and self._received > limit and isinstance(channel, LimitedChannel):
            channel.refuse(413, f"request body larger than {limit} bytes")
            return
        super().handleContentChunk(data)


class LimitedSite(Site):
    """
    A L{Site} whose connections refuse bodies over C{max_body_bytes} before
    reading them and close connections that do not deliver a whole request
    within C{request_timeout} seconds.

    @param max_body_bytes: the largest request body accepted; C{None} for
        no limit.
    @param request_timeout: seconds for a whole request to arrive; C{None}
        or 0 to keep twisted.web's idle timeout instead.
    @param kwargs: as for L{Site} (C{reactor}, C{logPath}, ...).
    """

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: IResource,
        *,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        if request_timeout:
            # The deadline covers what the idle timeout would (an idle
            # keep-alive connection) and the dribble that resets it.
            self.timeOut = None
        #: The open connections (L{close_connections}).
        self.channels: set[LimitedChannel] = set()
        #: L{close_connections} has begun.
        self.closing = False
        self._all_closed: Deferred[None] | None = None

    def close_connections(
        self, settle: float = CLOSE_SETTLE, grace: float = CLOSE_GRACE
    ) -> Deferred[None]:
        """
        Close every connection without cutting a request or a response
        short; call it once the ports have stopped listening (a shutdown).

        For C{settle} seconds nothing is closed: a request already on its
        way on an open connection (a proxy that connected just before the
        port closed, or reuses a kept-alive connection) arrives and is
        answered, a 503 while the server drains. Then idle connections
        close, and the others after the response in progress. What is
        still open C{grace} seconds later (a client that stopped reading)
        is aborted. Without this, the reactor's shutdown drops every
        connection at once: a proxy sees a request vanish, or a response
        that was written but not yet sent, and answers 502.

        Fires when no connection is left (at once if none is open).
        """
        self.closing = True
        done: Deferred[None] = Deferred()
        self._all_closed = done
        clock = self.reactor

        def close_idle() -> None:
            # The others close after their response (requestDone); their
            # persistence is left alone, since a connection that is not
            # persistent drops a request it has only begun to receive.
            for channel in list(self.channels):
                if channel.idle:
                    channel.loseConnection()
            self._check_closed()

        def abort() -> None:
            for channel in list(self.channels):
                transport = channel.transport
                if transport is not None:
                    getattr(transport, "abortConnection", transport.loseConnection)()
            self.channels.clear()
            self._check_closed()

        calls = [clock.callLater(settle, close_idle), clock.callLater(settle + grace, abort)]

        def cancel(result: None) -> None:
            for call in calls:
                if call.active():
                    call.cancel()

        done.addCallback(cancel)
        self._check_closed()  # none open: nothing can arrive, the port is closed
        return done

    def _closed(self, channel: LimitedChannel) -> None:
        self.channels.discard(channel)
        self._check_closed()

    def _check_closed(self) -> None:
        done = self._all_closed
        if done is not None and not done.called and not self.channels:
            done.callback(None)
