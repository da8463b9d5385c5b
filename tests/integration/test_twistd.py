"""Packaging and process behaviour of `twistd ds4tw`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx

from .conftest import BIN, sse_lines, start_twistd, stop_twistd

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
    assert "ds4tw/__init__.py" in names and "ds4tw/_openai/routes.py" in names
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


def test_sigterm_mid_decode_cancels_and_exits_promptly(tmp_path: Path) -> None:
    server = start_twistd(tmp_path, "--keepalive", "1")
    payload = {
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }

    def client() -> None:
        # The server hangs up on it mid-stream; that is the point.
        with contextlib.suppress(Exception):
            sse_lines(server.url + "/v1/chat/completions", payload)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while not httpx.get(server.url + "/health").json()["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    stop_twistd(server)  # SIGTERM
    elapsed = time.monotonic() - t0
    t.join(30)
    log = server.log_text()
    assert "cancelled at decode (server shutting down)" in log
    assert "Server Shut Down." in log
    # 3000 tokens would take far longer than this on any machine we run on.
    assert elapsed < 10, elapsed
