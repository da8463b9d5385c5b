"""
Closing connections at shutdown (L{ds4tw._server.http.LimitedSite.close_connections},
which C{twistd ds4tw} runs once the drain is over and its ports are closed):
a request already on its way still gets its answer, a response is never
cut, idle connections close, and a client that never finishes is aborted.
The reactor's own shutdown would drop them all at once, which a proxy in
front reports as a 502 (seen in tests/infra/test_replicas.py's rolling
restart before this existed). The real SIGTERM is in
tests/integration/test_twistd.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.main import CONNECTION_DONE

from ds4tw._server.http import CLOSE_GRACE, CLOSE_SETTLE, LimitedSite
from ds4tw.testing import Exchange, HTTPHarness

from .conftest import Rig, make_rig

CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
)


def chat_request(content: str = "hi") -> bytes:
    body = b'{"messages": [{"role": "user", "content": "%s"}]}' % content.encode()
    return CHAT % (len(body), body)


def harness(rig: Rig) -> tuple[HTTPHarness, LimitedSite]:
    http = HTTPHarness(rig.server.resource(), rig.clock, max_body_bytes=1 << 20)
    assert isinstance(http.site, LimitedSite)
    return http, http.site


def closed(*exchanges: Exchange) -> None:
    """The transports flushed and closed: what the reactor reports next."""
    for ex in exchanges:
        ex.channel.connectionLost(CONNECTION_DONE)


def fired(d: Deferred[Any]) -> bool:
    got: list[object] = []
    d.addBoth(got.append)
    return bool(got)


def test_idle_connections_close_after_the_settle_time_not_before() -> None:
    rig = make_rig()
    http, site = harness(rig)
    a, b = http.connect(), http.connect()
    done = site.close_connections()
    rig.clock.advance(CLOSE_SETTLE * 0.9)
    assert not a.closed and not b.closed
    rig.clock.advance(CLOSE_SETTLE * 0.2)
    assert a.closed and b.closed
    assert not fired(done)
    closed(a, b)
    assert fired(done)


def test_a_request_arriving_in_the_settle_time_is_answered_then_closed() -> None:
    """A proxy that connected just before the port closed: a 503 it can retry elsewhere."""
    rig = make_rig()
    http, site = harness(rig)
    ex = http.connect()
    rig.server.stopService()  # the drain: new requests get 503
    done = site.close_connections()
    rig.clock.advance(CLOSE_SETTLE / 2)
    ex.send(chat_request())
    assert ex.status == 503 and ex.header("retry-after")
    # Its last response: the connection closes after it, and says so.
    assert ex.closed and ex.header("connection") == "close"
    closed(ex)
    assert fired(done)


def test_a_response_in_progress_is_not_cut() -> None:
    rig = make_rig(["one two three four five six seven eight"])
    http, site = harness(rig)
    body = b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
    ex = http.connect(CHAT % (len(body), body))
    rig.threads.step()
    assert ex.headers_sent and not ex.finished
    done = site.close_connections()
    rig.clock.advance(CLOSE_SETTLE + 1)
    assert not ex.closed  # mid-stream
    rig.threads.run_until_idle()
    assert ex.finished and ex.data()[-1] == "[DONE]"
    assert ex.closed
    closed(ex)
    assert fired(done)


def test_a_request_half_received_is_waited_for() -> None:
    rig = make_rig(["ok"])
    http, site = harness(rig)
    raw = chat_request()
    ex = http.connect(raw[:20])  # not even the request line whole
    done = site.close_connections()
    rig.clock.advance(CLOSE_SETTLE + 1)
    assert not ex.closed
    ex.send(raw[20:])
    rig.threads.run_until_idle()
    assert ex.status == 200 and ex.closed
    closed(ex)
    assert fired(done)


def test_what_is_still_open_after_the_grace_is_aborted() -> None:
    rig = make_rig()
    http, site = harness(rig)
    stuck = http.connect(chat_request()[:40])  # a client that never sends the rest
    done = site.close_connections()
    rig.clock.advance(CLOSE_SETTLE + CLOSE_GRACE * 0.9)
    assert not stuck.closed and not fired(done)
    rig.clock.advance(CLOSE_GRACE * 0.2)
    assert stuck.closed  # aborted
    assert fired(done)


def test_with_no_connection_open_it_is_done_at_once() -> None:
    rig = make_rig()
    _, site = harness(rig)
    done = site.close_connections()
    assert fired(done)  # the port is closed: no connection can arrive
    # And nothing is left scheduled to run later.
    assert not [c for c in rig.clock.getDelayedCalls() if "close_connections" in repr(c)]


def test_a_connection_that_closes_by_itself_ends_it_early() -> None:
    rig = make_rig()
    http, site = harness(rig)
    ex = http.connect()
    done = site.close_connections()
    closed(ex)  # the client hung up
    assert fired(done)
