"""
Keepalive timing: the longest silence on a stream that is queued, then
prefilling a long prompt, then decoding without sending anything.

One probe: a blocker job decodes visibly; the probe (a chat stream with
a long prompt) queues behind it for a while; the blocker hangs up, the
probe prefills, then decodes with its whole output hidden. The server
runs with a small C{--keepalive K} and a chat template whose generation
prompt opens C{<think>} (L{ds4tw.bench._workload.THINK_TEMPLATE}), so on
the non-thinking demo model every token is reasoning, hidden by
C{reasoning_effort: "none"}: the decode sends no byte but comments. The
analysis checks that this is really so (no text delta while decoding,
usage says every completion token was reasoning) rather than trusting it.

Every socket read of the probe is timestamped; the gaps between them
(from the request being sent) must each be at most K + 0.1 s.

Covered by tests/unit/test_bench.py (L{analyse_probe}).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from . import _client
from ._servers import ServerProcess
from ._settings import Settings
from ._sse import ResponseReader, comments, finish_reason, text_times, usage
from ._stats import gaps, summary
from ._workload import Prompts, completion_body, silent_chat_body

#: What a gap may exceed the keepalive interval by (the keepalive target).
SLACK_S = 0.1


def read_labels(reader: ResponseReader) -> list[tuple[float, str]]:
    """
    Each read's time and what it brought: C{headers}, a comment's name
    (C{queued}, C{prefill}, C{decode}), C{data}, or C{bytes} (a partial
    frame).
    """
    by_time: dict[float, str] = {}
    for e in reader.events:
        label = e.text if e.kind == "comment" else "data"
        # A read that completed several frames is named by its first.
        by_time.setdefault(e.t, label)
    out = []
    for t, _ in reader.reads:
        if t == reader.head_t and t not in by_time:
            out.append((t, "headers"))
        else:
            out.append((t, by_time.get(t, "bytes")))
    return out


def analyse_probe(stream: _client.Stream, keepalive: float, silent_tokens: int) -> dict[str, Any]:
    """Gaps, their stages, and whether the decode really was silent."""
    reader = stream.reader
    labelled = read_labels(reader)
    times = [t for t, _ in labelled]
    silences = gaps(times, start=stream.sent)
    by_stage: dict[str, list[float]] = {}
    for gap, (_, label) in zip(silences, labelled, strict=False):
        by_stage.setdefault(label, []).append(gap)
    u = usage(reader.events) or {}
    details = u.get("completion_tokens_details") or {}
    texts = text_times(reader.events, kind=None)
    counts = Counter(comments(reader.events))
    limit = keepalive + SLACK_S
    longest = max(silences) if silences else None
    return {
        "status": stream.status,
        "error": stream.error,
        "gaps_s": silences,
        "max_gap_s": longest,
        "max_gap_by_stage_s": {k: max(v) for k, v in by_stage.items()},
        "late_gaps": sum(1 for g in silences if g > limit),
        "comment_frames": dict(counts),
        "completion_tokens": u.get("completion_tokens"),
        "reasoning_tokens": details.get("reasoning_tokens"),
        "text_deltas": len(texts),
        "finish_reason": finish_reason(reader.events),
        # Silent: nothing but comments (and the role/finish chunks) while
        # all the asked-for tokens were decoded as reasoning.
        "silent_decode_verified": (
            len(texts) == 0
            and u.get("completion_tokens") == silent_tokens
            and details.get("reasoning_tokens") == silent_tokens
            and counts.get("decode", 0) > 0
        ),
        "all_stages_seen": all(counts.get(s, 0) > 0 for s in ("queued", "prefill", "decode")),
    }


def probe(server: ServerProcess, settings: Settings, prompts: Prompts) -> dict[str, Any]:
    """One queued -> prefill -> silent decode probe; see the module docstring."""
    release = threading.Event()
    started = threading.Event()
    blocker: dict[str, Any] = {}

    def hold(reader: ResponseReader) -> bool:
        if reader.events:
            started.set()
        return release.is_set()

    def run_blocker() -> None:
        body = completion_body("ds4tw", prompts.words(settings.short_words), settings.ctx // 2)
        try:
            blocker["stream"] = _client.stream(server.port, "/v1/completions", body, hang_up=hold)
        finally:
            started.set()  # never leave the probe waiting on a failed blocker

    probe_prompt = prompts.words(settings.probe_words)
    thread = threading.Thread(target=run_blocker, name="bench-blocker", daemon=True)
    thread.start()
    try:
        if not started.wait(timeout=120):
            raise RuntimeError("the blocker job never started")
        timer = threading.Timer(settings.probe_queued_s, release.set)
        timer.start()
        try:
            body = silent_chat_body(probe_prompt, settings.silent_tokens)
            s = _client.stream(server.port, "/v1/chat/completions", body, timeout=300)
        finally:
            timer.cancel()
    finally:
        release.set()
        thread.join(timeout=60)
    result = analyse_probe(s, settings.keepalive, settings.silent_tokens)
    b = blocker.get("stream")
    result["blocker_hung_up"] = b is not None and b.hung_up is not None
    return result


def measure(server: ServerProcess, settings: Settings) -> dict[str, Any]:
    prompts = Prompts(settings.seed + 13)
    probes = [probe(server, settings, prompts) for _ in range(settings.keepalive_probes)]
    all_gaps = [g for p in probes for g in p["gaps_s"]]
    longest = max(all_gaps) if all_gaps else None
    limit = settings.keepalive + SLACK_S
    return {
        "keepalive_s": settings.keepalive,
        "limit_s": limit,
        "probes": probes,
        "gaps_s": summary(all_gaps),
        "max_gap_s": longest,
        "within_limit": longest is not None and longest <= limit,
        "silent_decode_verified": all(p["silent_decode_verified"] for p in probes),
        "all_stages_seen": all(p["all_stages_seen"] for p in probes),
    }
