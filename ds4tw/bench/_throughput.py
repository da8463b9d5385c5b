"""
Decode rate, TTFT and prefill rate of every stack, measured interleaved.

All stacks are loaded at once (raw in this process, ds4tw and the peer
as idle subprocesses: an idle server costs no CPU) and every prompt of
the plan goes to each of them in turn before the next prompt, the order
rotating from one prompt to the next. On a machine shared with other
work, a burst of noise then hits every stack alike instead of whichever
happened to run at the time, so the ratios stay meaningful.

Client-seen times for a server: a token's time is the arrival of the
read that completed its SSE event; TTFT runs from sending the request
(on a connected socket) to the first text event; the decode rate counts
the tokens the server reports (ds4tw's usage chunk; the peer's fixed
C{max_tokens} when it says C{finish_reason: length}) over the interval
from the first text event to the last. The raw loop reports the same
fields (L{ds4tw.bench._raw.RawLlama.trial}). Prefill rate is prompt
tokens over long-prompt TTFT for every stack (the raw one also reports
its pure eval rate).

Covered by tests/unit/test_bench.py (L{trial_numbers}, L{summarise}).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _client, _cpu
from ._servers import ServerProcess
from ._settings import Settings
from ._sse import finish_reason, text_times, usage
from ._stats import summary
from ._workload import Plan, Stack, completion_body

#: Per-request bound (seconds): a stuck server fails the trial, not the run.
REQUEST_TIMEOUT = 300.0

#: One trial: (prompt text, max_tokens) -> the numbers of L{trial_numbers}.
Runner = Callable[[str, int], dict[str, Any]]


def trial_numbers(stream: _client.Stream, expected_tokens: int | None) -> dict[str, Any]:
    """
    One streamed completion's client-seen numbers: TTFT, decode rate,
    token count (from usage, else C{expected_tokens} when the server says
    it stopped on length, else the text events), finish reason, errors.
    """
    events = stream.events
    times = text_times(events, kind=None)
    u = usage(events)
    reason = finish_reason(events)
    if u is not None and isinstance(u.get("completion_tokens"), int):
        tokens = int(u["completion_tokens"])
    elif expected_tokens is not None and reason == "length":
        tokens = expected_tokens
    else:
        tokens = len(times)
    span = times[-1] - times[0] if len(times) >= 2 else 0.0
    intervals = [b - a for a, b in itertools.pairwise(times)]
    typical = statistics.median(intervals) if intervals else 0.0
    return {
        "status": stream.status,
        "error": stream.error,
        "ttft_s": times[0] - stream.sent if times else None,
        "tokens": tokens,
        "text_events": len(times),
        "decode_tps": (tokens - 1) / span if span > 0 and tokens >= 2 else None,
        # 1 / the median interval between text events: the steady rate,
        # unmoved by a burst of outside load in one part of the stream.
        "steady_tps": 1.0 / typical if typical > 0 else None,
        "finish_reason": reason,
        "prompt_tokens": None if u is None else u.get("prompt_tokens"),
    }


def http_runner(
    server: ServerProcess, stack: Stack, *, fixed: bool = True, eog_ids: Sequence[int] = ()
) -> Runner:
    """
    A server's trial: a streaming C{/v1/completions}. C{fixed=False} (the
    peer's natural run) lets end-of-generation end the output early.
    """

    def run(prompt: str, max_tokens: int) -> dict[str, Any]:
        body = completion_body(stack, prompt, max_tokens, fixed_length=fixed, eog_ids=eog_ids)
        s = _client.stream(server.port, "/v1/completions", body, timeout=REQUEST_TIMEOUT)
        return trial_numbers(s, max_tokens if fixed else None)

    return run


def _rotate(names: Sequence[str], k: int) -> list[str]:
    k %= max(1, len(names))
    return list(names[k:]) + list(names[:k])


def measure(
    runners: Mapping[str, Runner],
    settings: Settings,
    workload: Plan,
    *,
    decode_only: Sequence[str] = (),
    pids: Mapping[str, int] | None = None,
    reference: str | None = None,
) -> dict[str, dict[str, Any]]:
    """
    Every runner on every prompt of C{workload}, interleaved; C{decode_only}
    runners skip the TTFT and long-prompt trials. Returns a summary per
    runner (L{summarise}). C{pids}: the process of each runner, whose
    per-thread CPU time is accounted over its decode trials
    (L{ds4tw.bench._cpu}); for a server, the client's own thread time is
    accounted too. C{reference} (raw): every other runner also gets
    C{vs_reference}, its numbers compared prompt by prompt (L{paired}).
    """
    names = list(runners)
    pids = pids or {}
    trials: dict[str, dict[str, list[dict[str, Any]]]] = {
        n: {"decode": [], "ttft": [], "long": []} for n in names
    }
    cpu: dict[str, dict[str, float]] = {
        n: {"main_s": 0.0, "other_s": 0.0, "client_s": 0.0} for n in pids
    }
    for name in names:
        runners[name](workload.warmup, 8)
    k = 0
    for prompt in workload.decode:
        for name in _rotate(names, k):
            pid = pids.get(name)
            before = _cpu.thread_times(pid) if pid is not None else {}
            client = time.thread_time()
            trials[name]["decode"].append(runners[name](prompt, settings.decode_tokens))
            if pid is not None:
                client = time.thread_time() - client
                for key, value in _cpu.split(pid, before, _cpu.thread_times(pid)).items():
                    cpu[name][key] += value
                cpu[name]["client_s"] += client if pid != os.getpid() else 0.0
        k += 1
    timed = [n for n in names if n not in decode_only]
    for kind, prompts in (("ttft", workload.ttft), ("long", workload.long)):
        for prompt in prompts:
            for name in _rotate(timed, k):
                trials[name][kind].append(runners[name](prompt, 1))
            k += 1
    _fill_prompt_tokens(trials)
    out = {name: summarise(trials[name]) for name in names}
    for name, totals in cpu.items():
        tokens = sum(t["tokens"] for t in trials[name]["decode"] if t["status"] == 200)
        if pids[name] == os.getpid():
            totals.pop("client_s")  # raw: there is no client
        out[name]["cpu_per_token"] = _cpu.per_token(totals, tokens)
    if reference is not None and reference in trials:
        for name in names:
            if name != reference:
                out[name]["vs_reference"] = paired(trials[name], trials[reference])
    return out


def paired(
    stack: Mapping[str, Sequence[dict[str, Any]]], ref: Mapping[str, Sequence[dict[str, Any]]]
) -> dict[str, Any]:
    """
    A stack against the reference prompt by prompt: the ratio of decode
    and prefill rates, and the TTFT difference (ms), for each prompt both
    measured. Prompts differ in length (so in prefill time); pairing takes
    that variance out of the comparison, and interleaving means each pair
    was measured moments apart.
    """

    def pairs(kinds: Sequence[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [
            (a, b)
            for kind in kinds
            for a, b in zip(stack.get(kind, []), ref.get(kind, []), strict=False)
        ]

    def rate_ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    def ttft_diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        if a.get("ttft_s") is None or b.get("ttft_s") is None:
            return None
        return (a["ttft_s"] - b["ttft_s"]) * 1e3

    def prefill_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return b["ttft_s"] / a["ttft_s"] if a.get("ttft_s") and b.get("ttft_s") else None

    return {
        "decode_ratio": summary([rate_ratio(a, b, "decode_tps") for a, b in pairs(["decode"])]),
        "steady_decode_ratio": summary(
            [rate_ratio(a, b, "steady_tps") for a, b in pairs(["decode"])]
        ),
        "ttft_short_diff_ms": summary([ttft_diff(a, b) for a, b in pairs(["decode", "ttft"])]),
        "ttft_long_diff_ms": summary([ttft_diff(a, b) for a, b in pairs(["long"])]),
        # Same prompt, so the prefill-rate ratio is the inverse TTFT ratio.
        "prefill_ratio": summary([prefill_ratio(a, b) for a, b in pairs(["long"])]),
    }


def _fill_prompt_tokens(trials: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """A stream that does not report prompt sizes borrows them from one that does."""
    for kind in ("ttft", "long"):
        known: dict[int, int] = {}
        for per in trials.values():
            for i, t in enumerate(per[kind]):
                if t.get("prompt_tokens"):
                    known.setdefault(i, int(t["prompt_tokens"]))
        for per in trials.values():
            for i, t in enumerate(per[kind]):
                if not t.get("prompt_tokens") and i in known:
                    t["prompt_tokens"] = known[i]


def summarise(trials: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """One stack's trials -> the medians and spreads the report uses."""
    decode, ttft, long = trials["decode"], trials.get("ttft", []), trials.get("long", [])
    every = [*decode, *ttft, *long]
    out: dict[str, Any] = {
        "decode_tps": summary([t["decode_tps"] for t in decode]),
        "steady_tps": summary([t.get("steady_tps") for t in decode]),
        "tokens": [t["tokens"] for t in decode],
        "finish_reasons": [t["finish_reason"] for t in decode],
        "errors": [
            str(t["error"] or t["status"]) for t in every if t["error"] or t["status"] != 200
        ],
    }
    if ttft or long:
        out["ttft_short_s"] = summary([t["ttft_s"] for t in [*decode, *ttft]])
        out["ttft_long_s"] = summary([t["ttft_s"] for t in long])
        out["prefill_tps"] = summary(
            [
                t["prompt_tokens"] / t["ttft_s"] if t.get("prompt_tokens") and t["ttft_s"] else None
                for t in long
            ]
        )
        out["prompt_tokens"] = {
            "short": summary([t.get("prompt_tokens") for t in [*decode, *ttft]]),
            "long": summary([t.get("prompt_tokens") for t in long]),
        }
    if any("intervals_s" in t for t in decode):
        out["token_time_s"] = summary([x for t in decode for x in t.get("intervals_s", [])])
        out["token_time_s"].pop("values", None)  # thousands of them; the summary is enough
    if any("batches" in t for t in long):
        full = max((n for t in long for n, _ in t["batches"]), default=0)
        out["prefill_batch_s"] = summary(
            [s for t in long for n, s in t["batches"] if n == full and full > 0]
        )
        out["prefill_eval_tps"] = summary(
            [
                (t["prompt_tokens"] - t.get("cached_tokens", 0)) / t["prefill_eval_s"]
                for t in long
                if t.get("prefill_eval_s")
            ]
        )
    return out
