"""
Limits before work (ds4tw._http.LimitedSite): a body over the bound is
refused before it is read, a request that does not arrive whole in time
is closed, and none of it touches a stream that is legitimately long.
"""

from __future__ import annotations

import json

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
