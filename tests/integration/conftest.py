"""
Real-model tests: the demo model behind a real `twistd -n ds4tw`
subprocess on a real TCP port, driven by the official SDKs and by httpx
for the raw SSE bytes (SDKs hide comment frames).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent

#: The arguments of the get_weather tool every dialect's tool tests offer:
#: bounded strings, so a greedy small model finishes its call.
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Twistd:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = httpx.get(self.url + "/health").json()
            if not h["busy"] and h["queue_depth"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError("the server did not become idle")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_twistd(tmp: Path, *args: str, port: int | None = None) -> Twistd:
    """A twistd -n ds4tw on C{port} (default: a free one), once healthy."""
    port = free_port() if port is None else port
    log = tmp / "twistd.log"
    cmd = [
        str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}",
        "ds4tw", "--listen", f"tcp:{port}:interface=127.0.0.1", *args,
    ]  # fmt: skip
    # faulthandler: a server that hangs is made to say where (stop_twistd).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    with open(tmp / "stderr.log", "wb") as stderr:  # the child keeps its own copy
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stderr=stderr)
    server = Twistd(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = (tmp / "stderr.log").read_text(errors="replace")
            raise AssertionError(
                f"twistd exited with {proc.returncode}:\n{log.read_text() if log.exists() else ''}"
                f"{said}"
            )
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("twistd did not become ready")


def stop_twistd(server: Twistd) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Every thread's Python stack, written by faulthandler on SIGABRT.
        server.proc.send_signal(signal.SIGABRT)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
        stacks = (server.log.parent / "stderr.log").read_text(errors="replace")
        raise AssertionError(
            f"twistd did not stop within 30 s of SIGTERM; its threads:\n{stacks[-6000:]}"
        ) from None


@pytest.fixture(scope="module")
def twistd(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Twistd]:
    # A module may add options (TWISTD_ARGS), e.g. one slot to test queueing.
    extra = getattr(request.module, "TWISTD_ARGS", ())
    server = start_twistd(
        tmp_path_factory.mktemp("twistd"), "--keepalive", "1", "--ctx", "4096", *extra
    )
    yield server
    stop_twistd(server)
    # twistd re-raises the signal it stopped on, once shut down cleanly.
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log_text()[-3000:]
    assert "Server Shut Down." in server.log_text()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def sse_lines(
    url: str, payload: dict[str, Any], stop_after: Any = None, timeout: float = 120
) -> list[tuple[float, str]]:
    """
    Stream a request; return (seconds since the request, line) for every
    non-empty SSE line. C{stop_after(lines)} returning true closes the
    connection early (a client going away).
    """
    out: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with httpx.stream("POST", url, json=payload, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                out.append((time.monotonic() - t0, line))
                if stop_after is not None and stop_after(out):
                    break
    return out


def unique_words(n: int, seed: int) -> str:
    """A prompt the KV cache has not seen (so prefill really runs)."""
    import random

    rng = random.Random(seed + time.time_ns())
    vocab = [
        "river",
        "stone",
        "cloud",
        "amber",
        "forest",
        "lantern",
        "copper",
        "meadow",
        "signal",
        "harbor",
        "violet",
    ]
    return " ".join(rng.choice(vocab) for _ in range(n))
