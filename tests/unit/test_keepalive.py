"""
The keepalive promise, on a Clock: a stream is never silent for longer
than K seconds, at every stage, and a busy stream carries no comments.

Caveat: these prove the timing logic against twisted.web's real HTTP
framing but with simulated time and a scripted engine; the real-model
tests in tests/integration prove the frames arrive on a real socket.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ds4tw._sse import SSEStream
from ds4tw.testing import Exchange, Reply

from .conftest import Rig, make_rig

K = 15.0


class Watch:
    """Records (clock time, frame) for each frame as it appears on an exchange."""

    def __init__(self, rig: Rig, ex: Exchange) -> None:
        self.rig, self.ex = rig, ex
        self.seen = len(ex.events())
        self.timeline: list[tuple[float, str]] = []

    def poll(self) -> None:
        events = self.ex.events()
        for e, d in events[self.seen :]:
            self.timeline.append((self.rig.clock.seconds(), d if e == "comment" else "data"))
        self.seen = len(events)

    def advance(self, seconds: float, dt: float = 0.5) -> list[tuple[float, str]]:
        self.poll()
        end = self.rig.clock.seconds() + seconds
        while self.rig.clock.seconds() < end - 1e-9:
            self.rig.clock.advance(dt)
            self.poll()
        return self.timeline


def frames_over(rig: Rig, ex: Exchange, seconds: float, dt: float = 0.5) -> list[tuple[float, str]]:
    return Watch(rig, ex).advance(seconds, dt)


def test_queued_stream_gets_headers_at_once_and_queued_comments() -> None:
    rig = make_rig(["one two three four five six"])
    first = rig.stream()
    rig.threads.step()  # first is decoding; the model is busy
    second = rig.stream()
    assert second.status == 200 and second.headers_sent
    assert second.header("content-type") == "text/event-stream; charset=utf-8"
    assert second.body == b""
    got = frames_over(rig, second, 3 * K)
    assert got == [(K, "queued"), (2 * K, "queued"), (3 * K, "queued")]
    assert first.comments() == ["decode", "decode", "decode"]


def test_prefill_comment_after_exactly_k_idle_seconds() -> None:
    rig = make_rig(prefill_batch=4)
    ex = rig.stream("a prompt long enough to need several prefill batches")
    rig.threads.step()  # one prefill batch
    assert ex.body == b""
    assert frames_over(rig, ex, K - 0.5) == []
    assert frames_over(rig, ex, 0.5) == [(K, "prefill")]


def test_decode_comment_while_tokens_are_held_back() -> None:
    """
    Tokens that produce no sendable text (here: a multi-byte character
    split across tokens and a stop-sequence prefix) are real decode work
    with nothing to write: exactly the silence the keepalive exists for.
    """
    pieces = [b"ok", b"\xe2", b"\x82", b"\xac", b"EN", b"D", b" tail"]
    rig = make_rig([Reply(tuple(pieces))])
    ex = rig.stream(stop=["ENDX"])
    rig.threads.step()  # prefill, which samples "ok"
    assert [d for d in ex.data()][-1]["choices"][0]["delta"] == {"content": "ok"}
    start = rig.clock.seconds()
    watch = Watch(rig, ex)
    for _ in range(4):  # four tokens, 10 s apart
        rig.threads.step()
        watch.advance(10)
    timeline = watch.timeline
    comments = [(t - start, f) for t, f in timeline if f != "data"]
    # b"\xe2" (t=0) b"\x82" (10) b"\xac" -> sends the euro sign at 20,
    # b"EN" (30), then nothing until 40: the keepalive fires 15 s after the
    # last write.
    data_times = [t - start for t, f in timeline if f == "data"]
    assert data_times == [20.0]
    assert comments == [(15.0, "decode"), (35.0, "decode")]


def test_no_comment_while_tokens_flow() -> None:
    rig = make_rig(["w " * 40])
    ex = rig.stream(max_tokens=40)
    steps = 0
    while rig.threads.busy:
        rig.threads.step()
        rig.clock.advance(K - 1)
        steps += 1
    # Prefill with token 0, tokens 1 to 39 (the last one with the finish at
    # max_tokens), then the loop's end: steps 14 s apart, never a comment.
    assert steps == 41
    assert ex.comments() == []
    assert ex.finished


def test_never_two_comments_within_k() -> None:
    rig = make_rig(["one two three"])
    ex = rig.stream()
    rig.threads.step(2)
    timeline = frames_over(rig, ex, 10 * K, dt=0.25)
    times = [t for t, f in timeline]
    assert len(times) == 10
    assert all(b - a >= K for a, b in pairwise(times))


def test_no_comment_after_finish() -> None:
    rig = make_rig(["done"])
    ex = rig.stream()
    rig.threads.run_until_idle()
    assert ex.finished
    before = ex.raw
    rig.clock.advance(10 * K)
    assert ex.raw == before
    assert rig.clock.getDelayedCalls() == []


def test_no_comment_after_disconnect() -> None:
    rig = make_rig(["one two three"])
    ex = rig.stream()
    rig.threads.step()
    ex.disconnect()
    before = ex.raw
    rig.clock.advance(10 * K)
    assert ex.raw == before
    assert rig.clock.getDelayedCalls() == []


def test_keepalive_zero_sends_none() -> None:
    rig = make_rig(["one two"], keepalive=0)
    first = rig.stream()
    second = rig.stream()
    rig.clock.advance(10 * K)
    rig.threads.step()
    rig.clock.advance(10 * K)
    assert first.comments() == [] and second.comments() == []
    assert rig.clock.getDelayedCalls() == []


def test_keepalive_interval_is_configurable() -> None:
    rig = make_rig(keepalive=2)
    ex = rig.stream()
    # The model was idle, but the job is "queued" until the model thread
    # actually takes its first step.
    assert frames_over(rig, ex, 5) == [(2.0, "queued"), (4.0, "queued")]


def test_keepalive_frames_are_counted_in_metrics() -> None:
    rig = make_rig(keepalive=5)
    rig.stream()
    rig.clock.advance(5)
    rig.clock.advance(5)
    text = rig.http.get("/metrics").body.decode()
    assert 'ds4tw_keepalive_frames_total{stage="queued"} 2.0' in text


# -- the stream's end, and back-pressure -------------------------------------


def bare_stream(clock: Clock, max_unsent: int = 1 << 20) -> tuple[SSEStream, StringTransport, list]:  # type: ignore[type-arg]
    """An SSEStream on a real twisted.web request over an in-memory connection."""
    site = Site(Resource(), reactor=clock)
    channel = HTTPChannel()
    channel.site = site
    channel.timeOut = None
    transport = StringTransport()
    channel.makeConnection(transport)
    request = Request(channel)
    request.clientproto = b"HTTP/1.1"
    request.method = b"GET"
    lost: list[str | None] = []
    sse = SSEStream(
        request,
        clock,
        K,
        stage=lambda: "decode",
        on_lost=lambda: lost.append(sse.lost_reason),
        max_unsent=max_unsent,
    )
    sse.start()
    return sse, transport, lost


def test_write_after_finish_raises() -> None:
    sse, _, lost = bare_stream(Clock())
    sse.write(b"data: 1\n\n")
    sse.close()
    with pytest.raises(RuntimeError, match="after the stream finished"):
        sse.write(b"data: 2\n\n")
    assert lost == []


def test_write_after_a_disconnect_is_dropped_and_lost_is_reported_once() -> None:
    sse, transport, lost = bare_stream(Clock())
    sse.lost("client disconnected")
    sse.stopProducing()  # another signal of the same departure
    before = transport.value()
    sse.write(b"data: late\n\n")  # a frame still in flight for the cancelled job
    assert transport.value() == before
    sse.close()
    assert lost == ["client disconnected"]


def test_paused_stream_holds_frames_and_resume_sends_them() -> None:
    clock = Clock()
    sse, transport, lost = bare_stream(clock)
    transport.clear()
    sse.pauseProducing()
    sse.write(b"data: a\n\n")
    sse.write(b"data: b\n\n")
    assert transport.value() == b"" and sse.held_bytes == 18
    # No keepalive while paused: it would only add to what is unread.
    clock.advance(3 * K)
    assert transport.value() == b""
    sse.resumeProducing()
    assert transport.value() == b"9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n"
    assert sse.held_bytes == 0 and lost == []
    # The flush was a real write: the next keepalive is K after it.
    clock.advance(K - 1)
    assert b": decode" not in transport.value()
    clock.advance(1)
    assert b": decode" in transport.value()


def test_twisted_pauses_the_stream_through_the_channel() -> None:
    rig = make_rig(["one two three four five six"])
    ex = rig.stream()
    rig.threads.step(2)
    sent = ex.data()
    ex.pause()  # the transport's buffer is full
    rig.threads.step(3)
    assert ex.data() == sent  # held, and the model thread went on
    ex.resume()
    rig.threads.run_until_idle()
    assert ex.finished and ex.data()[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in ex.data()[:-1])
    assert text == "one two three four five six"


def test_finishing_while_paused_sends_what_was_held() -> None:
    rig = make_rig(["one two"])
    ex = rig.stream()
    ex.pause()
    rig.threads.run_until_idle()
    # The model is free; the held frames went to the transport with the end.
    assert not rig.threads.busy
    assert ex.finished and ex.data()[-1] == "[DONE]"


def test_a_client_that_stops_reading_is_cancelled_past_the_bound() -> None:
    rig = make_rig(["w " * 200, "next"], max_unsent_bytes=2000)
    logged: list[str] = []

    def observe(event: dict) -> None:  # type: ignore[type-arg]
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        ex = rig.stream(max_tokens=200)
        rig.threads.step(3)
        ex.pause()
        steps = 0
        while rig.threads.busy and steps < 200:
            rig.threads.step()
            steps += 1
    finally:
        globalLogPublisher.removeObserver(observe)
    # Each chunk is ~150 bytes: the bound is passed within a few dozen tokens.
    assert steps < 30
    assert ex.transport.disconnected  # aborted: nothing more will be sent
    assert rig.engine.computed[-1] == ("closed", None)
    assert any("cancelled at decode (client not reading)" in line for line in logged)
    assert any("stopped reading" in line for line in logged)
    assert (
        'ds4tw_cancelled_jobs_total{stage="decode"} 1.0' in rig.http.get("/metrics").body.decode()
    )
    ex.disconnect()  # the abort's connectionLost: the same path, already taken
    nxt = rig.stream()
    rig.threads.run_until_idle()
    assert nxt.finished
