"""
Cancel latency: a client hangs up in the middle of a decode, or in the
middle of a long prompt's prefill, and ds4tw's own accounting says how
long the model thread took to stop.

The number comes from the server, not from a guess: ds4tw's per-job log
line (C{"... cancelled at decode (client disconnected); stopped 0.07ms
after the cancel ..."}) gives each job's latency from C{Job.cancel} (the
reactor seeing connectionLost) to the model thread stopping, and the
C{ds4tw_cancel_latency_seconds} histogram on /metrics gives the same
per stage (sum and count, a cross-check). The client adds one number the
server cannot know: from its hang-up to /health reporting the worker
idle (polled every 2 ms, so an upper bound that includes the poll).

Targets: decode latency at most one token time; prefill
latency at most one prefill batch time. The machine's speed varies (it is
shared), so each trial has its own reference, taken at the same moment:
for a decode cancel, the median interval between the tokens the client
received just before hanging up; for a prefill cancel, the slowest full
batch of a raw prefill of the same prompt run right before the trial (or
the scripted engine's fixed batch time).

Covered by tests/unit/test_bench.py (log and metrics parsing).
"""

from __future__ import annotations

import itertools
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import _client
from ._servers import ServerProcess
from ._settings import Settings
from ._sse import ResponseReader, comments, text_times
from ._stats import summary
from ._workload import Prompts, completion_body

CANCEL_LINE = re.compile(
    r"cancelled at (?P<stage>\w+) \((?P<reason>[^)]*)\); "
    r"stopped (?P<latency>[0-9.]+ms|-) after the cancel"
)

_LATENCY = "ds4tw_cancel_latency_seconds"

#: The cancel server's --keepalive: during a prefill the client hears a
#: C{: prefill} frame this often, and hangs up on one of them.
CANCEL_KEEPALIVE = 0.1

#: How long to wait for a job's log line after the worker went idle.
LOG_WAIT_S = 10.0


def parse_cancel_lines(text: str) -> list[dict[str, Any]]:
    """Every cancel log line in C{text}: stage, reason, latency in ms (or None)."""
    out = []
    for m in CANCEL_LINE.finditer(text):
        latency = m.group("latency")
        out.append(
            {
                "stage": m.group("stage"),
                "reason": m.group("reason"),
                "latency_ms": None if latency == "-" else float(latency[:-2]),
            }
        )
    return out


def parse_metrics(text: str) -> dict[str, Any]:
    """
    The parts of ds4tw's /metrics the benchmark reads: jobs by outcome,
    cancelled jobs by stage, the cancel-latency histogram's sum and count
    by stage, and keepalive frames by stage.
    """
    out: dict[str, Any] = {
        "jobs": {},
        "cancelled": {},
        "cancel_latency": {},
        "keepalive_frames": {},
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ds4tw_jobs_total":
                out["jobs"][s.labels["outcome"]] = s.value
            elif s.name == "ds4tw_cancelled_jobs_total":
                out["cancelled"][s.labels["stage"]] = s.value
            elif s.name == "ds4tw_keepalive_frames_total":
                out["keepalive_frames"][s.labels["stage"]] = s.value
            elif s.name in (_LATENCY + "_sum", _LATENCY + "_count"):
                key = "sum_s" if s.name.endswith("_sum") else "count"
                out["cancel_latency"].setdefault(s.labels["stage"], {})[key] = s.value
    return out


def metrics(server: ServerProcess) -> dict[str, Any]:
    status, body = _client.get(server.port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_metrics(body.decode("utf-8", errors="replace"))


def _job_line(server: ServerProcess, offset: int) -> dict[str, Any] | None:
    """The cancel line the last job wrote after C{offset} (waits up to LOG_WAIT_S)."""
    deadline = time.perf_counter() + LOG_WAIT_S
    while time.perf_counter() < deadline:
        lines = parse_cancel_lines(server.log_since(offset))
        if lines:
            return lines[-1]
        time.sleep(0.02)
    return None


def _trial(
    server: ServerProcess,
    body: dict[str, Any],
    *,
    after_tokens: int | None = None,
    phase: float = 0.0,
    after_prefill_frames: int | None = None,
) -> dict[str, Any]:
    """
    One cancel. In decode: hang up C{phase} of a token time after the
    C{after_tokens}-th token arrived (0: right after it, the worst case,
    when the next token has just started computing). In prefill: hang up
    on the C{after_prefill_frames}-th C{: prefill} frame.
    """
    offset = server.log_size()

    def enough(reader: ResponseReader) -> bool:
        if after_tokens is not None:
            times = text_times(reader.events, None)
            if len(times) < after_tokens:
                return False
            intervals = [b - a for a, b in itertools.pairwise(times)]
            if phase > 0 and intervals:
                time.sleep(phase * statistics.median(intervals))
            return True
        assert after_prefill_frames is not None
        return comments(reader.events).count("prefill") >= after_prefill_frames

    s = _client.stream(server.port, "/v1/completions", body, timeout=120, hang_up=enough)
    idle = _client.wait_idle(server.port, timeout=60)
    line = _job_line(server, offset)
    times = text_times(s.events, None)
    intervals = [b - a for a, b in itertools.pairwise(times)]
    return {
        "hung_up": s.hung_up is not None,
        "tokens_seen": len(times),
        "hang_up_after_s": None if s.hung_up is None else s.hung_up - s.sent,
        "stage": None if line is None else line["stage"],
        "latency_ms": None if line is None else line["latency_ms"],
        # This stream's own token time just before the hang-up: the fair
        # "one token" for this trial on a machine whose speed varies.
        "token_time_ms": statistics.median(intervals) * 1000.0 if intervals else None,
        "client_to_idle_ms": None if idle is None else idle * 1000.0,
        "error": s.error,
    }


#: Raw prefill of a prompt -> its full-batch times (seconds); runs beside
#: each prefill-cancel trial, so the batch time is taken at the same
#: moment of the machine's load.
BatchReference = Callable[[str], list[float]]


def measure(
    server: ServerProcess,
    settings: Settings,
    *,
    batch_reference: BatchReference | None,
    fixed_batch_s: float | None = None,
) -> dict[str, Any]:
    """
    Decode and prefill cancels on ds4tw. The server must run with a
    small keepalive (L{CANCEL_KEEPALIVE}): a prefill trial hangs up on the
    n-th C{: prefill} frame, so that its hang-ups land at spread-out
    points of the prefill whatever the machine's speed.
    """
    prompts = Prompts(settings.seed + 7)
    long_body = completion_body("ds4tw", "x", min(2000, settings.ctx // 2))
    # A first cancel, not counted: the first time a server cancels, its
    # reactor runs code paths (and imports) it had not run yet.
    _trial(
        server,
        {**long_body, "prompt": prompts.words(settings.short_words)},
        after_tokens=settings.cancel_after_tokens,
    )
    before = metrics(server)
    decode = []
    n = settings.cancel_decode_trials
    for i in range(n):
        # Phases 1/n, 2/n, ..., then 0 (right after a token: the worst case).
        phase = ((i + 1) % n) / n
        body = {**long_body, "prompt": prompts.words(settings.short_words)}
        trial = _trial(server, body, after_tokens=settings.cancel_after_tokens, phase=phase)
        trial["phase"] = phase
        decode.append(trial)
    prefill = []
    for i in range(settings.cancel_prefill_trials):
        text = prompts.words(settings.probe_words)
        batches = batch_reference(text) if batch_reference is not None else []
        trial = _trial(server, completion_body("ds4tw", text, 4), after_prefill_frames=1 + 2 * i)
        ref = max(batches) if batches else fixed_batch_s
        trial["batch_time_ms"] = None if ref is None else ref * 1000.0
        prefill.append(trial)
    after = metrics(server)
    histogram = {
        stage: {
            "count": v.get("count", 0) - before["cancel_latency"].get(stage, {}).get("count", 0),
            "sum_s": v.get("sum_s", 0) - before["cancel_latency"].get(stage, {}).get("sum_s", 0),
        }
        for stage, v in after["cancel_latency"].items()
    }
    return {
        "decode": _stage_summary(decode, "decode", "token_time_ms"),
        "prefill": _stage_summary(prefill, "prefill", "batch_time_ms"),
        "metrics_histogram": histogram,
        "keepalive_s": CANCEL_KEEPALIVE,
        "source": "ds4tw per-job log line; /metrics ds4tw_cancel_latency_seconds as cross-check",
    }


def _stage_summary(trials: list[dict[str, Any]], stage: str, unit_key: str) -> dict[str, Any]:
    """
    Latencies of the trials that stopped in C{stage}, and each one in units
    of its own reference (one token, or one prefill batch).
    """
    hits = [t for t in trials if t["stage"] == stage and t["latency_ms"] is not None]
    units = [t["latency_ms"] / t[unit_key] for t in hits if t.get(unit_key)]
    return {
        "trials": trials,
        "latency_ms": summary([t["latency_ms"] for t in hits]),
        unit_key: summary([t.get(unit_key) for t in hits]),
        "latency_in_units": summary(units),
        "missed_stage": len(trials) - len(hits),
        "client_to_idle_ms": summary([t["client_to_idle_ms"] for t in trials]),
    }
