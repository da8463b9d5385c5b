"""
The Ollama dialect's stream under a long prefill, with real clients: raw
httpx here, and the pieces of issue 22's acceptance test, a 40 s prefill
behind C{--keepalive 2} that survives in the official C{ollama} Python
library on C{/api/chat} and C{/api/generate} (L{stream_long_prefills},
L{check_long_prefills}), which runs in
tests/agents/test_long_prefill.py: beside the agents' own long prefills,
so that the suite waits through one long prefill, not two.

The scripted engine under C{twistd -n ds4tw} paces its prefill at
L{PREFILL_TPS} prompt tokens a second (one token per character), so a
prompt of L{PROMPT_CHARS} characters takes about L{PREFILL_S} seconds,
slept in the model thread as a model would compute it. The library
streams the turn and the test notes when every chunk arrived: the whole
reply comes with no exception; no wait between chunks (or before the
first) is longer than the keepalive and a margin (L{MARGIN_S}); the
keepalive chunks the library yields have empty content and C{done:
false}, so the joined text is exactly the reply; and the server's job
line says the prefill really took its 40 s (the test proves a long
prefill, not a fast one). Chat and generate run at once, each against a
server of its own (an engine's steps are shared by its slots, so one
server would pace the two prompts together).

Here, with raw httpx: a keepalive line is exactly one JSON object and a
C{\\n} (never a blank line, never an SSE comment, which the library would
fail to parse), and a client that hangs up during the paced prefill
cancels the job there, as the server's log says.

Caveat: the C{ollama} library has no read timeout by default, so this
proves that its NDJSON parsing survives the keepalive chunks and yields
them harmlessly, and that the server keeps writing through a long
prefill; a client given a read timeout shorter than K would still give
up (its setting, not the stream's).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from typing import Any

import httpx
import ollama
import pytest

from .conftest import Twistd, start_twistd, stop_twistd

#: The server's --keepalive, in seconds.
K = 2
#: What the longest wait may exceed K by. The keepalive fires K idle
#: seconds after the last write, on a reactor that shares two cores with
#: the other server and the test; measured here with other test runs
#: beside them (load average 2-3 on the two cores): longest waits of
#: 2.005-2.019 s over 20 keepalives a stream, i.e. 5-19 ms late. The
#: margin is some seventy times that, for a busy laptop, and still less than
#: a keepalive interval: a missed keepalive (a 4 s wait) fails the test.
MARGIN_S = 1.5
PREFILL_S = 40.0
PREFILL_TPS = 100.0
PROMPT_CHARS = int(PREFILL_S * PREFILL_TPS)
#: The prefill the job line must show: the prompt's characters and the
#: template's few dozen around them, at PREFILL_TPS.
LOW_S, HIGH_S = PREFILL_S - 1, PREFILL_S + 3
REPLY = "Hello after a long prefill."
WORDS = len(REPLY.split(" "))

JOB_LINE = re.compile(r" done: finish=(\w+) prompt=(\d+) cached=(\d+) .*? prefill=([\d.]+)s ")
CANCELLED = re.compile(r" cancelled at (queued|prefill|decode) ")


def prompt(word: str) -> str:
    """PROMPT_CHARS characters that share no prefix with another word's prompt."""
    return (f"{word} " * PROMPT_CHARS)[:PROMPT_CHARS]


def start_slow_servers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Twistd]:
    """One paced scripted server for chat and one for generate, started at once."""

    def start(name: str) -> Twistd:
        tmp = tmp_path_factory.mktemp(f"ollama-keepalive-{name}")
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"prefill_tps": PREFILL_TPS, "tps": 20, "reply": REPLY}))
        return start_twistd(
            tmp, "--model", f"scripted:{spec}", "--ctx", "8192", "--keepalive", str(K)
        )

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(("chat", "generate"), pool.map(start, ("chat", "generate")), strict=True))


def stop_slow_servers(started: dict[str, Twistd]) -> None:
    for server in started.values():
        stop_twistd(server)
        assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Twistd]]:
    started = start_slow_servers(tmp_path_factory)
    yield started
    stop_slow_servers(started)


def timed(chunks: Iterable[Any]) -> list[tuple[float, Any]]:
    """Every chunk with its arrival time, in seconds since the request."""
    t0 = time.monotonic()
    return [(time.monotonic() - t0, chunk) for chunk in chunks]


def job_lines(server: Twistd, offset: int) -> list[tuple[str, int, int, float]]:
    found = JOB_LINE.findall(server.log_text()[offset:])
    return [(finish, int(p), int(c), float(s)) for finish, p, c, s in found]


def cancels(server: Twistd, offset: int) -> list[str]:
    """The stages of the jobs cancelled since C{offset} in the server's log."""
    return CANCELLED.findall(server.log_text()[offset:])


def wait_for(check: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return result


def raw_lines(url: str, body: dict[str, Any], n: int) -> tuple[str, bytes, list[float]]:
    """
    POST C{body}, read the stream's raw bytes until C{n} whole lines have
    come, then hang up: the content type, the bytes and when each line ended.
    """
    buf, times = b"", []
    t0 = time.monotonic()
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        kind = r.headers["content-type"]
        for piece in r.iter_raw():
            buf += piece
            times += [time.monotonic() - t0] * piece.count(b"\n")
            if buf.count(b"\n") >= n:
                break
    return kind, buf, times


def test_keepalive_lines_are_one_json_object_each_and_a_hang_up_cancels_the_prefill(
    servers: dict[str, Twistd],
) -> None:
    shapes: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "chat": (
            "/api/chat",
            # No "stream": Ollama streams by default.
            {"model": "scripted", "messages": [{"role": "user", "content": prompt("amber")}]},
            {"message": {"role": "assistant", "content": ""}, "done": False},
        ),
        "generate": (
            "/api/generate",
            {"model": "scripted", "prompt": prompt("amber")},
            {"response": "", "done": False},
        ),
    }
    offsets = {name: len(s.log_text()) for name, s in servers.items()}

    def hang_up_after_two(name: str) -> tuple[str, bytes, list[float]]:
        route, body, _ = shapes[name]
        return raw_lines(servers[name].url + route, body, 2)

    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(shapes, pool.map(hang_up_after_two, shapes), strict=True))
    for name, (kind, buf, times) in got.items():
        assert kind.startswith("application/x-ndjson"), kind
        # Two whole lines, nothing after them: "\n" ends every line, and
        # no line is empty or an SSE comment.
        *lines, rest = buf.split(b"\n")
        assert rest == b"" and len(lines) == 2, buf
        for line in lines:
            assert line and not line.startswith((b":", b"data:", b"event:")), buf
            chunk, end = json.JSONDecoder().raw_decode(line.decode())
            assert end == len(line.decode()), line  # exactly one object
            assert chunk["model"] == "scripted" and chunk["created_at"]
            assert {k: v for k, v in chunk.items() if k not in ("model", "created_at")} == (
                shapes[name][2]
            )
        # Both came during the prefill (40 s), a keepalive interval apart.
        assert times[-1] <= 2 * (K + MARGIN_S), times
        server = servers[name]
        found = wait_for(partial(cancels, server, offsets[name]))
        assert found == ["prefill"], server.log_text()[offsets[name] :]
        server.wait_idle()


Streams = dict[str, list[tuple[float, Any]]]


def stream_long_prefills(servers: dict[str, Twistd]) -> tuple[dict[str, int], Streams]:
    """
    Stream a 40 s prefill's turn through the C{ollama} library on both
    servers at once: where each server's log stood before, and every
    chunk with its arrival time.
    """
    offsets = {name: len(s.log_text()) for name, s in servers.items()}

    def chat() -> list[tuple[float, Any]]:
        client = ollama.Client(host=servers["chat"].url)
        messages = [{"role": "user", "content": prompt("river")}]
        return timed(client.chat(model="scripted", messages=messages, stream=True))

    def generate() -> list[tuple[float, Any]]:
        client = ollama.Client(host=servers["generate"].url)
        return timed(client.generate(model="scripted", prompt=prompt("stone"), stream=True))

    with ThreadPoolExecutor(2) as pool:
        runs = {"chat": pool.submit(chat), "generate": pool.submit(generate)}
        return offsets, {name: run.result() for name, run in runs.items()}


def check_long_prefills(servers: dict[str, Twistd], offsets: dict[str, int], got: Streams) -> None:
    """The promise, as the library saw L{stream_long_prefills}' turns."""
    for name, chunks in got.items():

        def text(chunk: Any, name: str = name) -> str:
            return str((chunk.message.content if name == "chat" else chunk.response) or "")

        times = [t for t, _ in chunks]
        final = chunks[-1][1]
        # The whole reply, ended as Ollama ends a turn.
        assert [c.done for _, c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert "".join(text(c) for _, c in chunks) == REPLY
        assert final.done_reason == "stop" and final.eval_count == WORDS
        # The keepalives: everything before the first text, empty and not done.
        first_text = next(i for i, (_, c) in enumerate(chunks) if text(c))
        keepalives = [c for _, c in chunks[:first_text]]
        for c in keepalives:
            assert text(c) == "" and c.done is False
            if name == "chat":
                assert not c.message.thinking and not c.message.tool_calls
            else:
                assert not c.thinking
        # The server's job line: the prefill really took its 40 s.
        server = servers[name]
        [(finish, prompt_tokens, cached, prefill)] = wait_for(
            partial(job_lines, server, offsets[name])
        )
        assert finish == "stop" and cached < 50
        assert LOW_S <= prompt_tokens / PREFILL_TPS <= HIGH_S, prompt_tokens
        assert LOW_S <= prefill <= HIGH_S, prefill
        assert final.prompt_eval_count == prompt_tokens
        assert abs(final.prompt_eval_duration / 1e9 - prefill) < 0.5
        # The promise, as the library saw it: through the prefill, no wait
        # longer than the keepalive and a margin, the first one included.
        gaps = [b - a for a, b in pairwise([0.0, *times])]
        longest = max(gaps)
        assert longest <= K + MARGIN_S, (name, longest, gaps)
        # A keepalive every K seconds or so, all through the prefill.
        assert len(keepalives) >= (prefill - K) / (K + MARGIN_S), (name, len(keepalives))
        print(
            f"{name}: prefill {prefill:.2f} s, {len(keepalives)} keepalive chunks, "
            f"longest wait {longest:.3f} s, first text at {times[first_text]:.2f} s"
        )
