"""
A recording HTTP proxy: every request an agent sends is kept (method,
path, headers, body) and forwarded to ds4tw, whose answer is streamed back
byte for byte as it arrives, so SSE comments and keepalive timing reach the
agent unchanged. With no upstream it answers every request with a 400 (which
no agent retries), for capturing a first request without a server.

A test proxy rather than anything in the server, so that what the tests
assert is exactly what went over the wire, in the agent's own shape.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Recorded", "Recorder"]

#: Hop-by-hop headers, not forwarded either way (RFC 9110, 7.6.1).
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


@dataclass
class Recorded:
    """One request as the agent sent it."""

    method: str
    path: str
    #: In the order sent, names as sent.
    headers: list[tuple[str, str]]
    body: bytes
    status: int = 0
    #: When the response's headers and then each piece of its body arrived
    #: from ds4tw (time.monotonic()): what the agent waited through.
    arrivals: list[float] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    def longest_silence(self) -> float:
        """The longest wait between two arrivals (the headers count as one)."""
        times = self.arrivals
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@dataclass
class Recorder:
    """Start with L{start}; stop with L{stop}."""

    upstream: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def posts(self) -> list[Recorded]:
        """The POSTs so far (what carries a conversation)."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def start(self) -> Recorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                rec = Recorded(self.command, self.path, list(self.headers.items()), body)
                with recorder._lock:
                    recorder.requests.append(rec)
                if recorder.upstream is None:
                    rec.status = 400
                    self._reply(400, b'{"error": {"message": "recording only"}}')
                    return
                self._forward(rec)

            def _read_chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, rec: Recorded) -> None:
                target = urlsplit(str(recorder.upstream))
                conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=600)
                try:
                    # The body was read whole (chunked or not): sent with its length.
                    headers = {
                        k: v for k, v in rec.headers if k.lower() not in HOP | {"content-length"}
                    }
                    headers["Content-Length"] = str(len(rec.body))
                    conn.request(rec.method, rec.path, rec.body, headers)
                    resp = conn.getresponse()
                    rec.arrivals.append(time.monotonic())
                    rec.status = resp.status
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                        self.end_headers()
                        return
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    # read1: whatever has arrived, at once (an SSE frame, a keepalive).
                    while piece := resp.read1(65536):
                        rec.arrivals.append(time.monotonic())
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (ConnectionError, TimeoutError):
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
