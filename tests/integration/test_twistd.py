"""Packaging and process behaviour of `twistd ds4tw`."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .conftest import BIN, sse_lines, start_twistd

ROOT = Path(__file__).resolve().parents[2]


def test_twistd_help_lists_the_plugin(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "ds4tw" in out
    sub = subprocess.run(
        [str(BIN / "twistd"), "ds4tw", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--listen",
        "--model",
        "--ctx",
        "--threads",
        "--keepalive",
        "--max-queue",
        "--drain-timeout",
        "--api-key",
        "--cors",
    ):
        assert option in sub


def test_wheel_ships_the_plugin_file(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    wheel = next(tmp_path.glob("ds4tw-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/ds4tw_plugin.py" in names
    # Shipping these would shadow Twisted's own packages.
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "ds4tw/__init__.py" in names and "ds4tw/_api/openai/dialect.py" in names
    # The chat page's files are package data: the page works from an installed wheel.
    assert {
        "ds4tw/_server/ui/page/index.html",
        "ds4tw/_server/ui/page/vendor/purify.es.mjs",
    } <= set(names)
    assert not any(n.startswith("tests/") for n in names)


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "ds4tw", "--model", str(tmp_path / "nope.gguf")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    assert "model file not found" in r.stderr + r.stdout
    assert "--model" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_a_model_that_fails_to_load_stops_twistd(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + bytes(4096))
    log = tmp_path / "twistd.log"
    cmd = [str(BIN / "twistd"), "-n", "--pidfile=", f"--logfile={log}", "ds4tw"]
    cmd += ["--model", str(bogus), "--listen", "tcp:0:interface=127.0.0.1"]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120)
    assert "the model failed to load" in log.read_text()
    assert "Main loop terminated." in log.read_text()


def test_sigterm_drains_then_ends_every_client_with_its_dialects_final_frame(
    tmp_path: Path,
) -> None:
    """
    SIGTERM with a chat stream in decode, an Anthropic stream queued and a
    non-streaming Responses request queued: /health says draining at once,
    a new request gets 503 + Retry-After, and at the drain timeout each
    client gets its dialect's last word; twistd exits 0.
    """
    # One slot, so that the second and third requests queue behind the first.
    server = start_twistd(tmp_path, "--keepalive", "1", "--drain-timeout", "3", "--parallel", "1")
    forever = {"max_tokens": 3000, "ignore_eos": True}
    got: dict[str, object] = {}

    def chat() -> None:
        payload = {"messages": [{"role": "user", "content": "Go on forever."}], "stream": True}
        got["chat"] = sse_lines(server.url + "/v1/chat/completions", {**payload, **forever})

    def messages() -> None:
        payload = {
            "model": "demo",
            "max_tokens": 3000,
            "messages": [{"role": "user", "content": "Go on forever."}],
            "stream": True,
        }
        got["messages"] = sse_lines(server.url + "/v1/messages", payload)

    def responses() -> None:
        payload = {"model": "demo", "input": "Go on forever.", "max_output_tokens": 3000}
        got["responses"] = httpx.post(server.url + "/v1/responses", json=payload, timeout=60)

    def until(check: Callable[[dict[str, Any]], bool]) -> None:
        deadline = time.monotonic() + 30
        while not check(httpx.get(server.url + "/health").json()):
            assert time.monotonic() < deadline
            time.sleep(0.02)

    threads = [threading.Thread(target=chat)]
    threads[0].start()
    until(lambda h: h["busy"])
    for f in (messages, responses):
        threads.append(threading.Thread(target=f))
        threads[-1].start()
    until(lambda h: h["queue_depth"] == 2)

    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    while (health := httpx.get(server.url + "/health")).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    late = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "server_shutting_down"

    server.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    log = server.log_text()
    assert server.proc.returncode == 0, log[-3000:]
    # 3000 tokens would take far longer than this on any machine we run on.
    assert 2.5 < elapsed < 15, elapsed

    chat_lines = [line for _, line in got["chat"]]  # type: ignore[attr-defined]
    assert chat_lines[-2].startswith("event: error") or chat_lines[-3].startswith("event: error")
    error = json.loads(next(x for x in reversed(chat_lines) if x.startswith("data: {"))[6:])
    assert error["error"]["code"] == "server_shutting_down"
    assert chat_lines[-1] == "data: [DONE]"

    anthropic_lines = [line for _, line in got["messages"]]  # type: ignore[attr-defined]
    assert anthropic_lines[-2] == "event: error"
    body = json.loads(anthropic_lines[-1][6:])
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "event: message_start" in anthropic_lines  # it was admitted before the SIGTERM

    waiting = got["responses"]
    assert isinstance(waiting, httpx.Response) and waiting.status_code == 503
    assert waiting.json()["error"]["code"] == "server_shutting_down"

    assert "0 drained, 3 cancelled at the drain timeout" in log
    assert "cancelled at decode (server shutting down)" in log
    assert "Server Shut Down." in log
    assert "Traceback" not in log, log[-3000:]


def test_sigterm_answers_a_request_on_an_open_connection_then_closes_it(tmp_path: Path) -> None:
    """
    A proxy's kept-alive connection that sends a request just after an idle
    server got SIGTERM (its drain over at once, its port already closed)
    gets a whole 503 saying so, then a clean close: never a dropped
    connection, which the proxy would answer with a 502.
    """
    server = start_twistd(tmp_path, "--model", "scripted:tps=200,reply=hi")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    first = conn.getresponse()
    assert first.status == 200 and first.getheader("connection") != "close"
    first.read()

    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # until the port is closed: the drain is over
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the port stayed open"
        time.sleep(0.005)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    late = conn.getresponse()
    assert late.status == 503 and late.getheader("retry-after")
    assert late.getheader("connection") == "close"
    assert json.loads(late.read())["error"]["code"] == "server_shutting_down"
    assert conn.sock is None or conn.sock.recv(1) == b""  # closed after it
    conn.close()
    server.proc.wait(timeout=30)
    assert server.proc.returncode == 0, server.log_text()[-3000:]
