"""
C{ds4tw-rpc-worker} as a real process on a loopback port, and the client
side of ds4tw._engine.rpc against it: the HELLO check, ggml's own
add_server and device listing, and the hardening of ggml's socket.

ggml-rpc aborts the process on any client failure, so everything that
makes ggml connect runs in a subprocess, never in pytest's. Needs
llama-cpp-python built with -DGGML_RPC=ON (scripts/install-llama.sh,
which scripts/test.sh runs); without it these tests fail with the
message that says how to install it, except the one that checks that
message.

What this cannot prove: that a worker host vanishing without a FIN
really ends ggml's wait (that needs a dropped link, not a loopback);
here the options are read back from the socket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ds4tw._engine import rpc
from ds4tw._server import rpcworker

from .conftest import free_port

WORKER = str(Path(sys.executable).parent / "ds4tw-rpc-worker")


def _output(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=10)
    return out + err


def start_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [WORKER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def launched() -> Iterator[dict[str, Launched]]:
    """
    Every worker process this module needs, started at once (each spends
    about a second importing ds4tw) and stopped at the end: one that
    serves the client tests, one to stop with SIGTERM, and one that must
    refuse to start.
    """
    if not rpc.available():
        pytest.fail(str(rpc.RPCUnavailable(f"no libggml-rpc in {rpc.lib_dir()}")))
    specs = {
        "worker": ["--threads", "1"],
        "stopping": ["--threads", "1"],
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind
        # fails, and nothing is ever exposed.
        "non-loopback": ["--host", "192.0.2.1"],
    }
    procs: dict[str, Launched] = {}
    try:
        for name, args in specs.items():
            port = free_port()
            procs[name] = Launched(start_worker(*args, "--port", str(port)), port)
        yield procs
    finally:
        for launched in procs.values():
            if launched.proc.poll() is None:
                launched.proc.kill()
            launched.proc.communicate(timeout=10)


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    port: int

    def wait_listening(self) -> str:
        """The first line on stderr: that it listens (or an error)."""
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        # The first line: on loopback, no warning before it.
        assert f"RPC worker listening on 127.0.0.1:{self.port} (protocol 7.0.0): CPU" in line, (
            line + _output(self.proc)
        )
        return line

    def result(self) -> tuple[int, str]:
        """Its status and output, once it ended by itself."""
        output = _output(self.proc)
        return self.proc.returncode, output


@pytest.fixture(scope="module")
def worker(launched: dict[str, Launched]) -> rpc.Endpoint:
    """The worker of the client tests, once it listens."""
    launched["worker"].wait_listening()
    return rpc.Endpoint("127.0.0.1", launched["worker"].port)


def test_check_worker(worker: rpc.Endpoint) -> None:
    """The real server answers Python's HELLO with its version, and serves the next client."""
    assert rpc.check_worker(worker, timeout=5) == (7, 0, 0)
    assert rpc.check_worker(worker, timeout=5) == (7, 0, 0)


CLIENT = textwrap.dedent(
    """
    import ctypes, importlib.util, json, socket, sys

    # rpc.py imports nothing of ds4tw: loaded alone, this process does not
    # pay the second that importing the ds4tw package takes.
    spec = importlib.util.spec_from_file_location("rpc", sys.argv[2])
    rpc = sys.modules["rpc"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rpc)

    endpoint = rpc.parse_endpoints(sys.argv[1])
    devices = rpc.add_workers(endpoint)
    ggml = rpc.ggml_library()
    after_add = rpc.harden_sockets(endpoint)
    # A backend on the remote device holds ggml's connection, as a loaded
    # model's buffers do.
    ggml.ggml_backend_dev_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_dev_init.restype = ctypes.c_void_p
    ggml.ggml_backend_free.argtypes = [ctypes.c_void_p]
    backend = ggml.ggml_backend_dev_init(devices[0].handle, None)
    hardened = rpc.harden_sockets(endpoint, idle=7, interval=3, count=4, user_timeout_ms=9000)
    options = []
    for fd in rpc._socket_fds():
        def read(s):
            if s.family != socket.AF_INET or s.getpeername()[1] != endpoint[0].port:
                return False
            options.append([
                s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            ])
            return True
        rpc._with_socket(fd, read)
    ggml.ggml_backend_free(backend)
    print(json.dumps({
        "devices": [[d.name, d.description, d.index, d.free, d.total, d.handle]
                    for d in devices],
        "again": [d.handle for d in rpc.add_workers(endpoint)],
        "after_add": after_add,
        "hardened": hardened,
        "options": options,
        "after_free": rpc.harden_sockets(endpoint),
    }))
    """
)


def test_add_workers_and_harden(worker: rpc.Endpoint) -> None:
    """
    In a subprocess: add_workers lists the worker's CPU device with its
    memory; ggml keeps no connection after add_server, one while a backend
    on the device lives (harden_sockets finds it, and the options read back
    are those asked for), none after the backend is freed; a second
    add_workers gives the same devices.
    """
    run = subprocess.run(
        [sys.executable, "-c", CLIENT, str(worker), rpc.__file__],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    [[name, description, index, free, total, handle]] = result["devices"]
    assert name.startswith("RPC") and description == str(worker) and index == 0
    assert total > 0 and 0 < free <= total
    assert result["again"] == [handle]
    assert result["after_add"] == 0
    assert result["hardened"] == 1
    assert result["options"] == [[1, 7, 3, 4, 9000]]
    assert result["after_free"] == 0
    # The worker is free again for the next client.
    assert rpc.check_worker(worker, timeout=5) == (7, 0, 0)


def test_sigterm_stops_promptly(launched: dict[str, Launched]) -> None:
    stopping = launched["stopping"]
    stopping.wait_listening()
    start = time.monotonic()
    stopping.proc.send_signal(signal.SIGTERM)
    assert stopping.proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 2
    assert f"RPC worker on 127.0.0.1:{stopping.port} stopped" in _output(stopping.proc)
    with pytest.raises(rpc.WorkerDown, match="refused"):
        rpc.check_worker(rpc.Endpoint("127.0.0.1", stopping.port), timeout=2)


def test_non_loopback_warning_and_bind_failure(launched: dict[str, Launched]) -> None:
    """
    A host that is not loopback is warned about before anything listens;
    a bind that fails is status 1 with the reason.
    """
    status, output = launched["non-loopback"].result()
    assert status == 1, output
    assert "WARNING" in output and "not a loopback address" in output
    assert "no authentication" in output
    assert "could not listen on 192.0.2.1:" in output


@pytest.fixture
def rpc_logger() -> Iterator[None]:
    """main() sends ds4tw.rpc's records to stderr: undone after a test that runs it here."""
    logger = logging.getLogger("ds4tw.rpc")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("rpc_logger")
def test_unknown_device(capsys: pytest.CaptureFixture[str]) -> None:
    """
    Refused before anything starts, with this machine's devices listed
    (in this process: listing ggml's local devices cannot abort).
    """
    assert rpcworker.main(["--device", "NOPE", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'NOPE'" in err and "\n  CPU: " in err


@pytest.mark.usefixtures("rpc_logger")
def test_without_rpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A build without RPC, simulated by pointing $LLAMA_CPP_LIB_PATH (which
    llama-cpp-python honours for libllama too) at a directory without
    libggml-rpc: status 2, what is missing, and the one command to install
    a build with it. (In this process: nothing is loaded from that
    directory once libggml-rpc is seen missing.)
    """
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    assert rpcworker.main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"no libggml-rpc.so in {tmp_path}" in err
    assert rpc.INSTALL_COMMAND in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "0"], "--port 0: expected 1 to 65535"),
        (["--host", "localhost"], "'localhost' is not an IPv4 address"),
        (["--threads", "0"], "--threads 0: expected at least 1"),
        (["--device", ","], "no device named"),
        (["--nope"], "option --nope not recognized"),
    ],
)
def test_bad_arguments(args: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused while parsing, before any library is loaded (so in this process)."""
    assert rpcworker.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ds4tw-rpc-worker: ") and words in err and "(see --help)" in err
