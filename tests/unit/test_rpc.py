"""
ds4tw._engine.rpc without llama.cpp: endpoint parsing, the HELLO
handshake of L{check_worker} against a worker played by a thread on a
loopback socket, and the message of a build without the RPC library.

The fake worker speaks the bytes of ggml-rpc's server as read in the
source vendored by llama-cpp-python 0.3.36
(vendor/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp): rpc_serve_client
(ggml-rpc.cpp:1820-1858) reads the command byte (RPC_CMD_HELLO = 14,
ggml-rpc.cpp:84), a little-endian uint64 size that must equal
sizeof(rpc_msg_hello_req) (24 bytes of conn_caps, ggml-rpc.cpp:88-90 and
transport.h:11), the request, and answers with send_msg
(ggml-rpc.cpp:262-270): a uint64 size then rpc_msg_hello_rsp (major,
minor, patch, padding, 24 caps bytes; ggml-rpc.cpp:92-98). What this
cannot prove: that the real server still does so; the integration test
(tests/integration/test_rpc_worker.py) checks against ggml's own.

These tests use loopback sockets and a thread, unlike the rest of
tests/unit; each is bounded by a timeout of a fraction of a second.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ds4tw._engine import rpc
from ds4tw._engine.rpc import Endpoint, WorkerDown, check_worker, parse_endpoints

HELLO_REQUEST = struct.pack("<BQ", 14, 24) + bytes(24)


def hello_reply(major: int, minor: int, patch: int) -> bytes:
    return struct.pack("<Q", 28) + bytes([major, minor, patch, 0]) + bytes(24)


# -- parse_endpoints ------------------------------------------------------------------------


def test_parse_endpoints() -> None:
    assert parse_endpoints("127.0.0.1:50052, worker-2.lan:50053") == (
        Endpoint("127.0.0.1", 50052),
        Endpoint("worker-2.lan", 50053),
    )
    assert str(Endpoint("10.0.0.2", 50052)) == "10.0.0.2:50052"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "no RPC worker"),
        ("127.0.0.1:1,,127.0.0.1:2", "empty"),
        ("127.0.0.1", "HOST:PORT"),
        (":50052", "no host"),
        ("h:", "1 to 65535"),
        ("h:0", "1 to 65535"),
        ("h:65536", "1 to 65535"),
        ("h:5x", "1 to 65535"),
        ("h:-1", "1 to 65535"),
        ("[::1]:50052", "IPv6"),
        ("::1:50052", "IPv6"),
        ("bad host:1", "not a hostname"),
        ("-bad:1", "not a hostname"),
        ("10.1:1", "not a hostname"),
        ("a:1,a:1", "twice"),
    ],
)
def test_parse_endpoints_refuses(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_endpoints(spec)


# -- check_worker ----------------------------------------------------------------------------


@contextmanager
def fake_worker(answer: bytes | None, close: bool = False) -> Iterator[tuple[Endpoint, list]]:
    """
    A one-client worker on a loopback port: reads HELLO, then sends
    C{answer}, or closes at once (C{close}), or says nothing (C{None}:
    a worker busy with another client). Yields the endpoint and a list
    the thread fills with what it read: the request, then what followed
    it until the client closed.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen: list[bytes] = []

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while len(data) < len(HELLO_REQUEST):
                chunk = conn.recv(len(HELLO_REQUEST) - len(data))
                if not chunk:
                    break
                data += chunk
            seen.append(data)
            if close:
                return
            if answer is not None:
                conn.sendall(answer)
            # Like rpc_serve_client's loop: the next command, or EOF.
            try:
                seen.append(conn.recv(1))
            except OSError:
                seen.append(b"<reset>")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Endpoint("127.0.0.1", server.getsockname()[1]), seen
    finally:
        thread.join(5)
        server.close()


def test_check_worker_right_version() -> None:
    """The exact HELLO bytes go out, the version comes back, and the close is clean."""
    with fake_worker(hello_reply(7, 0, 0)) as (endpoint, seen):
        assert check_worker(endpoint, timeout=2) == (7, 0, 0)
    # The worker read EOF for its next command: it goes back to accept().
    assert seen == [HELLO_REQUEST, b""]


def test_check_worker_accepts_a_newer_patch() -> None:
    with fake_worker(hello_reply(7, 0, 3)) as (endpoint, _):
        assert check_worker(endpoint, timeout=2) == (7, 0, 3)


@pytest.mark.parametrize("version", [(6, 0, 0), (8, 0, 0), (7, 1, 0)])
def test_check_worker_version_mismatch(version: tuple[int, int, int]) -> None:
    with fake_worker(hello_reply(*version)) as (endpoint, _), pytest.raises(WorkerDown) as caught:
        check_worker(endpoint, timeout=2)
    message = str(caught.value)
    assert caught.value.endpoint == endpoint
    assert f"RPC worker {endpoint}" in message
    assert "protocol version mismatch" in message
    assert rpc.version(version) in message and "7.0.0" in message


def test_check_worker_reply_of_another_size() -> None:
    """A worker of an older protocol answers HELLO with another struct."""
    with (
        fake_worker(struct.pack("<Q", 3) + bytes([3, 0, 0])) as (endpoint, _),
        pytest.raises(WorkerDown, match="protocol version mismatch"),
    ):
        check_worker(endpoint, timeout=2)


def test_check_worker_busy() -> None:
    """
    Accepted but unanswered: what a second client sees while the worker
    serves another (its connection waits in the listen backlog).
    """
    with (
        fake_worker(None) as (endpoint, _),
        pytest.raises(WorkerDown, match="busy with another client") as caught,
    ):
        check_worker(endpoint, timeout=0.2)
    assert str(caught.value).startswith(f"RPC worker {endpoint}: no answer to HELLO within 0.2 s")


def test_check_worker_closed() -> None:
    with (
        fake_worker(None, close=True) as (endpoint, _),
        pytest.raises(WorkerDown, match="closed the connection during HELLO"),
    ):
        check_worker(endpoint, timeout=2)


def test_check_worker_refused() -> None:
    # A bound socket that does not listen: its port refuses, and nobody
    # else can take it meanwhile.
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        endpoint = Endpoint("127.0.0.1", bound.getsockname()[1])
        with pytest.raises(WorkerDown, match="connection refused") as caught:
            check_worker(endpoint, timeout=2)
    assert caught.value.endpoint == endpoint
    assert str(caught.value).startswith(f"RPC worker {endpoint}: ")
    assert isinstance(caught.value, ConnectionError)


def test_gone_is_a_refusal_only() -> None:
    """The idle probe's verdict: only a port that refuses means the worker is gone."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        endpoint = Endpoint("127.0.0.1", bound.getsockname()[1])
        assert rpc.gone(endpoint) == (
            f"RPC worker {endpoint}: connection refused (the worker is gone)"
        )
        # Listening, its backlog full or not, never answering: not gone.
        bound.listen(1)
        assert rpc.gone(endpoint, timeout=0.5) is None
        assert rpc.gone(endpoint, timeout=0.5) is None
        assert rpc.gone(endpoint, timeout=0.5) is None
    assert rpc.gone(Endpoint("no-such-host.invalid", 50052)) is None


def test_check_worker_unresolvable() -> None:
    endpoint = Endpoint("no-such-host.invalid", 50052)
    with pytest.raises(WorkerDown, match="cannot resolve"):
        check_worker(endpoint, timeout=2)


# -- a build without RPC -------------------------------------------------------------------


def test_no_rpc_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A lib directory without libggml-rpc (a build without -DGGML_RPC=ON):
    the message says what is missing and gives the one command to install
    a build with it, pinned to the installed version.
    """
    with pytest.raises(rpc.RPCUnavailable) as caught:
        rpc.library(tmp_path)
    message = str(caught.value)
    assert "no libggml-rpc" in message and str(tmp_path) in message
    assert rpc.INSTALL_COMMAND in message
    # $LLAMA_CPP_LIB_PATH, which llama-cpp-python honours for libllama, is
    # where library() and available() look too.
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    assert rpc.lib_dir() == tmp_path
    assert not rpc.available()


def test_install_command() -> None:
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    command = rpc.INSTALL_COMMAND
    assert command.startswith('CMAKE_ARGS="-DGGML_RPC=ON" ')
    assert " -m pip install --force-reinstall --no-deps --no-cache-dir " in command
    assert command.endswith(f"--no-binary llama-cpp-python llama-cpp-python=={version}")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """rpc-server's -c directory: $LLAMA_CACHE/rpc, else the XDG cache's llama.cpp/rpc."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    assert rpc.default_cache_dir() == tmp_path / "llama" / "rpc"
    monkeypatch.delenv("LLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rpc.default_cache_dir() == tmp_path / "xdg" / "llama.cpp" / "rpc"


@pytest.mark.parametrize("host", ["localhost", "::1", "10.1", "255.255.255.255"])
def test_listen_host_refused(host: str) -> None:
    """ggml-rpc's server binds with inet_addr: a dotted IPv4 address only."""
    with pytest.raises(ValueError, match=repr(host)):
        rpc.check_listen_host(host)
