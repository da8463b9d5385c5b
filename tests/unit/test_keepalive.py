"""
The keepalive promise, on a Clock: a stream is never silent for longer
than K seconds, at every stage, and a busy stream carries no comments.

Caveat: these prove the timing logic against twisted.web's real HTTP
framing but with simulated time and a scripted engine; the real-model
tests in tests/integration prove the frames arrive on a real socket.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ds4tw._api.sse import SSEStream
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
    rig = make_rig(n_batch=4)
    ex = rig.stream("a prompt long enough to need several prefill batches")
    rig.threads.step()  # one prefill batch
    assert ex.body == b""
    assert frames_over(rig, ex, K - 0.5) == []
    assert frames_over(rig, ex, 0.5) == [(K, "prefill")]


def test_a_keepalive_during_the_first_prefill_batch_says_prefill() -> None:
    """
    A request that holds a slot says prefill as soon as its prefill starts:
    not when its first batch comes back (here it takes K seconds, as a
    256-token batch can on a slow CPU), nor when the reactor gets round to
    what the model thread sent it (held here until the batch is over).
    """
    rig = make_rig(n_batch=4)
    held: list[tuple[Callable[..., object], tuple[object, ...]]] = []
    rig.threads.to_reactor = lambda f, *args: held.append((f, args))  # type: ignore[method-assign]
    real_step = rig.engine.step

    def slow_step(abort: object) -> object:
        rig.clock.advance(K)  # the batch takes K seconds
        return real_step(abort)  # type: ignore[arg-type]

    rig.engine.step = slow_step  # type: ignore[method-assign]
    ex = rig.stream("a prompt long enough to need several prefill batches")
    rig.threads.step()  # the first prefill batch
    assert held, "the model thread's news was meant to be still on its way"
    assert ex.comments() == ["prefill"]
    # Then the reactor catches up, and the request runs to its end.
    rig.engine.step = real_step  # type: ignore[method-assign]
    while held or rig.threads.busy:
        while held:
            f, args = held.pop(0)
            f(*args)
        rig.threads.step()
    assert ex.finished and ex.data()[-1] == "[DONE]"
    assert ex.comments() == ["prefill"]


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


# -- progress comments, for a client that asks (X-DS4TW-Progress: 1) ---------

PROGRESS = {"X-DS4TW-Progress": "1"}


def progress_stream(rig: Rig, content: str = "hi", **kw: object) -> Exchange:
    payload = {
        "model": "scripted",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        **kw,
    }
    return rig.http.post("/v1/chat/completions", payload, headers=PROGRESS)


def prompt_tokens(rig: Rig) -> int:
    """The last opened prompt's length (the scripted engine: one token per character)."""
    return len(rig.engine.calls[-1][0])


def test_progress_says_the_queue_position_at_once_and_when_it_moves() -> None:
    rig = make_rig(["one two three four five six"])
    running = rig.stream()
    rig.threads.step()  # running is decoding: the one slot is taken
    second = progress_stream(rig)
    third = progress_stream(rig)
    # Where each stands, with the headers, before any keepalive is due.
    assert second.comments() == ["queued 1"]
    assert third.comments() == ["queued 2"]
    while not running.finished:
        rig.threads.step()
    # second has the slot now; third moved up, and the next poll says so.
    assert third.comments() == ["queued 2"]
    rig.clock.advance(1)
    assert third.comments() == ["queued 2", "queued 1"]
    rig.threads.step()  # second's one prefill batch, and its first token
    n = prompt_tokens(rig)
    # Given the slot, its wait is the prefill's (the poll said so); then
    # the stage change to decode at once.
    assert second.comments() == ["queued 1", f"prefill 0/{n}", "decode"]
    rig.threads.run_until_idle()
    assert second.finished and third.finished
    assert third.comments()[-1] == "decode"
    assert running.comments() == []  # it did not ask


def test_progress_reports_prefill_at_most_once_a_second_then_decode() -> None:
    rig = make_rig(["one two three"], n_batch=4)
    ex = progress_stream(rig, "a prompt long enough to need a good many prefill batches")
    watch = Watch(rig, ex)
    while rig.threads.busy:  # one engine step every 0.25 s of the clock
        rig.threads.step()
        watch.advance(0.25, dt=0.25)
    total = prompt_tokens(rig)
    comments = [(t, f) for t, f in watch.timeline if f != "data"]
    # A slot was free: with the headers, the prefill that is about to run.
    assert ex.comments()[0] == f"prefill 0/{total}"
    prefills = [(t, f) for t, f in comments if f.startswith("prefill")]
    # Then what the steps did, one comment a second.
    assert len(prefills) >= 3
    assert all(b[0] - a[0] >= 1.0 for a, b in pairwise(prefills))
    done = [int(f.split()[1].split("/")[0]) for _, f in prefills]
    assert done == sorted(done) and done[-1] > 0
    assert all(f.endswith(f"/{total}") for _, f in prefills)
    assert comments[-1][1] == "decode"
    # Then no comment while tokens flow: "decode" came before the first data.
    first_data = next(t for t, f in watch.timeline if f == "data")
    assert comments[-1][0] <= first_data
    assert ex.finished and ex.data()[-1] == "[DONE]"


def test_without_the_header_a_busy_prefill_carries_no_comment() -> None:
    """The same prefill as above, for a client that did not ask: today's stream."""
    rig = make_rig(["one two three"], n_batch=4)
    ex = rig.stream("a prompt long enough to need a good many prefill batches")
    while rig.threads.busy:
        rig.threads.step()
        rig.clock.advance(0.25)
    assert ex.comments() == []
    assert ex.finished


@pytest.mark.parametrize("value", ["0", "yes", ""])
def test_only_the_value_1_asks_for_progress(value: str) -> None:
    rig = make_rig()
    rig.stream()
    ex = rig.http.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"X-DS4TW-Progress": value},
    )
    rig.clock.advance(5)
    assert ex.comments() == []


def test_an_unchanged_progress_text_is_not_repeated_but_keepalives_go_on() -> None:
    rig = make_rig(["one two three four five six"], keepalive=5)
    rig.stream()
    rig.threads.step()
    ex = progress_stream(rig)
    # Queued, position 1, for 12 s: the keepalive still says so, every 5 s.
    assert frames_over(rig, ex, 12) == [(5.0, "queued 1"), (10.0, "queued 1")]
    assert ex.comments() == ["queued 1"] * 3
    text = rig.http.get("/metrics").body.decode()
    # The metric's label is the stage name only: bounded, whatever the numbers.
    assert 'ds4tw_keepalive_frames_total{stage="queued"} 2.0' in text
    assert "queued 1" not in text


def test_keepalive_of_a_stream_that_did_not_ask_is_the_bare_stage_name() -> None:
    rig = make_rig(["one two three four five six"], keepalive=5)
    rig.stream()
    rig.threads.step()
    ex = rig.stream()
    assert frames_over(rig, ex, 5) == [(5.0, "queued")]


def test_no_progress_while_paused_and_none_after_the_end() -> None:
    rig = make_rig(["one two three"], n_batch=4)
    ex = progress_stream(rig, "a prompt long enough to need a good many prefill batches")
    rig.threads.step()
    seen = ex.comments()
    ex.pause()
    for _ in range(4):
        rig.threads.step()
        rig.clock.advance(1)
    assert ex.comments() == seen
    ex.resume()
    rig.clock.advance(1)
    assert ex.comments()[-1].startswith("prefill ") and len(ex.comments()) == len(seen) + 1
    rig.threads.run_until_idle()
    assert ex.finished
    assert rig.clock.getDelayedCalls() == []


def test_progress_with_anthropic_pings() -> None:
    """The keepalive stays Anthropic's ping; the progress comments are still comments."""
    rig = make_rig(["one two three four five six"], keepalive=5, anthropic_ping=True)
    rig.stream()
    rig.threads.step()
    payload = {
        "model": "scripted",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    ex = rig.http.post("/v1/messages", payload, headers=PROGRESS)
    rig.clock.advance(5)
    assert ex.comments() == ["queued 1"]
    assert [e for e, _ in ex.events()].count("ping") == 1


def test_progress_survives_a_stop_in_prefill() -> None:
    """A client that asked for progress and hangs up mid-prefill cancels as any other."""
    rig = make_rig(["one two three"], n_batch=4)
    ex = progress_stream(rig, "a prompt long enough to need a good many prefill batches")
    rig.threads.step(3)
    rig.clock.advance(1)
    assert ex.comments()[-1].startswith("prefill ")
    ex.disconnect()
    rig.threads.run_until_idle()
    assert rig.engine.computed[-1] == ("closed", None)
    assert (
        'ds4tw_cancelled_jobs_total{stage="prefill"} 1.0' in rig.http.get("/metrics").body.decode()
    )
    assert rig.clock.getDelayedCalls() == []
