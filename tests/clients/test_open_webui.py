"""
Open WebUI's own requests to an Ollama server, captured from the real
thing (tests/clients/fixtures/open-webui-*.json, README.md there; taken by
scripts/capture-open-webui.py), replayed against ds4tw: each must be
answered in the shape Open WebUI reads.

What Open WebUI 0.12.4 reads (backend/open_webui/routers/ollama.py,
utils/models.py, utils/response.py, utils/misc.py, utils/session_pool.py):
- Every non-streamed answer through aiohttp's `r.json()`, which refuses a
  body whose Content-Type is not application/json (send_get_request,
  send_request): Open WebUI would take the backend for unreachable.
- GET /api/tags: `models`, each with `model` (merge_models_lists) and
  `name` (fetch_ollama_models indexes it).
- GET /api/ps: `models`, each with `model`; an `expires_at` goes through
  `datetime.fromisoformat` (get_all_models).
- GET /api/version: `version`, as ints once a leading "v" and any "-..."
  are cut (`tuple(map(int, re.sub(r'^v|-.*', '', v).split('.')))`).
- POST /api/show: passed to the front end as it is (a JSON object).
- POST /api/chat, streamed: stream_chunks_handler splits the body on
  "\\n" and yields every line, an empty one included, to
  convert_streaming_response_ollama_to_openai, which JSON-parses each: a
  blank line would end the chat with an exception. A chunk's
  `message.content` (and `thinking`, `tool_calls`) become the OpenAI delta;
  `done`, `done_reason` and the counters the final chunk's usage (ints:
  `total_duration // 1_000_000_000`).
- POST /api/chat, not streamed: `message.content`, `done_reason` and the
  counters (convert_response_ollama_to_openai).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Twistd

from .conftest import REPLY

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURED = sorted(FIXTURES.glob("open-webui-*.json"))
COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration")  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def replay(server: Twistd, captured: dict[str, Any]) -> httpx.Response:
    """The request as Open WebUI sent it, to C{server} (its own Host, length)."""
    headers = [
        (k, v) for k, v in captured["headers"] if k.lower() not in ("host", "content-length")
    ]
    body = None
    if captured["body"] is not None:
        body = json.dumps(captured["body"], separators=(",", ":")).encode()
    return httpx.request(
        captured["method"], server.url + captured["path"], headers=headers, content=body, timeout=60
    )


def test_the_capture_is_whole() -> None:
    """One release, and every call the capture drove reached the Ollama side."""
    captured = [load(p) for p in CAPTURED]
    assert len({c["version"] for c in captured}) == 1
    routes = {(c["method"], c["path"]) for c in captured}
    assert routes == {
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
        ("POST", "/api/show"),
        ("POST", "/api/chat"),
    }
    streams = [c["body"].get("stream") for c in captured if c["path"] == "/api/chat"]
    assert True in streams and False in streams


def json_body(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    # aiohttp's r.json() checks the type before it parses.
    assert r.headers["content-type"].split(";")[0] == "application/json"
    return r.json()


def check_chat_stream(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    *lines, rest = r.content.split(b"\n")
    assert rest == b""
    chunks = [json.loads(line) for line in lines]  # a blank line fails here too
    *body, last = chunks
    for chunk in body:
        assert chunk["done"] is False and isinstance(chunk["message"]["content"], str)
    assert last["done"] is True and last["done_reason"] == "stop"
    assert all(isinstance(last[k], int) for k in COUNTERS), last
    assert "".join(c["message"]["content"] for c in chunks) == REPLY
    return chunks


@pytest.mark.parametrize("path", CAPTURED, ids=lambda p: p.stem)
def test_each_request_is_answered_as_open_webui_reads_it(fast: Twistd, path: Path) -> None:
    captured = load(path)
    r = replay(fast, captured)
    route = captured["path"]
    if route == "/api/tags":
        models = json_body(r)["models"]
        assert models and all(isinstance(m["model"], str) and m["name"] for m in models)
    elif route == "/api/ps":
        for m in json_body(r)["models"]:
            assert isinstance(m["model"], str)
            if "expires_at" in m:
                datetime.fromisoformat(m["expires_at"]).timestamp()
    elif route == "/api/version":
        version = json_body(r)["version"]
        assert tuple(map(int, re.sub(r"^v|-.*", "", version).split(".")))
    elif route == "/api/show":
        assert isinstance(json_body(r), dict)
    elif route == "/api/chat" and captured["body"].get("stream", True):
        check_chat_stream(r)
    elif route == "/api/chat":
        answer = json_body(r)
        assert answer["message"]["content"] == REPLY and answer["done_reason"] == "stop"
        assert all(isinstance(answer[k], int) for k in COUNTERS), answer
    else:
        raise AssertionError(f"no check for {route}")


def test_the_streamed_chat_through_keepalives(paced: Twistd) -> None:
    """The streamed chat on a slow prefill: its keepalive lines parse too."""
    chats = [c for c in map(load, CAPTURED) if c["path"] == "/api/chat"]
    (captured,) = [c for c in chats if c["body"].get("stream", True)]
    chunks = check_chat_stream(replay(paced, captured))
    first_text = next(i for i, c in enumerate(chunks) if c["message"]["content"])
    assert first_text >= 1, chunks  # keepalive chunks: content "", done false
    assert chunks[-1]["prompt_eval_duration"] > 1.3e9, chunks[-1]
