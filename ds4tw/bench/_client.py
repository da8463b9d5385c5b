"""
A minimal HTTP client that timestamps every socket read.

Why not httpx for the streams: on a 2-core machine the client shares the
CPU with a server whose model already uses both cores, so every
microsecond the client spends per token is a microsecond the measured
server loses. A blocking C{recv} loop that only splits bytes costs
almost nothing; JSON is decoded after the stream ends. The asyncio
variant carries hundreds of concurrent waiting clients in one thread.

The clock is C{time.perf_counter} (monotonic, sub-microsecond). A
request's time zero, C{sent}, is taken just before its bytes are written
on an already connected socket: TTFT measures the server, not the TCP
handshake.

Hanging up (the client going away) is C{shutdown(SHUT_RDWR)} then
C{close}: the server sees the FIN at once.

Covered by tests/integration/test_bench_smoke.py (through the whole
command) and, for its parsing, tests/unit/test_bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._sse import ResponseReader

HOST = "127.0.0.1"
_READ = 65536


@dataclass
class Stream:
    """A finished (or abandoned) streamed request, as the client saw it."""

    sent: float
    reader: ResponseReader
    #: When the client hung up on purpose (None: the response completed
    #: or the server closed).
    hung_up: float | None = None
    error: str | None = None
    connect_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return self.reader.status

    @property
    def events(self) -> list[Any]:
        return self.reader.events


def request_bytes(method: str, path: str, body: dict[str, Any] | None, port: int) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Accept: text/event-stream\r\nConnection: close\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def stream(
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    timeout: float = 300.0,
    hang_up: Callable[[ResponseReader], bool] | None = None,
    hang_up_after: float | None = None,
) -> Stream:
    """
    POST C{body} and read the response to its end, or until C{hang_up}
    returns true after a read, or C{hang_up_after} seconds after sending
    (a client leaving in the middle of a silent prefill), or C{timeout}
    seconds pass in total.
    """
    t_connect = time.perf_counter()
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect_s = time.perf_counter() - t_connect
    reader = ResponseReader()
    raw = request_bytes("POST", path, body, port)
    sent = time.perf_counter()
    deadline = sent + timeout
    leave = None if hang_up_after is None else sent + hang_up_after
    result = Stream(sent, reader, connect_s=connect_s)
    # Without a hang-up rule nothing needs parsing until the end: the
    # reads are only timestamped (the server closes the connection after
    # the response: the request says Connection: close).
    lazy = hang_up is None and leave is None
    reads: list[tuple[float, bytes]] = []
    clock = time.perf_counter
    try:
        sock.sendall(raw)
        if lazy:
            # Blocking reads bounded by the kernel (SO_RCVTIMEO) rather than
            # a Python timeout, which would poll() before every recv().
            sock.settimeout(None)
            sec = int(timeout)
            usec = int((timeout - sec) * 1e6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
            while True:
                try:
                    data = sock.recv(_READ)
                except BlockingIOError:
                    result.error = f"timed out after {timeout:.0f}s"
                    break
                t = clock()
                if not data:
                    break
                reads.append((t, data))
                if t > deadline:
                    result.error = f"timed out after {timeout:.0f}s"
                    break
        while not lazy and not reader.complete:
            now = clock()
            if leave is not None and now >= leave:
                result.hung_up = now
                break
            left = deadline - now
            if left <= 0:
                result.error = f"timed out after {timeout:.0f}s"
                break
            sock.settimeout(left if leave is None else max(1e-4, min(left, leave - now)))
            try:
                data = sock.recv(_READ)
            except TimeoutError:
                continue  # the loop decides: hang up, or the overall timeout
            t = clock()
            if not data:
                reader.eof()
                break
            reader.feed(t, data)
            if hang_up is not None and hang_up(reader):
                result.hung_up = clock()
                break
    except OSError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        _hang_up(sock)
        for t, data in reads:
            reader.feed(t, data)
        if lazy and not result.error:
            reader.eof()
    return result


async def astream(
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    timeout: float = 600.0,
    hang_up: asyncio.Event | None = None,
    on_event: Callable[[ResponseReader], None] | None = None,
    connect_limit: asyncio.Semaphore | None = None,
) -> Stream:
    """
    The asyncio version of L{stream}, for many concurrent clients. Setting
    C{hang_up} closes the connection at once, wherever the stream is.
    C{connect_limit} bounds connections being opened at the same time
    (the server's listen backlog is finite; a refused SYN is retried by
    the kernel a second later, which would read as server latency).
    """
    reader = ResponseReader()
    t_connect = time.perf_counter()
    try:
        if connect_limit is not None:
            async with connect_limit:
                r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        else:
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    except (OSError, TimeoutError) as e:
        return Stream(time.perf_counter(), reader, error=f"connect: {type(e).__name__}: {e}")
    sent = time.perf_counter()
    result = Stream(sent, reader, connect_s=sent - t_connect)
    deadline = sent + timeout
    w.write(request_bytes("POST", path, body, port))
    waiter: asyncio.Task[bool] | None = (
        asyncio.ensure_future(hang_up.wait()) if hang_up is not None else None
    )
    try:
        while not reader.complete:
            left = deadline - time.perf_counter()
            if left <= 0:
                result.error = f"timed out after {timeout:.0f}s"
                break
            read = asyncio.ensure_future(r.read(_READ))
            pending = {read} if waiter is None else {read, waiter}
            done, _ = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if waiter is not None and waiter in done and read not in done:
                read.cancel()
                result.hung_up = time.perf_counter()
                break
            if read not in done:
                read.cancel()
                continue
            data = read.result()
            t = time.perf_counter()
            if not data:
                reader.eof()
                break
            reader.feed(t, data)
            if on_event is not None:
                on_event(reader)
    except OSError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if waiter is not None:
            waiter.cancel()
        w.close()
    return result


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """A plain GET (health, metrics, models); (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    status, body = get(port, path, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    return json.loads(body)


def wait_idle(port: int, timeout: float = 60.0, poll: float = 0.002) -> float | None:
    """
    Poll ds4tw's /health until no job runs or waits; the seconds that took
    (None on timeout). Polls every C{poll} seconds, at most C{timeout}.
    """
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        try:
            h = get_json(port, "/health", timeout=5)
        except (OSError, RuntimeError, ValueError):
            h = None
        if h is not None and not h.get("busy") and not h.get("queue_depth"):
            return time.perf_counter() - start
        time.sleep(poll)
    return None
