"""
`twistd -n ds4tw --model scripted:SPEC`: a real server without a model,
paced in its model thread, with a prefix cache; and X-Session-Id.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import BIN, Twistd, sse_lines, start_twistd, stop_twistd

TPS = 40.0
PREFILL_TPS = 2000.0
REPLY = "One, two; three four five six seven eight nine ten eleven twelve thirteen fourteen."
WORDS = len(REPLY.split(" "))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    spec = f"scripted:tps={TPS:g};prefill_tps={PREFILL_TPS:g},reply={REPLY}"
    server = start_twistd(
        tmp_path_factory.mktemp("scripted"), "--model", spec, "--keepalive", "1", "--batch", "32"
    )
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def chat(server: Twistd, messages: list[dict[str, str]]) -> list[tuple[float, str]]:
    payload = {
        "model": "any",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return sse_lines(server.url + "/v1/chat/completions", payload, timeout=30)


def content_and_usage(lines: list[tuple[float, str]]) -> tuple[list[float], str, dict[str, int]]:
    times, text, usage = [], "", {}
    for t, line in lines:
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content")
            if piece:
                times.append(t)
                text += piece
    return times, text, usage


def test_streams_the_reply_at_the_configured_pace(scripted: Twistd) -> None:
    lines = chat(scripted, [{"role": "user", "content": "Count for me, please."}])
    times, text, usage = content_and_usage(lines)
    assert text == REPLY
    assert len(times) == WORDS == usage["completion_tokens"]
    decode = times[-1] - times[0]
    expected = (WORDS - 1) / TPS
    assert 0.8 * expected <= decode <= 5 * expected + 0.5, decode
    # The prompt (one token per character) took its prefill time too.
    prefill = usage["prompt_tokens"] / PREFILL_TPS
    assert times[0] >= 0.8 * (prefill + 1 / TPS)


def test_the_second_turn_reports_cached_tokens(scripted: Twistd) -> None:
    first_turn = [{"role": "user", "content": "A conversation about rivers, long enough."}]
    _, text, first = content_and_usage(chat(scripted, first_turn))
    # Only the template's opening is shared with the last test's prompt.
    assert first["prompt_tokens_details"]["cached_tokens"] < 25
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And the next?"},
    ]
    _, _, second = content_and_usage(chat(scripted, second_turn))
    cached = second["prompt_tokens_details"]["cached_tokens"]
    # The whole first prompt but the generation prompt's last token or so.
    assert first["prompt_tokens"] - 2 <= cached < second["prompt_tokens"]
    # Another conversation shares only the template's opening (as above).
    _, _, other = content_and_usage(chat(scripted, [{"role": "user", "content": "Zebra?"}]))
    assert other["prompt_tokens_details"]["cached_tokens"] < 25


def test_session_id_is_echoed_and_logged(scripted: Twistd) -> None:
    r = httpx.post(
        scripted.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"X-Session-Id": "agent-42"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["x-session-id"] == "agent-42"
    scripted.wait_idle()
    assert "session=agent-42 done:" in scripted.log_text()


def test_a_bad_spec_stops_twistd_with_the_reason(tmp_path: Path) -> None:
    run = subprocess.run(
        [str(BIN / "twistd"), "-n", "ds4tw", "--model", "scripted:tps=fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "tps must be a number >= 0, got 'fast'" in run.stdout + run.stderr
