"""
The benchmark's own logic (ds4tw.bench), without sockets, servers or a
model: HTTP/chunked/SSE parsing of timed reads, the timing extraction,
rates, ratios and gaps, the cancel log and metrics parsing (on text
produced by ds4tw's own log function and metrics registry, so a format
change there fails here), the keepalive and many-clients analyses, and
the results document's schema, table and chart; the prefill fairness
part's whole loop on an instant scripted engine (its step counts are the
policy's, exactly).

Caveat: these prove the arithmetic and the parsing; that the numbers are
measured at the right moments over real sockets is what
tests/integration/test_bench_smoke.py checks (without asserting speed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ds4tw import Job, JobCancelled, Stage
from ds4tw._engine.interface import SamplingParams
from ds4tw._runtime.joblog import log_job
from ds4tw._runtime.metrics import Metrics
from ds4tw._runtime.scheduler import StepStats
from ds4tw.bench import (
    _batching,
    _cache,
    _cpu,
    _fairness,
    _noise,
    _parts,
    _report,
    _stats,
    _throughput,
)
from ds4tw.bench.__main__ import parse
from ds4tw.bench._cancel import _stage_summary, parse_cancel_lines, parse_metrics
from ds4tw.bench._client import Stream, request_bytes
from ds4tw.bench._keepalive import analyse_probe, read_labels
from ds4tw.bench._many import client_outcome
from ds4tw.bench._settings import make_settings
from ds4tw.bench._sse import (
    ChunkedDecoder,
    ResponseReader,
    SSEParser,
    delta_text,
    finish_reason,
    saw_done,
    text_times,
    usage,
)
from ds4tw.bench._workload import Prompts, completion_body, plan, silent_chat_body
from ds4tw.testing import ScriptedEngine

# -- helpers ---------------------------------------------------------------

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def completion_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"text": text, "finish_reason": finish}]}


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": finish}],
    }


def usage_chunk(completion: int, reasoning: int = 0, prompt: int = 10) -> dict[str, Any]:
    return {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }


def fed(reads: list[tuple[float, bytes]], sent: float = 0.0, **kw: Any) -> Stream:
    """A Stream as the client would have recorded these (time, bytes) reads."""
    reader = ResponseReader()
    for t, data in reads:
        reader.feed(t, data)
    return Stream(sent, reader, **kw)


# -- HTTP, chunked, SSE ----------------------------------------------------


def test_chunked_decoder_handles_any_split() -> None:
    body = chunk(b"hello ") + chunk(b"world") + b"0\r\n\r\n"
    for size in (1, 2, 3, 7, len(body)):
        d = ChunkedDecoder()
        out = b"".join(d.feed(body[i : i + size]) for i in range(0, len(body), size))
        assert out == b"hello world"
        assert d.done


def test_chunked_decoder_not_done_before_last_chunk() -> None:
    d = ChunkedDecoder()
    assert d.feed(chunk(b"abc")) == b"abc"
    assert not d.done
    d.feed(b"0\r\n")
    assert not d.done  # the empty line after the (empty) trailer is missing
    d.feed(b"\r\n")
    assert d.done


def test_sse_parser_comments_at_once_data_at_blank_line() -> None:
    p = SSEParser()
    assert [(e.kind, e.text) for e in p.feed(1.0, b": queued\n")] == [("comment", "queued")]
    assert p.feed(2.0, b'data: {"a"') == []
    assert p.feed(2.5, b": 1}\n") == []
    events = p.feed(3.0, b"\nevent: error\r\ndata: x\r\n\r\n")
    assert [(e.t, e.kind, e.text, e.event) for e in events] == [
        (3.0, "data", '{"a": 1}', None),
        (3.0, "data", "x", "error"),
    ]


def test_response_reader_times_events_by_the_read_that_completed_them() -> None:
    s = fed(
        [
            (0.1, HEAD[:20]),
            (0.2, HEAD[20:]),
            (0.5, chunk(b": queued\n\n")),
            (0.9, chunk(sse(completion_chunk("Hel"))[:10])),
            (1.0, chunk(sse(completion_chunk("Hel"))[10:]) + chunk(sse(completion_chunk("lo")))),
            (1.2, chunk(sse(completion_chunk("", "length")) + sse("[DONE]")) + b"0\r\n\r\n"),
        ]
    )
    r = s.reader
    assert r.status == 200 and r.head_t == 0.2 and r.complete
    assert [(e.t, e.kind) for e in r.events] == [
        (0.5, "comment"),
        (1.0, "data"),
        (1.0, "data"),
        (1.2, "data"),
        (1.2, "data"),
    ]
    assert text_times(r.events) == [1.0, 1.0]
    assert finish_reason(r.events) == "length"
    assert saw_done(r.events)
    assert len(r.reads) == 6


def test_response_reader_content_length_and_eof() -> None:
    r = ResponseReader()
    r.feed(0.0, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbu")
    assert r.status == 503 and not r.complete
    r.feed(0.1, b"sy")
    assert r.complete and bytes(r.body) == b"busy"
    raw = ResponseReader()
    raw.feed(0.0, b"HTTP/1.0 200 OK\r\n\r\ndata: x\n\n")
    assert not raw.complete
    raw.eof()
    assert raw.complete


def test_delta_text_reads_completions_and_chat_chunks() -> None:
    def ev(payload: Any) -> Any:
        return SSEParser().feed(0.0, sse(payload))[0]

    assert delta_text(ev(completion_chunk("hi"))) == ("content", "hi")
    assert delta_text(ev(chat_chunk({"content": "yo"}))) == ("content", "yo")
    assert delta_text(ev(chat_chunk({"reasoning_content": "hm"}))) == ("reasoning", "hm")
    assert delta_text(ev(chat_chunk({"role": "assistant"}))) is None
    assert delta_text(ev(completion_chunk("", "stop"))) is None
    assert delta_text(ev("[DONE]")) is None
    assert delta_text(ev(usage_chunk(3))) is None
    assert usage([ev(usage_chunk(3))]) == usage_chunk(3)["usage"]


def test_request_bytes_is_a_complete_http_request() -> None:
    raw = request_bytes("POST", "/v1/completions", {"a": 1}, 8000)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Content-Length: 8" in head and body == b'{"a": 1}'


# -- stats ---------------------------------------------------------------------


def test_decode_rate_counts_intervals_after_the_first_token() -> None:
    assert _stats.decode_rate([1.0, 1.1, 1.2, 1.3, 1.4]) == pytest.approx(10.0)
    assert _stats.decode_rate([1.0]) is None
    assert _stats.decode_rate([1.0, 1.0]) is None


def test_gaps_include_the_wait_for_the_first_byte() -> None:
    assert _stats.gaps([0.3, 0.5, 1.0], start=0.1) == pytest.approx([0.2, 0.2, 0.5])
    assert _stats.gaps([0.5, 0.3]) == pytest.approx([0.2])
    assert _stats.gaps([]) == []


def test_ratio_and_summary() -> None:
    assert _stats.ratio(97.0, 100.0) == pytest.approx(0.97)
    assert _stats.ratio(None, 1.0) is None and _stats.ratio(1.0, 0.0) is None
    s = _stats.summary([3.0, None, 1.0, 2.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (3, 2.0, 1.0, 3.0)
    assert s["values"] == [3.0, 1.0, 2.0]
    assert _stats.summary([None])["median"] is None
    assert _stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)


# -- throughput ------------------------------------------------------------


def test_trial_numbers_uses_usage_for_the_token_count() -> None:
    s = fed(
        [
            (0.0, HEAD),
            (0.05, chunk(sse(completion_chunk("a")))),
            (0.15, chunk(sse(completion_chunk("bc")))),  # two tokens in one event
            (0.25, chunk(sse(completion_chunk("d")))),
            (
                0.26,
                chunk(sse(completion_chunk("", "length")) + sse(usage_chunk(4)) + sse("[DONE]")),
            ),
        ]
    )
    n = _throughput.trial_numbers(s, expected_tokens=4)
    assert n["ttft_s"] == pytest.approx(0.05)
    assert n["tokens"] == 4 and n["text_events"] == 3
    assert n["decode_tps"] == pytest.approx(3 / 0.2)
    assert n["prompt_tokens"] == 10 and n["finish_reason"] == "length"


def test_trial_numbers_without_usage_trusts_a_length_finish_only() -> None:
    reads = [
        (0.0, HEAD),
        (0.1, chunk(sse(completion_chunk("a")))),
        (0.2, chunk(sse(completion_chunk("b")))),
    ]
    length = fed([*reads, (0.3, chunk(sse(completion_chunk("", "length"))))])
    stop = fed([*reads, (0.3, chunk(sse(completion_chunk("", "stop"))))])
    assert _throughput.trial_numbers(length, expected_tokens=9)["tokens"] == 9
    assert _throughput.trial_numbers(stop, expected_tokens=9)["tokens"] == 2


def test_measure_interleaves_stacks_and_shares_prompt_sizes() -> None:
    settings = make_settings(quick=True, engine="scripted")
    workload = plan(settings)
    calls: list[tuple[str, str, int]] = []

    def runner(name: str, tps: float, knows_prompt: bool) -> _throughput.Runner:
        def run(prompt: str, max_tokens: int) -> dict[str, Any]:
            calls.append((name, prompt, max_tokens))
            return {
                "status": 200,
                "error": None,
                "ttft_s": 0.01 * len(prompt) / 10,
                "tokens": max_tokens,
                "text_events": max_tokens,
                "decode_tps": tps,
                "finish_reason": "length",
                "prompt_tokens": len(prompt) if knows_prompt else None,
            }

        return run

    got = _throughput.measure(
        {
            "a": runner("a", 100.0, True),
            "b": runner("b", 90.0, False),
            "c": runner("c", 80.0, False),
        },
        settings,
        workload,
        decode_only=["c"],
    )
    decode_calls = [c for c in calls if c[2] == settings.decode_tokens]
    # Each prompt goes to every stack before the next; the order rotates.
    assert [c[0] for c in decode_calls[:6]] == ["a", "b", "c", "b", "c", "a"]
    assert {c[1] for c in calls if c[0] == "a"} == {c[1] for c in calls if c[0] == "b"}
    assert "ttft_short_s" not in got["c"]
    assert got["b"]["prefill_tps"]["median"] == pytest.approx(got["a"]["prefill_tps"]["median"])
    assert got["a"]["decode_tps"]["median"] == 100.0


def test_summarise_reports_raw_intervals_and_full_batches() -> None:
    base = {"status": 200, "error": None, "finish_reason": "length", "tokens": 3}
    decode = [{**base, "ttft_s": 0.05, "decode_tps": 100.0, "intervals_s": [0.01, 0.01]}]
    long = [
        {
            **base,
            "ttft_s": 1.0,
            "decode_tps": None,
            "prompt_tokens": 300,
            "cached_tokens": 2,
            "batches": [(256, 0.8), (42, 0.2)],
            "prefill_eval_s": 0.9,
        }
    ]
    s = _throughput.summarise({"decode": decode, "ttft": [], "long": long})
    assert s["token_time_s"]["median"] == pytest.approx(0.01)
    assert s["prefill_batch_s"]["values"] == [0.8]
    assert s["prefill_tps"]["median"] == pytest.approx(300.0)
    assert s["prefill_eval_tps"]["median"] == pytest.approx(298 / 0.9)


# -- cancel ----------------------------------------------------------------


def test_cancel_lines_parse_what_ds4tw_logs() -> None:
    """The regex reads the line ds4tw's own log_job writes (a format drift fails here)."""
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        job = Job([1, 2], SamplingParams(), label="cmpl-abc completion stream=True")
        job.cancel("client disconnected")
        assert job.cancel_requested_at is not None
        job.work.stopped_at = job.cancel_requested_at + 0.00321
        log_job(job, Failure(JobCancelled(Stage.DECODE, "client disconnected")))
        queued = Job([1], SamplingParams(), label="cmpl-q completion stream=True")
        log_job(queued, Failure(JobCancelled(Stage.QUEUED, "client disconnected")))
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(
        "2026-01-01T00:00:00+0000 [ds4tw._server.app#info] " + formatEvent(e) for e in events
    )
    lines = parse_cancel_lines(text)
    assert lines == [
        {"stage": "decode", "reason": "client disconnected", "latency_ms": pytest.approx(3.21)},
        {"stage": "queued", "reason": "client disconnected", "latency_ms": None},
    ]


def test_parse_metrics_reads_ds4tw_metrics() -> None:
    m = Metrics()
    m.jobs.labels("done").inc(3)
    m.jobs.labels("cancelled").inc(2)
    m.cancelled.labels("queued").inc(2)
    m.cancel_latency.labels("decode").observe(0.004)
    m.cancel_latency.labels("decode").observe(0.006)
    m.keepalive_sent("queued")
    got = parse_metrics(m.render().decode())
    assert got["jobs"] == {"done": 3.0, "cancelled": 2.0}
    assert got["cancelled"] == {"queued": 2.0}
    assert got["cancel_latency"]["decode"] == {"count": 2.0, "sum_s": pytest.approx(0.01)}
    assert got["keepalive_frames"] == {"queued": 1.0}


def test_stage_summary_measures_each_trial_in_its_own_units() -> None:
    trials = [
        {"stage": "decode", "latency_ms": 5.0, "token_time_ms": 10.0, "client_to_idle_ms": 6.0},
        {"stage": "decode", "latency_ms": 9.0, "token_time_ms": 12.0, "client_to_idle_ms": 10.0},
        {"stage": "done", "latency_ms": None, "token_time_ms": 10.0, "client_to_idle_ms": 1.0},
    ]
    s = _stage_summary(trials, "decode", "token_time_ms")
    assert s["latency_ms"]["max"] == 9.0
    assert s["latency_in_units"]["values"] == pytest.approx([0.5, 0.75])
    assert s["missed_stage"] == 1


# -- keepalive and many clients ---------------------------------------------


def probe_reads(*, leak: bool = False) -> list[tuple[float, bytes]]:
    role = chat_chunk({"role": "assistant", "content": ""})
    tail = sse(chat_chunk({}, "length")) + sse(usage_chunk(5, reasoning=5)) + sse("[DONE]")
    reads = [
        (0.01, HEAD),
        (0.31, chunk(b": queued\n\n")),
        (0.61, chunk(b": queued\n\n")),
        (0.91, chunk(b": prefill\n\n")),
        (1.05, chunk(sse(role))),
        (1.35, chunk(b": decode\n\n")),
        (1.65, chunk(b": decode\n\n")),
        (1.70, chunk(tail) + b"0\r\n\r\n"),
    ]
    if leak:
        reads.insert(6, (1.4, chunk(sse(chat_chunk({"content": "oops"})))))
    return reads


def test_keepalive_probe_analysis() -> None:
    s = fed(probe_reads(), sent=0.0)
    labels = [label for _, label in read_labels(s.reader)]
    assert labels == ["headers", "queued", "queued", "prefill", "data", "decode", "decode", "data"]
    got = analyse_probe(s, keepalive=0.3, silent_tokens=5)
    assert got["max_gap_s"] == pytest.approx(0.30)
    assert got["late_gaps"] == 0
    assert got["comment_frames"] == {"queued": 2, "prefill": 1, "decode": 2}
    assert got["silent_decode_verified"] and got["all_stages_seen"]
    assert got["max_gap_by_stage_s"]["queued"] == pytest.approx(0.30)
    leaky = analyse_probe(fed(probe_reads(leak=True)), keepalive=0.3, silent_tokens=5)
    assert not leaky["silent_decode_verified"]
    late = analyse_probe(s, keepalive=0.1, silent_tokens=5)
    assert late["late_gaps"] > 0


def test_client_outcomes() -> None:
    queued = [(0.01, HEAD), (0.51, chunk(b": queued\n\n")), (1.01, chunk(b": queued\n\n"))]
    done = chunk(sse(completion_chunk("x")) + sse(completion_chunk("", "length")) + sse("[DONE]"))
    completed = client_outcome(fed([*queued, (1.2, done + b"0\r\n\r\n")]), cancelled=False)
    assert completed["outcome"] == "completed"
    assert completed["max_queued_gap_s"] == pytest.approx(0.5)
    assert completed["queued_frames"] == 2
    hung = client_outcome(fed(queued, hung_up=1.8), cancelled=True)
    assert hung["outcome"] == "cancelled"
    assert hung["max_queued_gap_s"] == pytest.approx(0.79)  # silence up to the hang-up
    assert client_outcome(fed(queued), cancelled=False)["outcome"] == "error"  # no [DONE]
    busy = fed([(0.01, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")])
    assert client_outcome(busy, cancelled=False)["outcome"] == "error"


def test_foreign_cores() -> None:
    assert _noise.foreign_cores((10.0, 12.0), (5.0, 6.0), (0.0, 1.0)) == pytest.approx(1.0)
    # A child that exited took its CPU time with it: never negative.
    assert _noise.foreign_cores((10.0, 10.5), (5.0, 7.0), (0.0, 1.0)) == 0.0
    assert _noise.foreign_cores((1.0, 2.0), (1.0, 1.0), (1.0, 1.0)) is None


# -- workload and settings -----------------------------------------------------


def test_prompts_are_seeded_and_never_start_alike() -> None:
    a, b = Prompts(7), Prompts(7)
    first = [a.words(10) for _ in range(5)]
    assert first == [b.words(10) for _ in range(5)]
    assert len({p.split(":")[0] for p in first}) == 5
    assert plan(make_settings(quick=True)) == plan(make_settings(quick=True))


def test_request_bodies_fix_the_length_each_stack_s_way() -> None:
    ds = completion_body("ds4tw", "hi", 8)
    peer = completion_body("peer", "hi", 8, eog_ids=[0, 2])
    natural = completion_body("peer", "hi", 8, fixed_length=False, eog_ids=[0, 2])
    assert ds["ignore_eos"] and ds["stream"] and ds["temperature"] == 0.0
    assert "ignore_eos" not in peer and peer["logit_bias"] == {"0": -1e9, "2": -1e9}
    assert "logit_bias" not in natural
    assert ds["repeat_penalty"] == peer["repeat_penalty"] == 1.0
    silent = silent_chat_body("hi", 5)
    assert silent["reasoning_effort"] == "none" and silent["ignore_eos"]


def test_settings_and_arguments() -> None:
    quick, full = make_settings(quick=True), make_settings(quick=False)
    assert quick.decode_tokens < full.decode_tokens and full.clients == 200
    assert make_settings(quick=False, clients=1000).clients == 1000
    args = parse(["--quick", "--engine", "scripted", "--out", "x", "--clients", "5"])
    assert (args.quick, args.engine, args.out, args.clients) == (True, "scripted", "x", 5)
    with pytest.raises(SystemExit):
        parse(["--clients", "0"])


# -- the document ----------------------------------------------------------


def summary_of(*values: float) -> dict[str, Any]:
    return _stats.summary(list(values))


def synthetic_doc() -> dict[str, Any]:
    """A complete document, built with the same functions the command uses."""
    stack = {
        "decode_tps": summary_of(100.0, 102.0),
        "ttft_short_s": summary_of(0.050, 0.052),
        "ttft_long_s": summary_of(2.0),
        "prefill_tps": summary_of(360.0),
    }
    ds = {**stack, "decode_tps": summary_of(98.0, 99.0), "ttft_short_s": summary_of(0.053)}
    peer = {**stack, "decode_tps": summary_of(85.0), "ttft_short_s": summary_of(0.060)}
    units = {"decode": summary_of(0.4, 0.9), "prefill": summary_of(0.5)}
    doc: dict[str, Any] = {
        "schema": _report.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "command": "ds4tw-bench",
        "engine": "llama",
        "duration_s": 100.0,
        "machine": {"cpus": 2},
        "versions": {"ds4tw": "0"},
        "model": {"name": "m.gguf"},
        "settings": make_settings(quick=False).as_dict(),
        "notes": [],
        "errors": [],
        "raw": stack,
        "ds4tw": ds,
        "peer": {"fixed": peer, "natural": {"decode_tps": summary_of(90.0)}},
        "ratios": {},
        "cancel": {
            stage: {
                "trials": [],
                "latency_ms": summary_of(4.0),
                "latency_in_units": units[stage],
            }
            for stage in ("decode", "prefill")
        },
        "keepalive": {
            "keepalive_s": 0.5,
            "limit_s": 0.6,
            "gaps_s": summary_of(0.1, 0.5),
            "max_gap_s": 0.5,
            "probes": [{"gaps_s": [0.1, 0.5]}],
        },
        "many_clients": {
            "clients": 4,
            "limit_s": 0.6,
            "outcomes": {"completed": 3, "cancelled": 1, "error": 0},
            "rss_per_waiting_client_bytes": 20000.0,
            "max_queued_gap_s": summary_of(0.5, 0.7),
        },
        "targets": [],
    }
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    return doc


def test_ratios_and_targets() -> None:
    doc = synthetic_doc()
    r = doc["ratios"]
    assert r["ds4tw_decode"] == pytest.approx(98.5 / 101.0)
    assert r["peer_decode"] == pytest.approx(85.0 / 101.0)
    assert r["peer_natural_decode"] == pytest.approx(90.0 / 101.0)
    assert r["ds4tw_ttft_short_overhead_ms"] == pytest.approx(2.0)
    assert r["ds4tw_over_peer_decode"] == pytest.approx(98.5 / 85.0)
    met = {t["name"].split(",")[0]: t["met"] for t in doc["targets"]}
    assert met == {
        "ds4tw decode throughput / raw": True,
        "ds4tw TTFT overhead over raw (short prompt)": True,
        "cancel latency in decode": True,
        "cancel latency in prefill": True,
        "median cancel latency in decode": True,  # 4.0 <= 5 ms
        "median cancel latency in prefill": True,  # 4.0 <= 20 ms
        "decode with the abort callback / without": None,  # not measured here
        "longest keepalive gap (queued": True,
        "longest silence of a waiting client": False,  # 0.7 > 0.6
    }


def test_a_baseline_tree_is_an_ab_of_two_versions_in_one_run() -> None:
    """--baseline DIR: another ds4tw served beside this one; its decode over this one's."""
    assert parse(["--baseline", "/tmp/base"]).baseline == "/tmp/base"
    doc = synthetic_doc()
    assert "ds4tw_over_baseline_decode" not in doc["ratios"]  # no baseline, no key
    doc["baseline"] = {**doc["raw"], "decode_tps": summary_of(97.0), "source": "/tmp/base"}
    doc["ratios"] = _report.ratios(doc)
    r = doc["ratios"]
    assert r["baseline_decode"] == pytest.approx(97.0 / 101.0)
    assert r["ds4tw_over_baseline_decode"] == pytest.approx(98.5 / 97.0)
    line = next(x for x in _report.table(doc).splitlines() if x.startswith("baseline decode"))
    assert "1.015" in line and "/tmp/base" in line


def test_abort_check_ratio_and_target() -> None:
    from ds4tw.bench._abort import summarize

    got = summarize([100.0, 96.0, 99.0], [100.0, 100.0, 100.0])
    assert got["ratio"] == pytest.approx(0.99)
    assert got["with_callback_median_tps"] == 99.0
    doc = synthetic_doc()
    doc["abort_check"] = got
    doc["ratios"] = _report.ratios(doc)
    assert doc["ratios"]["abort_callback_decode"] == pytest.approx(0.99)
    target = next(t for t in _report.targets(doc) if t["name"].startswith("decode with the abort"))
    assert target["met"] is True


def test_only_cancel_is_an_option() -> None:
    assert parse(["--only", "cancel"]).only == "cancel"
    assert parse(["--only", "throughput", "--baseline", "b"]).only == "throughput"
    assert parse(["--only", "batching", "--quick"]).only == "batching"
    assert parse([]).only is None
    with pytest.raises(SystemExit):
        parse(["--only", "everything"])


def test_validate_accepts_a_complete_document_and_its_json() -> None:
    doc = synthetic_doc()
    assert _report.validate(doc) == []
    assert _report.validate(json.loads(json.dumps(doc))) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda d: d.pop("machine"), "machine: missing"),
        (lambda d: d.update(schema="other"), "schema:"),
        (lambda d: d["raw"].pop("decode_tps"), "raw.decode_tps"),
        (lambda d: d["ds4tw"]["ttft_short_s"].update(median="fast"), "ds4tw.ttft_short_s.median"),
        (lambda d: d["cancel"]["prefill"].pop("trials"), "cancel.prefill.trials"),
        (lambda d: d["keepalive"].update(limit_s=None), "keepalive.limit_s"),
        (lambda d: d["many_clients"]["outcomes"].update(error=1), "do not add up"),
        (lambda d: d["targets"][0].pop("met"), "targets[0].met"),
        (lambda d: d.update(raw=None), "notes: raw was skipped"),
    ],
)
def test_validate_names_what_is_wrong(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    breakage(doc)
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems


def test_table_and_chart(tmp_path: Path) -> None:
    doc = synthetic_doc()
    text = _report.table(doc)
    assert "decode tok/s" in text and "0.975" in text  # ds4tw/raw
    assert "[MISS] longest silence of a waiting client" in text
    path = tmp_path / "bench.png"
    _report.chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_accounting() -> None:
    # A command name with spaces and parentheses; utime=150, stime=50 ticks.
    fields = ["S"] + ["0"] * 10 + ["150", "50"] + ["0"] * 30
    line = "1234 (python3 (x) y) " + " ".join(fields)
    assert _cpu.parse_stat(line) == pytest.approx(200 / _cpu._TICK)
    got = _cpu.split(10, {10: 1.0, 11: 2.0}, {10: 1.5, 11: 3.0, 12: 0.25})
    assert got == {"main_s": pytest.approx(0.5), "other_s": pytest.approx(1.25)}
    per = _cpu.per_token({"main_s": 0.1, "other_s": 1.9, "client_s": 0.05}, 100)
    assert per["main_ms"] == pytest.approx(1.0) and per["total_ms"] == pytest.approx(20.0)
    assert per["client_ms"] == pytest.approx(0.5)
    assert _cpu.per_token({}, 0)["main_ms"] is None


def test_paired_compares_prompt_by_prompt() -> None:
    def t(tps: float | None, ttft: float) -> dict[str, Any]:
        return {"decode_tps": tps, "ttft_s": ttft}

    ref = {
        "decode": [t(100, 0.050), t(50, 0.080)],
        "ttft": [t(None, 0.040)],
        "long": [t(None, 2.0)],
    }
    stack = {
        "decode": [t(99, 0.052), t(49, 0.083)],
        "ttft": [t(None, 0.041)],
        "long": [t(None, 2.5)],
    }
    p = _throughput.paired(stack, ref)
    assert p["decode_ratio"]["values"] == pytest.approx([0.99, 0.98])
    assert p["ttft_short_diff_ms"]["values"] == pytest.approx([2.0, 3.0, 1.0])
    assert p["ttft_long_diff_ms"]["median"] == pytest.approx(500.0)
    assert p["prefill_ratio"]["median"] == pytest.approx(0.8)
    # The document's ratios prefer the paired medians to the ratio of medians.
    doc = synthetic_doc()
    doc["ds4tw"]["vs_reference"] = p
    r = _report.ratios(doc)
    assert r["ds4tw_decode"] == pytest.approx(0.985)
    assert r["ds4tw_decode_of_medians"] == pytest.approx(98.5 / 101.0)
    assert r["ds4tw_ttft_short_overhead_ms"] == pytest.approx(2.0)


def test_peer_launcher_loads_without_extra_buffers() -> None:
    """The peer gets ds4tw's AMX workaround: default model params say use_extra_bufts=False."""
    import llama_cpp.llama_cpp as C

    from ds4tw import no_extra_buffers

    original = C.llama_model_default_params
    with no_extra_buffers(False) as patched:
        assert not patched and C.llama_model_default_params is original
    with no_extra_buffers(True) as patched:
        assert patched and C.llama_model_default_params().use_extra_bufts is False
    assert C.llama_model_default_params is original


# -- continuous batching -------------------------------------------


def test_aggregate_rate_counts_tokens_after_each_first() -> None:
    S = _batching.StreamTimes
    # One stream: the same as the decode rate of its token times.
    times = [1.0, 1.1, 1.2, 1.3, 1.5]
    assert _batching.aggregate_rate([S(5, 1.0, 1.5)]) == pytest.approx(_stats.decode_rate(times))
    # Four streams fed by the same steps: 4 tokens per 0.1 s step.
    four = [S(11, 2.0 + i * 1e-4, 3.0 + i * 1e-4) for i in range(4)]
    assert _batching.aggregate_rate(four) == pytest.approx(40 / 1.0003)
    # A stream that started a step late stretches the span: an underestimate.
    assert _batching.aggregate_rate([S(11, 2.0, 3.0), S(11, 2.1, 3.1)]) == pytest.approx(20 / 1.1)
    assert _batching.aggregate_rate([]) is None
    assert _batching.aggregate_rate([S(1, 2.0, 2.0)]) is None


def test_whole_streams_got_all_they_asked_for() -> None:
    ok = {"status": 200, "error": None, "tokens": 48, "finish_reason": "length"}
    assert _batching.whole(ok, 48)
    assert not _batching.whole({**ok, "tokens": 47}, 48)
    assert not _batching.whole({**ok, "finish_reason": "stop"}, 48)
    assert not _batching.whole({**ok, "status": 503}, 48)
    assert not _batching.whole({**ok, "error": "timed out"}, 48)


def test_gap_analysis_splits_the_gaps_around_the_window() -> None:
    # Tokens every 10 ms, then a window [0.05, 0.30] with 100 ms steps, then 10 ms again.
    times = [0.0, 0.01, 0.02, 0.03, 0.04, 0.14, 0.24, 0.34, 0.35, 0.36]
    got = _batching.gap_analysis(times, 0.05, 0.30)
    assert got["median_before_s"] == pytest.approx(0.01)
    assert got["max_before_s"] == pytest.approx(0.01)
    # 0.04-0.14, 0.14-0.24 and 0.24-0.34 overlap the window.
    assert got["gaps_inside"] == 3
    assert got["max_inside_s"] == pytest.approx(0.10)
    assert got["median_inside_s"] == pytest.approx(0.10)
    assert got["median_after_s"] == pytest.approx(0.01)
    empty = _batching.gap_analysis([0.0], 0.0, 1.0)
    assert empty["max_inside_s"] is None and empty["median_before_s"] is None


def test_step_metrics_parse_ds4tw_metrics_and_their_deltas() -> None:
    m = Metrics()
    before = _batching.parse_step_metrics(m.render().decode())
    m.step_done(StepStats(sequences=1, decode_tokens=1, prefill_tokens=0, seconds=0.01))
    m.step_done(StepStats(sequences=2, decode_tokens=1, prefill_tokens=255, seconds=0.8))
    m.step_done(StepStats(sequences=2, decode_tokens=1, prefill_tokens=100, seconds=0.4))
    after = _batching.parse_step_metrics(m.render().decode())
    assert after["step_s_count"] == 3 and after["no_prefill_steps"] == 1
    d = _batching.step_delta(before, after)
    assert (d["steps"], d["prefill_steps"], d["prefill_tokens"]) == (3, 2, 355)
    assert d["mean_step_s"] == pytest.approx(1.21 / 3)
    assert d["mean_batch_size"] == pytest.approx(5 / 3)
    assert d["mean_step_tokens"] == pytest.approx(358 / 3)
    assert d["mean_prefill_tokens_per_prefill_step"] == pytest.approx(177.5)
    # The prefill steps' mean: the decode-only step taken at the stream's own gap.
    assert _batching.prefill_step_s(d, 0.01) == pytest.approx(0.6)
    assert _batching.prefill_step_s(d, None) == pytest.approx(1.21 / 2)
    assert _batching.prefill_step_s(_batching.step_delta(after, after), 0.01) is None


def test_ttft_excess_in_steps_and_small_helpers() -> None:
    assert _batching.excess_steps(0.30, 0.10, 0.1) == pytest.approx(2.0)
    assert _batching.excess_steps(None, 0.10, 0.1) is None
    assert _batching.excess_steps(0.3, 0.1, None) is None
    assert _batching.parse_schedstat("308041913 931477 5\n") == pytest.approx(0.308041913)
    assert _batching.words_for(3000, 1.1) == 2727
    assert _batching.words_for(3000, 6.5) == 461


def test_sizes_quick_and_full() -> None:
    quick = _batching.sizes(make_settings(quick=True))
    full = _batching.sizes(make_settings(quick=False))
    assert quick.decode_tokens < full.decode_tokens and quick.rounds < full.rounds
    assert full.gap_batches == (256, _batching.SMALL_BATCH) and quick.gap_batches == (256,)
    assert _batching.sizes(make_settings(quick=False, batch=64)).gap_batches == (64,)
    assert full.gap_prompt_tokens == _batching.GAP_PROMPT_TOKENS
    # The long prompt always fits one slot.
    small = _batching.sizes(make_settings(quick=False, ctx=1024))
    assert small.gap_prompt_tokens < 1024 and small.long_tokens < 1024


def test_scaling_summary_and_reactor_cpu() -> None:
    trials = {
        1: [{"aggregate_tps": 100.0}, {"aggregate_tps": 110.0}],
        4: [{"aggregate_tps": 150.0}, {"aggregate_tps": 160.0}],
    }
    got = _batching.scaling_summary(trials)
    assert got["1"]["ratio_to_1"] == pytest.approx(1.0)
    assert got["4"]["ratio_to_1"] == pytest.approx(155.0 / 105.0)
    assert got["4"]["aggregate_tps"]["n"] == 2
    cpu = {
        1: [{"streamed_tokens": 100, "cpu_s": {"main_sched_s": 0.03, "main_stat_s": 0.03}}],
        4: [{"streamed_tokens": 400, "cpu_s": {"main_sched_s": 0.04, "main_stat_s": 0.05}}],
    }
    r = _batching.reactor_cpu(cpu)
    assert r["1"]["main_ms_per_token"] == pytest.approx(0.3)
    assert r["4"]["main_ms_per_token"] == pytest.approx(0.1)
    assert r["1"]["all_threads_ms_per_token"] is None  # not sampled
    assert r["ratio_4_to_1"] == pytest.approx(1 / 3)
    assert r["ratio_4_to_1_ticks"] == pytest.approx(0.125 / 0.3)


def test_scripted_model_spec_parses() -> None:
    from ds4tw._engine.scripted import parse_spec

    spec = parse_spec(_batching.scripted_model(make_settings(quick=True, engine="scripted"))[9:])
    assert spec.tps == pytest.approx(250.0) and spec.prefill_tps == pytest.approx(2560.0)
    assert spec.eos is False


def batching_section() -> dict[str, Any]:
    """A batching section in the shape L{_batching.measure} writes."""

    def entry(tps: float, x1: float, vs_raw: float | None = None) -> dict[str, Any]:
        e: dict[str, Any] = {
            "aggregate_tps": summary_of(tps),
            "ratio_to_1": x1,
            "per_stream_tps": summary_of(tps),
            "streams_whole": 2,
            "streams_total": 2,
            "mean_batch_size": summary_of(1.0),
        }
        if vs_raw is not None:
            e["vs_raw"] = summary_of(vs_raw)
        return e

    gap = {
        "worst_gap_s": summary_of(0.9),
        "median_gap_before_s": summary_of(0.01),
        "prefill_step_s": summary_of(0.8),
        "prefill_s": summary_of(9.0),
        "prompt_tokens": summary_of(3000.0),
        "worst_over_prefill_step": summary_of(0.9 / 0.8),
    }
    return {
        "parallel": 8,
        "streams": [1, 4],
        "decode_tokens": 128,
        "rounds": 1,
        "source": "test",
        "where": "test",
        "notes": [],
        "raw": {"1": entry(140.0, 1.0), "4": entry(210.0, 1.5)},
        "ds4tw": {"1": entry(137.0, 1.0, 0.98), "4": entry(200.0, 200.0 / 137.0, 0.95)},
        "cpu": {
            "1": {"main_ms_per_token": 0.3},
            "4": {"main_ms_per_token": 0.1},
            "ratio_4_to_1": 1 / 3,
        },
        "ttft": {
            "alone_ttft_s": summary_of(0.05),
            "busy_ttft_s": summary_of(0.06),
            "excess_steps": summary_of(1.5),
            "steps": {"mean_step_s": 0.01},
            "overlapped": 1,
            "trials": 1,
        },
        "gap": {"256": gap, "64": {**gap, "worst_over_prefill_step": summary_of(2.0)}},
        "single_stream": {"ds4tw_over_raw": 0.98, "throughput_part_ratio": None},
    }


def test_batching_ratios_targets_table_and_chart(tmp_path: Path) -> None:
    doc = synthetic_doc()
    before = len(doc["targets"])
    doc["batching"] = batching_section()
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    r = doc["ratios"]
    assert r["batching_ds4tw_4_over_1"] == pytest.approx(200.0 / 137.0)
    assert r["batching_ds4tw_4_over_raw"] == pytest.approx(0.95)
    assert r["batching_raw_4_over_1"] == pytest.approx(1.5)
    assert r["batching_single_over_raw"] == pytest.approx(0.98)
    assert r["batching_gap_256_steps"] == pytest.approx(0.9 / 0.8)
    met = {t["name"]: t["met"] for t in doc["targets"][before:]}
    assert met == {
        "aggregate decode, 4 streams / 1 stream": True,
        "every batched stream whole": True,
        "short request TTFT beside a long decode, steps over its TTFT alone": True,
        "single-stream decode at --parallel 8 / raw single sequence": True,
        "worst token gap while another request prefills, --batch 256": True,
        "worst token gap while another request prefills, --batch 64": False,
        "reactor CPU per token, 4 streams / 1 stream": True,
    }
    assert _report.validate(doc) == []
    text = _report.table(doc)
    assert "continuous batching (--parallel 8" in text and "gap, --batch 64" in text
    path = tmp_path / "bench.png"
    _report.chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batching_table_shows_the_noisiest_trial() -> None:
    a = {"foreign_cores": summary_of(0.1, 0.4)}
    assert _parts.noisiest(a, {"foreign_cores": summary_of(0.2)}) == pytest.approx(0.4)
    assert _parts.noisiest({}, {"foreign_cores": _stats.summary([])}) is None


def test_no_batching_section_no_batching_targets() -> None:
    doc = synthetic_doc()
    assert not any("batched" in t["name"] or "streams" in t["name"] for t in doc["targets"])
    assert not any(k.startswith("batching_") for k in doc["ratios"])


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda b: b.pop("source"), "batching.source"),
        (lambda b: b["ds4tw"].pop("4"), "batching.ds4tw.4: missing"),
        (lambda b: b["raw"]["1"].pop("aggregate_tps"), "batching.raw.1.aggregate_tps"),
        (lambda b: b.pop("ttft"), "batching.ttft: missing"),
        (lambda b: b["gap"]["256"].pop("prefill_s"), "batching.gap.256.prefill_s"),
    ],
)
def test_validate_names_what_is_wrong_in_batching(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    doc["batching"] = batching_section()
    breakage(doc["batching"])
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems


# -- prefill fairness (aging) ----------------------------------------------


def test_fairness_sizes_and_bound() -> None:
    assert _fairness.bound_steps(1024, 256) == (_fairness.AGING_STEPS + 1) * 4
    assert ScriptedEngine().prefill_aging == _fairness.AGING_STEPS
    assert _fairness.bound_steps(1025, 256, aging_steps=2) == 3 * 5
    full, quick = (
        _fairness.sizes(make_settings(quick=False)),
        _fairness.sizes(make_settings(quick=True)),
    )
    assert full.long_tokens == _fairness.LONG_TOKENS and quick.long_tokens < full.long_tokens
    assert full.cap_steps == _fairness.CAP_FACTOR * full.bound_steps
    assert full.short_tokens * full.flood_slots > full.batch  # the flood fills every step
    # The long prompt always fits one slot.
    assert _fairness.sizes(make_settings(quick=False, ctx=512)).long_tokens < 512


def test_fairness_prompts_share_no_prefix() -> None:
    prompts = _fairness.Prompts(3, vocab=2000)
    made = [prompts.make(50) for _ in range(500)]
    assert len({p[0] for p in made}) == 500
    assert all(len(p) == 50 and all(1000 <= t < 2000 for t in p) for p in made)
    assert _fairness.Prompts(3, vocab=2000).make(50) == made[0]


def fairness_trial(ttft: float, steps: int, shorts: list[float], **kw: Any) -> dict[str, Any]:
    """A L{_fairness.trial} result."""
    return {
        "long_ttft_s": ttft,
        "steps": steps,
        "led": kw.get("led", 4),
        "shorts_done": len(shorts),
        "short_ttft_s": shorts,
        "short_ttft_steps": kw.get("short_steps", [2] * len(shorts)),
        "cap_steps": kw.get("cap_steps"),
        "capped": kw.get("at_cap") is not None,
        "long_prefilled_at_cap": kw.get("at_cap"),
        "cached_tokens_max": kw.get("cached", 0),
        "foreign_cores": 0.01,
    }


def test_fairness_summary() -> None:
    alone = [fairness_trial(2.0, 4, []), fairness_trial(3.0, 4, [])]
    aging = fairness_trial(25.0, 36, [1.0, 1.2, 0.9])
    off = fairness_trial(50.0, 77, [0.5, 0.6, 0.7, 0.8], cap_steps=72, at_cap=0, cached=1)
    got = _fairness.summarize(alone, aging, off, bound=36)
    assert got["alone"]["long_ttft_s"]["median"] == pytest.approx(2.5)
    assert got["aging"]["over_alone"] == pytest.approx(10.0)
    assert got["no_aging"]["over_alone"] == pytest.approx(20.0)
    r = got["ratios"]
    assert r["no_aging_over_aging"] == pytest.approx(2.0)
    assert r["short_aging_over_no_aging"] == pytest.approx(1.0 / 0.65)
    assert r["no_aging_is_lower_bound"] is True
    assert got["within_bound"] and got["cached_tokens_max"] == 1
    assert got["no_aging"]["long_prefilled_at_cap"] == 0
    assert got["aging"]["short_ttft_steps"]["median"] == 2.0
    over = _fairness.summarize(alone, fairness_trial(30.0, 37, [1.0]), off, bound=36)
    assert not over["within_bound"]


def test_fairness_measure_on_an_instant_scripted_engine() -> None:
    """The whole part's loop, model-free: the step counts are the policy's, exactly."""
    from ds4tw._engine.scripted import ScriptedEngine

    settings = make_settings(quick=False, engine="scripted")
    engines: list[ScriptedEngine] = []

    def load() -> ScriptedEngine:
        engines.append(ScriptedEngine(n_batch=settings.batch, slots=_fairness.SLOTS))
        return engines[-1]

    got = _fairness.measure(settings, load)
    sz = _fairness.sizes(settings)
    chunks = sz.long_tokens // sz.batch
    assert got["alone"]["steps"] == [chunks] * sz.alone_trials
    aging, off = got["aging"], got["no_aging"]
    # Passed over AGING_STEPS steps, then a whole step: per chunk.
    assert aging["steps"] == sz.bound_steps and aging["led"] == chunks
    assert got["within_bound"] and not aging["capped"]
    # Without aging, nothing at all until the flood stopped.
    assert off["capped"] and off["long_prefilled_at_cap"] == 0
    assert off["steps"] > sz.cap_steps + chunks - 1
    assert aging["shorts_done"] > 0 and off["shorts_done"] > aging["shorts_done"]
    assert got["cached_tokens_max"] == 0
    # The engine's own order is back, and everything was released and closed.
    assert engines[0]._prefill_order.aging_steps == _fairness.AGING_STEPS
    assert engines[0].closed


def fairness_section() -> dict[str, Any]:
    """A prefill fairness section in the shape L{_fairness.measure} writes."""
    alone = [fairness_trial(2.5, 4, []), fairness_trial(2.6, 4, [])]
    aging = fairness_trial(25.0, 36, [1.0, 1.2, 0.9])
    off = fairness_trial(50.0, 77, [0.5, 0.6, 0.7], cap_steps=72, at_cap=0)
    settings = make_settings(quick=False)
    return {
        **_fairness.summarize(alone, aging, off, bound=36),
        "slots": 4,
        "aging_steps": 8,
        "sizes": dataclasses.asdict(_fairness.sizes(settings)),
        "source": "test",
        "where": "in-process LlamaEngine, test",
        "notes": ["capped"],
    }


def test_fairness_ratios_target_table_and_validate() -> None:
    doc = synthetic_doc()
    before = len(doc["targets"])
    doc["prefill_fairness"] = fairness_section()
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    r = doc["ratios"]
    assert r["fairness_aging_over_alone"] == pytest.approx(25.0 / 2.55)
    assert r["fairness_no_aging_over_alone"] == pytest.approx(50.0 / 2.55)
    assert r["fairness_short_aging_over_no_aging"] == pytest.approx(1.0 / 0.6)
    (target,) = doc["targets"][before:]
    assert target["met"] is True and target["value"] == pytest.approx(1.0)
    assert _report.validate(doc) == []
    assert _report.validate(json.loads(json.dumps(doc))) == []
    text = _report.table(doc)
    assert "prefill fairness (in-process LlamaEngine" in text
    assert "flood, no aging" in text and "50.00+" in text
    assert "stopped after 72 steps, when the long prompt had prefilled 0/1024 tokens" in text
    doc["prefill_fairness"]["aging"]["steps"] = 40
    assert _report.targets(doc)[before]["met"] is False
    fairness = _parts.Fairness()
    assert fairness.table({}) == [] and fairness.ratios({}) == {}
    assert not any("fairness" in k for k in _report.ratios(synthetic_doc()))


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda f: f.pop("where"), "prefill_fairness.where"),
        (lambda f: f.pop("alone"), "prefill_fairness.alone: missing"),
        (lambda f: f["aging"].update(long_ttft_s=None), "prefill_fairness.aging.long_ttft_s"),
        (lambda f: f["no_aging"].pop("short_ttft_s"), "prefill_fairness.no_aging.short_ttft_s"),
        (lambda f: f.update(bound_steps=None), "prefill_fairness.bound_steps"),
    ],
)
def test_validate_names_what_is_wrong_in_fairness(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    doc["prefill_fairness"] = fairness_section()
    breakage(doc["prefill_fairness"])
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems


# -- prompt cache -----------------------------------------------


def test_only_cache_is_an_option() -> None:
    assert parse(["--only", "cache"]).only == "cache"


def test_cache_sizes_fit_the_context() -> None:
    full = _cache.sizes(make_settings(quick=False))
    assert full.prefix_tokens == _cache.PREFIX_TOKENS
    assert full.conversations > _cache.PARALLEL and full.turns >= 3
    quick = _cache.sizes(make_settings(quick=True))
    # Above the cache's 512-token minimum, or nothing would be saved.
    assert 512 < quick.prefix_tokens < full.prefix_tokens
    assert quick.conversations > _cache.PARALLEL
    small = _cache.sizes(make_settings(quick=False, ctx=1024))
    assert small.prefix_tokens + small.turns * (small.answer_tokens + 48) < 1024


def test_cache_calibration_sizes_the_prefix_from_prompt_tokens() -> None:
    overhead, per_word = _cache.calibrate([(40, 90), (240, 390)])
    assert per_word == pytest.approx(1.5) and overhead == pytest.approx(30.0)
    assert _cache.prefix_words(2000, overhead, per_word) == 1313
    with pytest.raises(ValueError):
        _cache.calibrate([(40, 90), (40, 95)])
    with pytest.raises(ValueError):
        _cache.calibrate([(40, 90), (240, 90)])


def test_cache_conversation_appends_answers_like_an_agent() -> None:
    prompts = Prompts(1)
    convs = _cache.conversations(prompts, 2, 30, 3)
    assert convs[0].system != convs[1].system
    assert convs[0].system.split()[:2] != convs[1].system.split()[:2]
    c = convs[0]
    first = c.next_messages()
    assert [m["role"] for m in first] == ["system", "user"]
    assert c.next_messages() == first  # asking again adds nothing
    c.answered("Sure.")
    second = c.next_messages()
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[:2] == first and second[2]["content"] == "Sure."
    assert second[3]["content"] == c.users[1] and c.turn == 1
    body = _cache.chat_body(second, 8)
    assert body["messages"] == second and body["messages"] is not second
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    reader = ResponseReader()
    reader.feed(1.0, HEAD)
    for part in ({"role": "assistant"}, {"content": "Hel"}, {"reasoning_content": "x"}):
        reader.feed(1.1, chunk(sse(chat_chunk(part))))
    reader.feed(1.2, chunk(sse(chat_chunk({"content": "lo"}))))
    assert _cache.answer_text(reader.events) == "Hello"


def test_cache_done_lines_parse_what_ds4tw_logs() -> None:
    """The regex reads the line ds4tw's own log_job writes (a format drift fails here)."""
    from ds4tw._types import Finish, Timings, Usage

    events: list[Any] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        for cached, source in ((1990, "ram"), (0, None)):
            job = Job([1, 2], SamplingParams(), label="chatcmpl-1 chat stream=True")
            usage = Usage(prompt_tokens=2034, completion_tokens=16, cached_tokens=cached)
            usage.cached_from = source
            log_job(job, Finish("length", usage, timings=Timings(0.001, 0.25, 0.4)))
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(
        "2026-01-01T00:00:00+0000 [ds4tw._server.app#info] " + formatEvent(e) for e in events
    )
    lines = _cache.parse_done_lines(text + "\nsomething else\n")
    assert [(x["prompt"], x["cached"], x["source"]) for x in lines] == [
        (2034, 1990, "ram"),
        (2034, 0, None),
    ]
    assert lines[0]["prefill_s"] == pytest.approx(0.25)
    assert lines[0]["decode_s"] == pytest.approx(0.4)
    assert lines[0]["completion"] == 16 and lines[0]["finish"] == "length"
    assert lines[0]["line"].startswith("2026-01-01")


def test_cache_metrics_parse_ds4tw_metrics_and_name_the_source() -> None:
    from ds4tw._engine.kvcache import CacheStats

    class Engine:
        cache_stats = CacheStats()
        prompt_cache = None

    m = Metrics()
    m.watch_cache(lambda: [Engine()])
    before = _cache.parse_cache_metrics(m.render().decode())
    assert before["hits"] == {"slot": 0.0, "copy": 0.0, "ram": 0.0, "disk": 0.0}
    assert before["misses"] == 0.0
    Engine.cache_stats.hits["ram"] += 1
    Engine.cache_stats.restored_tokens["ram"] += 2000
    after = _cache.parse_cache_metrics(m.render().decode())
    d = _cache.metrics_delta(before, after)
    assert d["hits"]["ram"] == 1.0 and d["restored_tokens"]["ram"] == 2000.0
    assert _cache.source_of(d) == "ram"
    Engine.cache_stats.misses += 1
    again = _cache.parse_cache_metrics(m.render().decode())
    assert _cache.source_of(_cache.metrics_delta(after, again)) == "miss"
    # Two requests' worth (or none) says nothing.
    assert _cache.source_of(_cache.metrics_delta(before, again)) is None
    assert _cache.source_of(_cache.metrics_delta(again, again)) is None
    # A label only one side has counts from zero.
    assert _cache.metrics_delta({"hits": {}}, {"hits": {"disk": 1.0}}) == {"hits": {"disk": 1.0}}


def test_cache_turns_are_proven_only_from_where_they_claim() -> None:
    proven = _cache.proven
    assert proven("cold", "miss", 0, 2000, None)
    assert proven("cold", "copy", 4, 2000, None)  # the template header from another slot
    assert not proven("cold", "ram", 4, 2000, None)
    assert not proven("cold", "slot", 1500, 2000, None)
    assert proven("slot", "slot", 2010, 2040, 2000)
    assert not proven("slot", "copy", 2010, 2040, 2000)
    assert not proven("slot", "slot", 1999, 2040, 2000)  # less than the previous prompt
    assert proven("ram", "ram", 2056, 2070, 2040, {"ram": 2056.0})
    assert not proven("ram", "ram", 2056, 2070, 2040, {"ram": 0.0})
    assert not proven("disk", "ram", 2056, 2070, 2040, {"ram": 2056.0})
    assert not proven("disk", "disk", None, None, 2040)


def test_cache_hit_rates() -> None:
    def t(prompt: int | None, cached: int | None) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "cached_tokens": cached}

    on = [
        [t(2000, 0), t(2040, 2010), t(2080, 2060)],
        [t(2000, 4), t(2040, 1000), t(None, None)],
    ]
    r = _cache.hit_rates(on)
    assert (r["turns"], r["hits"], r["missing"]) == (4, 2, 1)
    assert r["hit_rate"] == pytest.approx(0.5)
    # min(2010, 2000) + min(2060, 2040) + 1000 over 2000 + 2040 + 2000.
    assert r["token_rate"] == pytest.approx(5040 / 6040)
    assert r["cached_over_reusable"] == pytest.approx(5070 / 6040)
    assert _cache.hit_rates([[t(2000, 0)]])["hit_rate"] is None


def test_cache_answers_are_compared_while_the_prompts_are_the_same() -> None:
    def conv(*answers: str) -> list[dict[str, Any]]:
        return [
            {"turn": i + 1, "answer": a, "cached_tokens": 5, "source": "ram"}
            for i, a in enumerate(answers)
        ]

    got = _cache.compare_answers(
        [conv("a", "b", "c"), conv("x", "y", "z")],
        [conv("a", "b", "c"), conv("x", "Y", "z")],
    )
    # The second conversation's third turn had different histories: not compared.
    assert (got["compared"], got["identical"]) == (5, 4)
    assert got["divergences"] == [
        {
            "conversation": 1,
            "turn": 2,
            "answers": ["y", "Y"],
            "cached_tokens": [5, 5],
            "sources": ["ram", "ram"],
        }
    ]


def test_cache_tier_ratios() -> None:
    def t(conv: int, ttft: float) -> dict[str, Any]:
        return {"conversation": conv, "ttft_s": ttft}

    trials = {
        "cold": [t(0, 6.0), t(1, 8.0), t(2, 7.0), t(3, 9.0)],
        "slot": [t(0, 0.3), t(1, 0.4)],
        "ram": [t(0, 0.5), t(1, 0.4)],
        "disk": [],
    }
    r = _cache.tier_ratios(trials)
    assert r["slot"]["over_cold"] == pytest.approx(0.35 / 7.5)
    assert r["ram"]["over_cold"] == pytest.approx(0.45 / 7.5)
    assert r["ram"]["paired_over_cold"]["values"] == pytest.approx([0.5 / 6, 0.4 / 8])
    assert r["disk"]["over_cold"] is None


def cache_section() -> dict[str, Any]:
    """A cache section in the shape L{_cache.measure} writes."""
    ttft = {"cold": [7.0, 7.2, 6.8], "slot": [0.2], "ram": [0.3], "disk": [1.0]}
    trials = {
        tier: [{"conversation": i, "ttft_s": v} for i, v in enumerate(values)]
        for tier, values in ttft.items()
    }

    def side(hits: int, prefill: float) -> dict[str, Any]:
        return {
            "turns": 12,
            "hits": hits,
            "hit_rate": hits / 12,
            "token_rate": hits / 12,
            "prefill_s": prefill,
            "prefill_later_s": prefill - 28.0,
            "ttft_s": prefill + 1.0,
        }

    return {
        "parallel": 2,
        "sizes": {"conversations": 4},
        "source": "test",
        "where": "test",
        "notes": [],
        "errors": [],
        "tiers": {
            "ttft_s": {tier: _stats.summary(values) for tier, values in ttft.items()},
            "cached_tokens": {tier: summary_of(2000.0) for tier in ttft},
            "prompt_tokens": summary_of(2034.0),
            "ratios": _cache.tier_ratios(trials),
            "proven": {"cold": [True] * 3, "slot": [True], "ram": [True], "disk": [False]},
            "shutdown": {"s": 1.5, "exit_code": 0, "disk": {"files": 9, "bytes": 2**28}},
            "restart": {"ready_s": 3.0},
        },
        "interleaved": {
            "conversations": 4,
            "turns": 4,
            "on": side(12, 30.0),
            "off": side(0, 120.0),
            "prefill_on_over_off": 0.25,
            "prefill_later_on_over_off": 2.0 / 92.0,
            "answers": {
                "compared": 13,
                "identical": 12,
                "divergences": [
                    {
                        "conversation": 2,
                        "turn": 2,
                        "answers": ["a silver", "a stone"],
                        "cached_tokens": [2061, 0],
                        "sources": ["ram", "miss"],
                    }
                ],
            },
        },
    }


def test_cache_ratios_targets_table_and_chart(tmp_path: Path) -> None:
    doc = synthetic_doc()
    before = len(doc["targets"])
    doc["cache"] = cache_section()
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    r = doc["ratios"]
    assert r["cache_ram_over_cold"] == pytest.approx(0.3 / 7.0)
    assert r["cache_disk_over_cold"] == pytest.approx(1.0 / 7.0)
    assert r["cache_hit_rate_on"] == 1.0 and r["cache_hit_rate_off"] == 0.0
    assert r["cache_prefill_on_over_off"] == pytest.approx(0.25)
    met = {t["name"]: t["met"] for t in doc["targets"][before:]}
    assert met == {
        "next turn's TTFT from the prompt cache's memory / cold": True,
        "next turn's TTFT from disk after a restart / cold": True,
        "interleaved conversations' hit rate": True,
        "every tier's turn proven by /metrics": False,
    }
    assert _report.validate(doc) == []
    text = _report.table(doc)
    assert "prompt cache (--parallel 2)" in text and "slots only" in text
    assert "identical 12/13" in text and "'a silver' vs 'a stone'" in text
    assert "[MISS] every tier's turn proven by /metrics: 0.833" in text
    path = tmp_path / "bench.png"
    _report.chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Over the targets: missed.
    doc["cache"]["tiers"]["ttft_s"]["ram"] = summary_of(1.0)
    doc["cache"]["tiers"]["ratios"]["ram"]["over_cold"] = 1.0 / 7.0
    doc["cache"]["interleaved"]["on"]["hit_rate"] = 0.5
    met = {t["name"]: t["met"] for t in _report.targets(doc)[before:]}
    assert not met["next turn's TTFT from the prompt cache's memory / cold"]
    assert not met["interleaved conversations' hit rate"]


def test_no_cache_section_no_cache_targets() -> None:
    doc = synthetic_doc()
    assert not any("prompt cache" in t["name"] for t in doc["targets"])
    assert not any(k.startswith("cache_") for k in doc["ratios"])
    assert _parts.Cache().table({}) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c: c.pop("where"), "cache.where"),
        (lambda c: c["tiers"]["ttft_s"].pop("disk"), "cache.tiers.ttft_s.disk"),
        (lambda c: c["tiers"].pop("ratios"), "cache.tiers.ratios"),
        (lambda c: c["interleaved"].pop("off"), "cache.interleaved.off: missing"),
        (lambda c: c["interleaved"]["on"].pop("hit_rate"), "cache.interleaved.on.hit_rate"),
        (lambda c: c.update(tiers=None, interleaved=None), "neither tiers nor interleaved"),
    ],
)
def test_validate_names_what_is_wrong_in_cache(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    doc["cache"] = cache_section()
    breakage(doc["cache"])
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems


def test_grammar_part_measures_each_captured_request(tmp_path: Path) -> None:
    from ds4tw.bench import _grammars

    workflow = {
        "type": "object",
        "properties": {"script": {"type": "string"}, "args": {"description": "any value"}},
    }
    messages = {
        "model": "m",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "Workflow", "input_schema": workflow}],
    }
    (tmp_path / "claude-code.json").write_text(
        json.dumps({"route": "/v1/messages?beta=true", "body": messages})
    )
    (tmp_path / "aider.json").write_text(json.dumps({"route": "/v1/chat/completions", "body": {}}))
    got = _grammars.measure(quick=True, folder=tmp_path)
    (agent,) = got["agents"]  # aider sends no tools: not measured
    one = got["agents"][agent]
    assert agent == "claude-code" and one["route"] == "/v1/messages" and one["tools"] == 1
    assert one["cold_ms"] > 0 and one["cached_ms"] < one["cold_ms"]
    assert one["cold_vs_baseline"] == pytest.approx(one["cold_ms"] / one["baseline_ms"], rel=0.05)
    assert parse(["--only", "grammar"]).only == "grammar"
