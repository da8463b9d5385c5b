"""
What each piece of ds4tw's per-token path costs, in CPU microseconds.

    python -m ds4tw.bench._profile [--tokens N]

The per-token path of a streamed token, after the model thread has it:

  1. model thread: L{ds4tw._runtime.scheduler.BatchLoop}'s per-token work (text assembly,
     reasoning split, counting) and C{reactor.callFromThread} (a write
     to the reactor's waker pipe);
  2. reactor thread, first wake-up: the waker, the thread-call queue,
     C{Job._deltas} -> the listener -> the dialect's renderer (JSON) ->
     C{SSEStream.write} -> C{Request.write} (chunked framing, buffered in
     the transport, which starts watching for writability) and
     C{LoopingCall.reset} (the keepalive pushed back);
  3. reactor thread, second wake-up: the socket is writable, C{send()},
     the transport stops watching for writability.

Each piece is timed on its own here, in this process, with warm caches
(C{time.thread_time_ns} over many calls): a lower bound that ranks the
pieces. The last line measures the whole path for real: a ds4tw server
on the scripted engine (no model) in a subprocess, streaming N tokens over
a real socket, its threads' CPU time per token read from /proc. With the
model decoding beside it, the same work costs two to three times more
(cold caches, a core shared with ggml; see docs/performance.md).

Exercised by hand when profiling; its building blocks are the bench's own
(covered by tests/unit/test_bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def cost_us(f: Callable[[], object], n: int = 20000) -> float:
    """CPU microseconds per call of C{f} (after a warm-up)."""
    for _ in range(min(1000, n)):
        f()
    start = time.thread_time_ns()
    for _ in range(n):
        f()
    return (time.thread_time_ns() - start) / n / 1000.0


def _request() -> Any:
    """A real twisted.web Request, HTTP/1.1 (chunked), on an in-memory transport."""
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    protocol: Any = Site(Resource()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    # The site's protocol wraps the HTTP/1.1 channel a request belongs to.
    request = Request(getattr(protocol, "_channel", protocol))
    request.clientproto = b"HTTP/1.1"
    request.method = b"POST"
    request.write(b"")  # headers out, as SSEStream.start does
    return request, transport


def pieces() -> list[tuple[str, float]]:
    """Each piece of the reactor's per-token work, in CPU microseconds."""
    import json

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    from ds4tw._api.openai.render import ChatBuilder, CompletionBuilder
    from ds4tw._api.sse import SSEStream
    from ds4tw._engine.interface import Token
    from ds4tw._formats.pipeline import OutputPipeline
    from ds4tw._types import ContentText

    out: list[tuple[str, float]] = []
    hi = ContentText(" hi")
    completion = CompletionBuilder("cmpl-0123456789abcdef01234567", "SmolLM2", False)
    chat = ChatBuilder("chatcmpl-0123456789abcdef01234567", "SmolLM2", False)
    chat.content(ContentText("warm"))  # the role chunk goes out once
    out.append(("render: completion chunk (json.dumps)", cost_us(lambda: completion.content(hi))))
    out.append(("render: chat chunk (json.dumps)", cost_us(lambda: chat.content(hi))))
    head = completion._chunk([{"text": "\x00", "index": 0}]).split(b'"\\u0000"')
    out.append(
        (
            "  alternative: pre-rendered chunk + json.dumps(text)",
            cost_us(lambda: head[0] + json.dumps(" hi").encode() + head[1]),
        )
    )

    request, transport = _request()
    frame = completion.content(hi)[0]

    def write() -> None:
        request.write(frame)
        if len(transport.io.getvalue()) > 1 << 20:
            transport.clear()

    out.append(("Request.write (chunked, buffered in the transport)", cost_us(write)))

    loop = LoopingCall(lambda: None)
    loop.clock = reactor
    loop.start(15.0, now=False)
    try:
        out.append(("LoopingCall.reset (the keepalive, per write)", cost_us(loop.reset, 5000)))
    finally:
        loop.stop()

    class Holder:
        last = 0.0

    holder = Holder()
    out.append(
        (
            "  alternative: remember the last write's time",
            cost_us(lambda: setattr(holder, "last", time.monotonic())),
        )
    )

    request2, transport2 = _request()
    sse = SSEStream(request2, reactor, 15.0, stage=lambda: "decode", on_lost=lambda: None)
    sse.start()
    try:

        def sse_write() -> None:
            sse.write(frame)
            if len(transport2.io.getvalue()) > 1 << 20:
                transport2.clear()

        out.append(("SSEStream.write (Request.write + reset)", cost_us(sse_write, 5000)))
    finally:
        sse.close()

    pipeline = OutputPipeline()
    token = Token(1, b" hi")
    out.append(
        ("model thread: OutputPipeline.feed (no stops)", cost_us(lambda: pipeline.feed(token)))
    )
    out.append(("callFromThread wake-up, reactor side", _wakeup_us()))
    return out


def _wakeup_us(n: int = 2000) -> float:
    """
    Reactor-thread CPU per C{callFromThread} from another thread, one every
    millisecond (tokens arrive one at a time): waker pipe read, the
    thread-call queue, Twisted's logging context. Runs the reactor.
    """
    from twisted.internet import reactor

    r: Any = reactor
    result: dict[str, float] = {}
    calls = {"n": 0}

    def tick() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            result["start"] = time.thread_time_ns()
        elif calls["n"] == n:
            result["end"] = time.thread_time_ns()
            r.stop()

    def feeder() -> None:
        for _ in range(n):
            r.callFromThread(tick)
            time.sleep(0.001)

    r.callWhenRunning(threading.Thread(target=feeder, daemon=True).start)
    r.callLater(60, lambda: r.running and r.stop())
    r.run(installSignalHandlers=False)
    if "end" not in result:
        return float("nan")
    return (result["end"] - result["start"]) / (n - 1) / 1000.0


def whole_path(tokens: int) -> dict[str, float]:
    """
    Per-token CPU of a real ds4tw server (scripted engine, 1 ms per token,
    no model) streaming C{tokens} tokens over a real socket.
    """
    from . import _client, _cpu, _servers
    from ._settings import make_settings
    from ._workload import completion_body

    s = dataclasses.replace(
        make_settings(quick=True, engine="scripted"), scripted_token_ms=1.0, scripted_prefill_ms=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = _servers.ds4tw_scripted(s, Path(tmp), "profile")
        with _servers.running(server):
            _client.stream(server.port, "/v1/completions", completion_body("ds4tw", "warm", 16))
            before = _cpu.thread_times(server.pid)
            _client.stream(server.port, "/v1/completions", completion_body("ds4tw", "go", tokens))
            after = _cpu.thread_times(server.pid)
    split = _cpu.split(server.pid, before, after)
    return {k: v * 1e6 / tokens for k, v in split.items()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ds4tw.bench._profile")
    p.add_argument("--tokens", type=int, default=5000, help="tokens for the whole-path line")
    args = p.parse_args(argv)
    print("ds4tw per-token path, CPU microseconds per call (warm caches, this process):")
    for name, us in pieces():
        print(f"  {name:<56} {us:8.2f}")
    whole = whole_path(args.tokens)
    print(f"whole path, real socket, scripted engine ({args.tokens} tokens), CPU us per token:")
    print(f"  {'reactor (main) thread':<56} {whole['main_s']:8.2f}")
    print(f"  {'other threads (model thread, Python only)':<56} {whole['other_s']:8.2f}")


if __name__ == "__main__":
    main()
