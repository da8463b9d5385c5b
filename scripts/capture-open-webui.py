"""
Capture what Open WebUI sends to an Ollama server, and check it in as
tests/clients/fixtures/open-webui-VERSION-NN-NAME.json: every request it
made to the Ollama side (method, path, headers, body, exactly as sent),
beside where it came from (release, date, the call into Open WebUI that
caused it). tests/clients/test_open_webui.py replays them against ds4tw.

    .venv/bin/python scripts/capture-open-webui.py --venv /tmp/owui

Open WebUI is far too heavy for CI (about 3 GB with the CPU build of
torch), so it is installed by hand in a venv of its own, outside the
checkout, and run here once per release:

    python3 -m venv /tmp/owui
    /tmp/owui/bin/pip install torch==2.13.0     # the CPU build, first
    /tmp/owui/bin/pip install open-webui==0.12.4

It runs headless (no browser: its REST API is driven with httpx, as its
own front end would), offline, with a fresh data directory, and with its
Ollama connection pointed at a recording proxy in front of twistd on the
scripted engine. The first account signed up is the admin; then the calls
an admin's session makes for models, Ollama's version and loaded models, a
model's details, one chat with streaming and one without (through Open
WebUI's own /api/chat/completions, which turns the OpenAI-shaped request
into Ollama's /api/chat), and the title the front end asks for after a
chat's first reply.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agents.recorder import Recorded, Recorder  # noqa: E402
from tests.integration.conftest import free_port, start_twistd, stop_twistd  # noqa: E402

FIXTURES = ROOT / "tests" / "clients" / "fixtures"
MODEL = "scripted"
REPLY = "Hello from ds4tw."
PROMPT = "Say hello."

#: Open WebUI offline, headless, nothing it would fetch at start or send out.
ENV = {
    "ENABLE_OLLAMA_API": "true",
    "ENABLE_OPENAI_API": "false",
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
    "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
    "WHISPER_MODEL_AUTO_UPDATE": "false",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    "ENABLE_WEBSOCKET_SUPPORT": "false",
    "ANONYMIZED_TELEMETRY": "false",
    "DO_NOT_TRACK": "true",
    "SCARF_NO_ANALYTICS": "true",
    "WEBUI_SECRET_KEY": "ds4tw-capture",
}


def start_open_webui(
    venv: Path, data: Path, ollama_url: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, **ENV, "DATA_DIR": str(data), "OLLAMA_BASE_URL": ollama_url}
    log = open(data / "open-webui.log", "wb")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        [str(venv / "bin" / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"open-webui exited {proc.returncode}; see {data / 'open-webui.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"open-webui did not start; see {data / 'open-webui.log'}")


def drive(url: str, recorder: Recorder) -> list[tuple[str, str, int]]:
    """
    Open WebUI's calls, in order; for each, its name, what it was and how
    many requests the proxy had seen before it.
    """
    steps: list[tuple[str, str, int]] = []
    client = httpx.Client(base_url=url, timeout=120)

    def call(name: str, method: str, path: str, body: Any = None) -> httpx.Response:
        steps.append(
            (
                name,
                f"{method} {path}" + (f" {json.dumps(body)}" if body else ""),
                len(recorder.requests),
            )
        )
        r = client.request(method, path, json=body)
        assert r.status_code == 200, (name, r.status_code, r.text[:2000])
        return r

    signup = {"name": "Admin", "email": "admin@example.com", "password": "ds4tw-capture-1"}
    token = call("signup", "POST", "/api/v1/auths/signup", signup).json()["token"]
    client.headers["Authorization"] = f"Bearer {token}"
    models = call("models", "GET", "/api/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL], models
    call("version", "GET", "/ollama/api/version")
    call("ps", "GET", "/ollama/api/ps")
    call("show", "POST", "/ollama/api/show", {"model": MODEL})
    messages = [{"role": "user", "content": PROMPT}]
    # As a chat with a system prompt and the chat's own parameters (the
    # front end's "Advanced Params") sends it.
    streamed = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are terse."}, *messages],
        "stream": True,
        "temperature": 0.2,
        "max_tokens": 64,
    }
    stream = call("chat-stream", "POST", "/api/chat/completions", streamed)
    assert REPLY.split()[0] in stream.text, stream.text
    plain = call(
        "chat",
        "POST",
        "/api/chat/completions",
        {"model": MODEL, "messages": messages, "stream": False},
    )
    assert plain.json()["choices"][0]["message"]["content"] == REPLY, plain.text
    # What the front end asks after a chat's first reply.
    answered = [*messages, {"role": "assistant", "content": REPLY}]
    call("title", "POST", "/api/v1/tasks/title/completions", {"model": MODEL, "messages": answered})
    return steps


def fixture(rec: Recorded, step: tuple[str, str, int], version: str, n: int) -> dict[str, Any]:
    body: Any = None
    if rec.body:
        body = json.loads(rec.body)
    return {
        "client": "open-webui",
        "version": version,
        "captured": datetime.date.today().isoformat(),
        "caused_by": step[1],
        "n": n,
        "method": rec.method,
        "path": rec.path,
        "headers": rec.headers,
        "body": body,
        "status_then": rec.status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", type=Path, required=True, help="the venv open-webui is installed in"
    )
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    version = subprocess.run(
        [
            str(args.venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('open-webui'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ds4tw-owui-") as tmp:
        base = Path(tmp)
        server = start_twistd(base, "--model", f"scripted:reply={REPLY}", "--keepalive", "1")
        recorder = Recorder(upstream=server.url).start()
        proc = None
        try:
            (base / "data").mkdir()
            proc, url = start_open_webui(args.venv, base / "data", recorder.url)
            steps = drive(url, recorder)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            recorder.stop()
            stop_twistd(server)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob(f"open-webui-{version}-*.json"):
        old.unlink()
    for n, rec in enumerate(recorder.requests):
        # The last call that began before the proxy saw this request.
        step = [s for s in steps if s[2] <= n][-1]
        name = rec.route.strip("/").replace("/", "-")
        path = args.out / f"open-webui-{version}-{n:02d}-{step[0]}-{name}.json"
        path.write_text(json.dumps(fixture(rec, step, version, n), indent=2) + "\n")
        print(path, rec.method, rec.path, rec.status)


if __name__ == "__main__":
    main()
