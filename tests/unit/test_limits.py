"""
Limits before work (ds4tw._server.http.LimitedSite): a body over the bound is
refused before it is read, a request that does not arrive whole in time
is closed, and none of it touches a stream that is legitimately long.
"""

from __future__ import annotations

import json

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw.testing import HTTPHarness

from .conftest import Rig, make_rig

MiB = 1024 * 1024


def limited(rig: Rig, **kw: object) -> HTTPHarness:
    kw.setdefault("max_body_bytes", 1024)
    return HTTPHarness(rig.server.resource(), rig.clock, **kw)  # type: ignore[arg-type]


def head(path: str, *lines: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: localhost", *lines]) + "\r\n\r\n").encode()


def test_content_length_over_the_bound_is_refused_before_the_body() -> None:
    rig = make_rig()
    http = limited(rig, max_body_bytes=16 * MiB)
    ex = http.connect(
        head(
            "/v1/chat/completions", f"Content-Length: {64 * MiB}", "Content-Type: application/json"
        )
    )
    # Headers only: the answer is already there, and the connection closing.
    assert ex.status == 413
    assert ex.closed
    error = ex.json()["error"]
    assert error["type"] == error["code"] == "request_too_large"
    assert str(16 * MiB) in error["message"]
    # Whatever the client sends next is dropped; no request reached the app.
    ex.send(b"x" * 4096)
    assert ex.channel.requests[0].content is None
    assert rig.server.worker.queue_depth == 0 and not rig.engine.calls


def test_expect_100_continue_gets_413_not_continue() -> None:
    rig = make_rig()
    ex = limited(rig).connect(head("/v1/messages", "Content-Length: 5000", "Expect: 100-continue"))
    assert ex.raw.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in ex.raw
    body = json.loads(ex.body)
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"


def test_a_body_within_the_bound_is_served() -> None:
    rig = make_rig(["ok"])
    http = limited(rig)
    ex = http.post(
        "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    rig.threads.run_until_idle()
    assert ex.status == 200
    assert ex.json()["choices"][0]["message"]["content"] == "ok"


def test_chunked_body_is_cut_off_at_the_bound() -> None:
    rig = make_rig()
    ex = limited(rig).connect(head("/v1/chat/completions", "Transfer-Encoding: chunked"))
    assert ex.raw == b""
    ex.send(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    assert ex.raw == b""  # 512 bytes: within the bound
    ex.send(b"200\r\n" + b"x" * 0x200 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n")
    assert ex.status == 413 and ex.closed
    assert "larger than 1024 bytes" in ex.json()["error"]["message"]
    assert rig.server.worker.queue_depth == 0 and not rig.engine.calls


# -- header limits: a status that says which, never a silent drop ---------------


def oversized(kind: str) -> bytes:
    if kind == "a 200 KB header line":
        return b"GET /health HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    if kind == "20 KB of headers":
        lines = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(200))
        return b"GET /health HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n"
    if kind == "600 headers":
        lines = b"".join(b"X-%d: b\r\n" % i for i in range(600))
        return b"GET /health HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n"
    assert kind == "a 20 KB request line"
    return b"GET /" + b"u" * 20_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("a 200 KB header line", 431, "a request header line is longer than 16384 bytes"),
        ("20 KB of headers", 431, "the request's headers are larger than 16384 bytes in all"),
        ("600 headers", 431, "the request has more than 500 headers"),
        ("a 20 KB request line", 414, "the request line is longer than 16384 bytes"),
    ],
)
def test_headers_over_twisted_webs_limits_get_a_status_that_says_which(
    kind: str, status: int, message: str
) -> None:
    """
    twisted.web dropped the connection without a word for a line over 16 KB
    and answered a bare 400 for the rest.
    """
    rig = make_rig()
    with Logs() as logs:
        ex = limited(rig).connect(oversized(kind))
    assert ex.status == status and ex.closed
    error = ex.json()["error"]
    assert error["message"] == message
    rid = ex.header("x-request-id")
    assert rid and logs.any(f"ds4tw: {status} for ") and logs.any(f"request={rid}: {message}")
    assert not rig.engine.calls


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n",
        b"NONSENSE\r\n\r\n",
    ],
)
def test_what_twisted_web_cannot_parse_is_a_json_400_and_logged(raw: bytes) -> None:
    rig = make_rig()
    with Logs() as logs:
        ex = limited(rig).connect(raw)
    assert ex.status == 400 and ex.closed
    assert ex.json()["error"]["message"] == "the request is not valid HTTP/1.1"
    assert logs.any("ds4tw: 400 for ")


def test_headers_within_the_limits_are_served() -> None:
    rig = make_rig()
    lines = "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(120))  # ~13 KB
    raw = f"GET /health HTTP/1.1\r\nHost: h\r\n{lines}\r\n".encode()
    assert limited(rig).connect(raw).status == 200


def test_twistd_options_reach_the_site() -> None:
    from twisted.application.internet import StreamServerEndpointService

    from ds4tw import LimitedSite, Options, Server, makeService

    o = Options()
    o.parseOptions(["--max-body", "2048", "--request-timeout", "5", "--max-unsent", "4096"])
    service = makeService(o)
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.config.max_body_bytes == 2048
    assert server.config.request_timeout == 5.0
    assert server.config.max_unsent_bytes == 4096
    (port,) = [s for s in service if isinstance(s, StreamServerEndpointService)]  # type: ignore[attr-defined]
    site = port.factory
    assert isinstance(site, LimitedSite)
    assert (site.max_body_bytes, site.request_timeout) == (2048, 5.0)


# -- leaving before the job is queued, or without a stream -------------------


class Logs:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> Logs:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event: dict) -> None:  # type: ignore[type-arg]
        self.lines.append(formatEvent(event))

    def any(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_during_templating_queues_nothing(stream: bool) -> None:
    rig = make_rig(["never"])
    rig.threads.hold_offload = True
    with Logs() as logs:
        ex = rig.stream() if stream else rig.chat()
        assert len(rig.threads.offloaded) == 1  # the chat template is being rendered
        ex.disconnect()
        rig.threads.release()  # the thread pool's work ends after the client left
    assert rig.server.worker.queue_depth == 0 and not rig.threads.busy
    assert rig.engine.calls == []
    assert ex.raw == b""
    assert logs.any("POST /v1/chat/completions cancelled: client disconnected")


def test_non_streaming_disconnect_is_a_logged_cancel_not_an_error() -> None:
    rig = make_rig(["a b c d e f"])
    with Logs() as logs:
        ex = rig.chat()
        rig.threads.step(2)
        ex.disconnect()
        rig.threads.step()
    assert ex.raw == b""  # no 500 rendered to nobody
    assert logs.any("cancelled at decode")
    assert logs.any("cancelled: client disconnected")
    # (the conftest fails the test if anything logged an error)


# -- the request timeout ------------------------------------------------------


def test_dribbled_headers_are_timed_out() -> None:
    rig = make_rig()
    http = limited(rig, request_timeout=60)
    ex = http.connect(b"POST /v1/chat/completions HTTP/1.1\r\n")
    for i in range(11):  # a header line every 5 s: an idle timeout would never fire
        rig.clock.advance(5)
        ex.send(f"X-Dribble-{i}: y\r\n".encode())
    assert not ex.closed
    rig.clock.advance(5)
    assert ex.status == 408 and ex.closed
    assert ex.json()["error"]["code"] == "request_timeout"


def test_a_slow_body_is_timed_out() -> None:
    rig = make_rig()
    http = limited(rig, request_timeout=10)
    ex = http.connect(head("/v1/chat/completions", "Content-Length: 100") + b"{")
    rig.clock.advance(10)
    assert ex.status == 408 and ex.closed
    assert rig.engine.calls == []


def test_an_idle_keepalive_connection_is_closed_without_a_response() -> None:
    rig = make_rig()
    ex = limited(rig, request_timeout=10).connect()
    rig.clock.advance(10)
    assert ex.closed and ex.raw == b""


def test_a_long_stream_is_not_timed_out() -> None:
    rig = make_rig(["one two three"], keepalive=15)
    http = limited(rig, request_timeout=60)
    first = http.post("/v1/chat/completions", {"model": "m", "messages": [], "stream": True})
    # (an empty messages list is the app's to judge: it answers 400 at once)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    blocker = http.post("/v1/chat/completions", payload)
    rig.threads.step()
    ex = http.post("/v1/chat/completions", payload)
    for _ in range(40):  # ten minutes queued behind the first: keepalives only
        rig.clock.advance(15)
    assert not ex.closed and ex.comments() == ["queued"] * 40
    rig.threads.run_until_idle()
    assert blocker.finished and ex.finished and not ex.closed
    assert first.status == 400
