"""
The two promises end to end on the demo model over a real socket:
keepalive frames while queued and prefilling, and a disconnect that
frees the worker at once. The server runs with --keepalive 1.

Timing assertions here are relative (to rates measured in the same
test) or generous bounds on the keepalive interval, never absolute speed.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from itertools import pairwise

import httpx

from .conftest import Twistd, sse_lines, unique_words

URL = "/v1/chat/completions"

#: One slot: a second request must queue behind a running one (with more
#: slots it would run beside it; tests/integration/test_batching.py).
TWISTD_ARGS = ("--parallel", "1")

#: The server's --keepalive (the twistd fixture's), and the scheduling
#: slack a silence may exceed it by.
K = 1.0
SLACK = 0.75


def content_lines(lines: list[tuple[float, str]]) -> list[tuple[float, str]]:
    return [(t, line) for t, line in lines if '"content":"' in line]


def test_disconnect_mid_decode_frees_the_worker(twistd: Twistd) -> None:
    twistd.wait_idle()
    cancelled_before = twistd.metric("ds4tw_cancelled_jobs_total", stage="decode")
    long_job = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    # Read 30 content chunks, then hang up.
    first = sse_lines(
        twistd.url + URL, long_job, stop_after=lambda ls: len(content_lines(ls)) >= 30
    )
    got = content_lines(first)
    rate = (len(got) - 1) / (got[-1][0] - got[0][0])  # tokens/s, measured here
    remaining = (3000 - len(got)) / rate
    t0 = time.monotonic()
    second = sse_lines(
        twistd.url + URL,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True},
    )
    ttft = content_lines(second)[0][0] if content_lines(second) else time.monotonic() - t0
    # The second request's first token came long before the first request
    # could have finished its 3000 tokens: the worker was freed.
    assert ttft < remaining / 4, (ttft, remaining)
    twistd.wait_idle()
    assert twistd.metric("ds4tw_cancelled_jobs_total", stage="decode") == cancelled_before + 1


def test_disconnect_of_non_streaming_request_frees_the_worker(twistd: Twistd) -> None:
    twistd.wait_idle()
    before = twistd.metric("ds4tw_jobs_total", outcome="cancelled")
    payload = {
        "messages": [{"role": "user", "content": "Write an essay."}],
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    with contextlib.suppress(httpx.TimeoutException):
        # The client gives up and closes the connection.
        httpx.post(twistd.url + URL, json=payload, timeout=1.5)
    deadline = time.monotonic() + 10
    while twistd.metric("ds4tw_jobs_total", outcome="cancelled") == before:
        assert time.monotonic() < deadline, "the abandoned non-streaming job was not cancelled"
        time.sleep(0.05)
    twistd.wait_idle(timeout=5)


def test_long_prompt_gets_prefill_frames_and_prefill_cancel(twistd: Twistd) -> None:
    """
    A long prompt alone on the server: its stream is never silent for
    longer than K (plus scheduling slack) while it prefills, it says
    C{: prefill}, and a hang-up during the prefill is a cancel there.
    Which comment comes first and how many there are depend on this CPU's
    speed, and are not the promise.
    """
    twistd.wait_idle()
    before = twistd.metric("ds4tw_cancelled_jobs_total", stage="prefill")

    def hang_up(lines: list[tuple[float, str]]) -> bool:
        # Two keepalive intervals watched, a prefill comment among them;
        # or anything but a comment (the prefill is over: too short a prompt).
        said_prefill = any(line == ": prefill" for _, line in lines)
        return (said_prefill and lines[-1][0] >= 2 * K) or not lines[-1][1].startswith(":")

    lines = sse_lines(
        twistd.url + URL,
        {
            "messages": [{"role": "user", "content": unique_words(1500, seed=1)}],
            "max_tokens": 5,
            "stream": True,
        },
        stop_after=hang_up,
    )
    assert ": prefill" in [line for _, line in lines], lines
    assert all(line.startswith(":") for _, line in lines), lines
    gaps = [b - a for (a, _), (b, _) in pairwise([(0.0, ""), *lines])]
    assert max(gaps) < K + SLACK, gaps
    twistd.wait_idle(timeout=10)
    assert twistd.metric("ds4tw_cancelled_jobs_total", stage="prefill") == before + 1


def test_queued_request_gets_queued_frames_then_its_answer(twistd: Twistd) -> None:
    twistd.wait_idle()
    hang_up = threading.Event()
    blocker = {
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    t = threading.Thread(
        target=sse_lines,
        args=(twistd.url + URL, blocker),
        kwargs={"stop_after": lambda _: hang_up.is_set()},
    )
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not httpx.get(twistd.url + "/health").json()["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)

        def stop(lines: list[tuple[float, str]]) -> bool:
            if sum(1 for _, line in lines if line == ": queued") >= 3:
                hang_up.set()  # free the model; this request should now run
            return lines[-1][1] == "data: [DONE]"

        lines = sse_lines(
            twistd.url + URL,
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True},
            stop_after=stop,
        )
    finally:
        hang_up.set()
        t.join(60)
    kinds = [line for _, line in lines]
    assert kinds[:3] == [": queued"] * 3
    assert kinds[-1] == "data: [DONE]"
    assert any('"content"' in k for k in kinds[3:])
    gaps = [b - a for (a, _), (b, _) in pairwise(lines)]
    assert max(gaps) < K + SLACK, gaps


DONE_LINE = re.compile(r"done: finish=\w+ prompt=(\d+) cached=(\d+) .*? prefill=([0-9.]+)s")
CANCEL_LINE = re.compile(r"cancelled at (\w+) \([^)]*\); stopped ([0-9.]+)ms after the cancel")


def test_prefill_cancel_stops_inside_the_batch(twistd: Twistd) -> None:
    """
    The abort flag reaches llama.cpp between graph nodes: a hang-up in
    the middle of a prefill batch stops it within milliseconds, not at
    the batch's end (before the in-step abort: up to one whole batch).
    """
    twistd.wait_idle()
    # This machine's batch time, now: a long prompt prefilled to the end.
    offset = len(twistd.log_text())
    sse_lines(
        twistd.url + URL,
        {
            "messages": [{"role": "user", "content": unique_words(1200, seed=11)}],
            "max_tokens": 1,
            "stream": True,
        },
    )
    twistd.wait_idle()
    done = DONE_LINE.findall(twistd.log_text()[offset:])
    assert done, twistd.log_text()[offset:]
    prompt, cached, prefill_s = int(done[-1][0]), int(done[-1][1]), float(done[-1][2])
    batches = -(-(prompt - cached) // 256)  # twistd's default --batch
    batch_ms = prefill_s / batches * 1000
    # Hang up on the first ": prefill" frame (K = 1 s into the prefill,
    # anywhere inside a batch).
    offset = len(twistd.log_text())
    sse_lines(
        twistd.url + URL,
        {
            "messages": [{"role": "user", "content": unique_words(1500, seed=12)}],
            "max_tokens": 5,
            "stream": True,
        },
        stop_after=lambda ls: any(line == ": prefill" for _, line in ls),
    )
    twistd.wait_idle(timeout=10)
    deadline = time.monotonic() + 10
    while not (lines := CANCEL_LINE.findall(twistd.log_text()[offset:])):
        assert time.monotonic() < deadline, twistd.log_text()[offset:]
        time.sleep(0.05)
    stage, latency_ms = lines[-1][0], float(lines[-1][1])
    assert stage == "prefill"
    # Generous: a quarter of a batch (measured: a few ms against ~1 s).
    assert latency_ms < 0.25 * batch_ms, (latency_ms, batch_ms)
