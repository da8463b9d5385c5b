"""
ollama-js (npm `ollama`, the release scripts/install-agents.sh pins) against
`twistd -n ds4tw` on the scripted engine: version, list, ps, show; chat and
generate, streamed and not; errors as the library surfaces them.

How ollama-js 0.6.4 reads a stream (src/utils.ts; dist/browser.mjs is the
same code): parseJSON (utils.ts:299-340) splits the body on "\\n" and
JSON.parse()s every complete line; a line that does not parse (an empty
one included) is dropped with console.warn("invalid json: ", line), not
thrown; what is left after the last "\\n" is parsed once the body ends,
blank parts skipped. AbortableAsyncIterator (utils.ts:45-59) then throws
a plain Error(message.error), not ResponseError, for any object with an
"error" key; stops after the first object with done (or status
"success"); and throws "Did not receive done or success response in
stream." if the body ends before one. ResponseError(error, status_code)
comes only from checkOk (utils.ts:67-92), for a non-2xx status: the
"error" field of a JSON body (content-type application/json), else the
body's text. The library sends stream: false unless asked
(browser.ts:80), so Ollama's stream-by-default never reaches it.

So ds4tw's keepalive chunks (content "", done false) must be whole JSON
lines, never blank lines (which would warn on every keepalive); they
reach the caller as chunks with empty content, which add no text.

The node side is tests/clients/ollama_js.mjs.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Twistd, start_twistd, stop_twistd

from .conftest import CTX, KEEPALIVE_S, REPLY

SCRIPT = Path(__file__).parent / "ollama_js.mjs"
MODEL = "scripted"
#: What the longest wait in a stream may exceed the keepalive by (a shared,
#: busy machine; the keepalive itself fires after KEEPALIVE_S of silence).
MARGIN_S = 1.5


def run(package: str, server: Twistd, *steps: str) -> dict[str, dict[str, Any]]:
    """Each step's outcome, as ollama_js.mjs reports it."""
    done = subprocess.run(
        ["node", str(SCRIPT), package, server.url, MODEL, *steps],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # No "invalid json" warning: every line ds4tw wrote was a JSON object.
    assert done.stderr == "", done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["step"] for o in out] == list(steps), done.stdout
    return {o["step"]: o for o in out}


def value(outcome: dict[str, Any]) -> Any:
    assert outcome["ok"], outcome
    return outcome["value"]


def test_the_pinned_release(ollama_js: tuple[str, str]) -> None:
    package, version = ollama_js
    manifest = Path(package) / "node_modules" / "ollama" / "package.json"
    assert json.loads(manifest.read_text())["version"] == version


def test_calls_and_errors(ollama_js: tuple[str, str], fast: Twistd) -> None:
    got = run(ollama_js[0], fast, "version", "list", "ps", "show", "chat", "generate",
              "show_missing", "pull")  # fmt: skip
    assert value(got["version"])["version"].count(".") == 2
    (model,) = value(got["list"])["models"]
    assert model["model"] == model["name"] == MODEL
    (loaded,) = value(got["ps"])["models"]
    assert loaded["model"] == MODEL and loaded["context_length"] == CTX
    show = value(got["show"])
    assert "completion" in show["capabilities"]
    arch = show["model_info"]["general.architecture"]
    assert show["model_info"][f"{arch}.context_length"] == CTX

    chat = value(got["chat"])
    assert chat["message"] == {"role": "assistant", "content": REPLY}
    assert chat["done"] is True and chat["done_reason"] == "stop"
    assert chat["eval_count"] == len(REPLY.split())
    generate = value(got["generate"])
    assert generate["response"] == REPLY and generate["done_reason"] == "stop"

    # A non-2xx answer is the library's ResponseError, with the body's
    # "error" as its message and the status.
    missing = got["show_missing"]["error"]
    assert missing == {
        "name": "ResponseError",
        "message": "model 'no-such-model:latest' not found",
        "status_code": 404,
        "response_error": True,
    }
    pull = got["pull"]["error"]
    assert pull["response_error"] and 400 <= pull["status_code"] < 600
    assert "does not manage models" in pull["message"]


def check_stream(chunks: list[dict[str, Any]], text_key: str) -> None:
    """Keepalive chunks came first, add no text, and kept every wait short."""
    pieces = [c["chunk"] for c in chunks]
    texts = [p[text_key]["content"] if text_key == "message" else p[text_key] for p in pieces]
    *body, last = pieces
    assert all(p["done"] is False for p in body) and last["done"] is True
    assert last["done_reason"] == "stop" and last["eval_count"] == len(REPLY.split())
    assert "".join(texts) == REPLY
    first_text = next(i for i, t in enumerate(texts) if t)
    # Keepalives: before the text, empty, not done (every chunk before the
    # first text is one).
    assert first_text >= 1, pieces
    # The prefill took seconds (the prompt's tokens at the paced rate) ...
    assert last["prompt_eval_duration"] > (KEEPALIVE_S + 0.3) * 1e9, last
    # ... and no wait, the first included, was much over the keepalive.
    times = [0.0] + [c["t"] for c in chunks]
    longest = max(b - a for a, b in itertools.pairwise(times))
    assert longest <= KEEPALIVE_S + MARGIN_S, (longest, times)


def test_streams_through_keepalives(ollama_js: tuple[str, str], paced: Twistd) -> None:
    got = run(ollama_js[0], paced, "chat_stream", "generate_stream")
    check_stream(value(got["chat_stream"]), "message")
    check_stream(value(got["generate_stream"]), "response")


@pytest.fixture
def draining(tmp_path: Path) -> Iterator[Twistd]:
    """A slow decode on a server that cancels everything at SIGTERM."""
    reply = " ".join(f"word{i}" for i in range(200))
    server = start_twistd(
        tmp_path, "--model", f"scripted:tps=20,reply={reply}", "--drain-timeout", "0"
    )
    yield server
    if server.proc.poll() is None:  # the test failed before stopping it
        stop_twistd(server)


def test_an_error_mid_stream(ollama_js: tuple[str, str], draining: Twistd) -> None:
    node = subprocess.Popen(
        ["node", str(SCRIPT), ollama_js[0], draining.url, MODEL, "chat_interrupted"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None
        assert json.loads(node.stdout.readline()) == {"step": "first_chunk"}
        draining.proc.send_signal(signal.SIGTERM)
        out, err = node.communicate(timeout=30)
    finally:
        node.kill()
    draining.proc.wait(timeout=30)
    assert err == "", err
    outcome = json.loads(out)
    # The final {"error": ...} line: ollama-js throws it as a plain Error
    # (AbortableAsyncIterator), not a ResponseError (the status was 200).
    assert outcome["ok"] is False
    error = outcome["error"]
    assert error["name"] == "Error" and error["status_code"] is None
    assert "shut down" in error["message"], error
    log = draining.log_text()
    assert "cancelled at decode" in log and "Traceback" not in log, log[-3000:]
