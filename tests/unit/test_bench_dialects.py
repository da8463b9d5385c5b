"""
The benchmark's dialects part (ds4tw.bench._dialects) without a model
and without sockets: its four requests, answered by a real ds4tw (a
scripted engine behind the real Klein app, in memory), read back with
canned arrival times through the part's own frame splitting and each
dialect's counters; its log line parsed from what the server really
logs; the paired arithmetic, the same-answer check, and the part's
ratios, targets, summary lines and schema on canned timings.

Caveat: these prove the arithmetic, the parsing and that the four
bodies are served; how the dialects compare on a real model is what
the run in docs/performance.md measured, and that the part runs end to
end over real sockets is the quick scripted run in
tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw import Server, ServerConfig
from ds4tw.bench import _client, _dialects, _parts, _report
from ds4tw.bench.__main__ import parse
from ds4tw.bench._sse import ChunkedDecoder, ResponseReader
from ds4tw.testing import HTTPHarness, Reply, ScriptedEngine, SteppedThreads

from .test_bench import synthetic_doc

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
#: Frame i of a replayed stream arrives at START + STEP * i; the request was sent at 0.
START, STEP = 1.0, 0.01


def test_only_dialects_runs_on_either_engine() -> None:
    assert parse(["--only", "dialects"]).only == "dialects"
    assert parse(["--only", "dialects", "--engine", "scripted"]).engine == "scripted"


def test_sizes_give_every_dialect_every_place_equally_often() -> None:
    from ds4tw.bench._settings import make_settings

    for quick in (True, False):
        sz = _dialects.sizes(make_settings(quick=quick))
        assert sz.rounds % len(_dialects.DIALECTS) == 0
    orders = [tuple(_dialects.rotate(_dialects.DIALECTS, r)) for r in range(4)]
    for place in range(4):
        assert {o[place] for o in orders} == set(_dialects.DIALECTS)


def _settle(threads: SteppedThreads) -> None:
    for _ in range(200):
        if threads.busy:
            threads.run_until_idle()
        else:
            return
    raise AssertionError("never settled")


def served(max_tokens: int) -> tuple[dict[str, bytes], str]:
    """Every dialect's request, answered by a scripted ds4tw: raw responses, and the log."""
    threads = SteppedThreads()
    clock = Clock()
    engine = ScriptedEngine([Reply.words(WORDS, eos=False)], tps=0)
    server = Server(engine, ServerConfig(keepalive=60.0), clock=clock, threads=threads)
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    out: dict[str, bytes] = {}
    globalLogPublisher.addObserver(observe)
    try:
        server.startService()
        http = HTTPHarness(server.resource(), clock)
        for d in _dialects.DIALECTS:
            body = _dialects.request_body(d, "Tell me a story.", max_tokens)
            exchange = http.post(_dialects.PATHS[d], body)
            _settle(threads)
            assert exchange.status == 200, (d, exchange.raw[:500])
            out[d] = exchange.raw
    finally:
        globalLogPublisher.removeObserver(observe)
        server.stopService()
    return out, "\n".join(lines)


def replay(raw: bytes, framing: _dialects.Framing) -> _client.Stream:
    """
    C{raw} as the client reads it, one frame per read: frame i arrives at
    L{START} + L{STEP} * i (the head with the first), the request sent at 0.
    """
    head, _, chunked = raw.partition(b"\r\n\r\n")
    body = ChunkedDecoder().feed(chunked)
    sep = b"\n\n" if framing == "sse" else b"\n"
    frames = [f + sep for f in body.split(sep) if f]
    reader = ResponseReader()
    reader.feed(START, head + b"\r\n\r\n")
    for i, frame in enumerate(frames):
        reader.feed(START + STEP * i, b"%x\r\n%s\r\n" % (len(frame), frame))
    reader.feed(START + STEP * len(frames), b"0\r\n\r\n")
    assert reader.complete
    return _client.Stream(0.0, reader)


#: Where each dialect's first content frame is: after chat's role chunk,
#: Responses' created, in_progress, item and part added, Anthropic's
#: message_start and content_block_start; Ollama's first line.
FIRST_CONTENT = {"chat": 1, "responses": 4, "messages": 2, "ollama": 0}
FINISH = {"chat": "length", "responses": "max_output_tokens", "messages": "max_tokens"}


def test_the_four_answers_read_back_the_same_way() -> None:
    """
    The four requests are served (200) and give the same text; each
    dialect's own counter says 6 tokens; one content frame a token, so
    with a frame every 10 ms the decode rate is 100 tok/s in all four, and
    TTFT is where that dialect's first content frame is.
    """
    raw, _ = served(6)
    got = {
        d: _dialects.trial_numbers(d, replay(raw[d], _dialects.FRAMINGS[d]))
        for d in _dialects.DIALECTS
    }
    for d, t in got.items():
        assert _dialects.whole(t), (d, t)
        assert t["tokens"] == t["content_frames"] == 6, d
        assert t["prompt_tokens"] == got["chat"]["prompt_tokens"] > 0, d
        assert t["ttft_s"] == pytest.approx(START + STEP * FIRST_CONTENT[d]), d
        assert t["end_s"] == pytest.approx(START + STEP * (FIRST_CONTENT[d] + 5)), d
        assert t["decode_tps"] == pytest.approx(100.0), d
        assert t["steady_tps"] == pytest.approx(100.0), d
        assert t["finish"] == FINISH.get(d, "length"), d
        assert t["wire_bytes"] == len(raw[d]), d
        assert t["body_bytes_per_token"] == pytest.approx(t["body_bytes"] / 6), d
        assert t["other_body_bytes"] < t["body_bytes"], d
    assert len({t["text"] for t in got.values()}) == 1
    assert got["chat"]["text"] == " ".join(WORDS.split()[:6])
    # NDJSON lines are shorter than the SSE events of any dialect here.
    assert got["ollama"]["body_bytes"] < min(got[d]["body_bytes"] for d in ("chat", "messages"))
    # Responses opens with two whole response objects.
    assert got["responses"]["other_body_bytes"] > 2 * got["chat"]["other_body_bytes"]


def test_the_job_s_log_line_gives_the_server_side_numbers() -> None:
    _, log = served(4)

    class Logged:
        def log_since(self, offset: int) -> str:
            return log[offset:]

    got = _dialects.server_numbers(cast(Any, Logged()), 0)
    assert got["server_completion"] == 4 and got["server_prompt"] > 0
    assert got["server_decode_s"] >= 0.0


def test_a_frame_has_the_time_of_the_read_that_completed_it() -> None:
    body = b'{"a":1}\n{"b":2}\n{"c"'
    # The first line whole in the first read; the second ends in the second
    # read, with the start of a third that never ends.
    ends = [(1.0, 9), (2.0, len(body))]
    frames = _dialects.split_frames(body, ends, "ndjson")
    assert [(f.t, f.payload, f.size) for f in frames] == [(1.0, {"a": 1}, 8), (2.0, {"b": 2}, 8)]
    sse = b': queued\n\nevent: x\ndata: {"n": 1}\n\ndata: [DONE]\n\n'
    frames = _dialects.split_frames(sse, [(3.0, len(sse))], "sse")
    assert [f.payload for f in frames] == [None, {"n": 1}, None]
    assert frames[1].event == "x" and frames[2].text == "[DONE]"
    assert sum(f.size for f in frames) == len(sse)


def test_counters_of_ollama_s_final_line_and_an_error_line() -> None:
    final = {
        "model": "m",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "prompt_eval_count": 12,
        "eval_count": 50,
        "eval_duration": 500_000_000,
    }
    frame = _dialects.Frame(1.0, 10, final)
    got = _dialects.counters("ollama", [frame])
    assert got["tokens"] == 50 and got["prompt_tokens"] == 12 and got["done"]
    assert got["eval_tps"] == pytest.approx(100.0) and got["finish"] == "length"
    error = _dialects.counters("ollama", [_dialects.Frame(1.0, 10, {"error": "boom"})])
    assert error["error"] == '"boom"' and not error["done"]
    anthropic = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    assert "busy" in _dialects.counters("messages", [_dialects.Frame(1.0, 10, anthropic)])["error"]


def _trial(
    ttft: float, tps: float, server: float, wire: float, text: str = "same", tokens: int = 100
) -> dict[str, Any]:
    return {
        "status": 200,
        "error": None,
        "done": True,
        "text": text,
        "tokens": tokens,
        "ttft_s": ttft,
        "decode_tps": tps,
        "steady_tps": tps,
        "server_decode_tps": server,
        "eval_tps": None,
        "wire_bytes_per_token": wire,
        "body_bytes_per_token": wire - 10,
        "content_frame_bytes": wire - 20,
        "other_body_bytes": 500,
    }


def canned_rounds() -> list[dict[str, dict[str, Any]]]:
    """Four rounds; responses 10 % slower to its first token, ollama's bytes 60 % of chat's."""
    rounds = []
    for k, base in enumerate((0.020, 0.030, 0.040, 0.050)):
        rounds.append(
            {
                "chat": _trial(base, 100.0, 101.0, 250.0),
                "responses": _trial(base * 1.1, 99.0, 101.0, 350.0),
                "messages": _trial(base + 0.001, 100.0, 100.0, 160.0),
                "ollama": _trial(base, 101.0, 101.0, 150.0, text="other" if k == 3 else "same"),
            }
        )
    return rounds


def test_summarise_pairs_every_dialect_with_the_baseline_of_its_round() -> None:
    cpu = {
        "chat": {"main_s": 0.08, "other_s": 4.0},
        "responses": {"main_s": 0.12, "other_s": 4.0},
        "messages": {"main_s": 0.10, "other_s": 4.0},
        "ollama": {"main_s": 0.06, "other_s": 4.0},
    }
    got = _dialects.summarise(canned_rounds(), cpu)
    per, vs = got["per_dialect"], got["vs_baseline"]
    assert set(vs) == {"responses", "messages", "ollama"}
    assert per["chat"]["ttft_s"]["median"] == pytest.approx(0.035)
    assert per["chat"]["whole"] == per["chat"]["trials"] == 4
    r = vs["responses"]
    assert r["ttft_s"]["median"] == pytest.approx(1.1)
    assert r["ttft_s"]["p25"] == pytest.approx(1.1) and r["ttft_s"]["p75"] == pytest.approx(1.1)
    assert r["ttft_diff_ms"]["median"] == pytest.approx(3.5)
    assert r["decode_tps"]["median"] == pytest.approx(0.99)
    assert r["wire_bytes_per_token"]["median"] == pytest.approx(1.4)
    # 0.12 s over 400 tokens against 0.08 s over 400.
    assert per["responses"]["cpu_per_token"]["main_ms"] == pytest.approx(0.3)
    assert r["reactor_ms_per_token"] == pytest.approx(1.5)
    m = vs["messages"]
    assert m["ttft_diff_ms"]["median"] == pytest.approx(1.0)
    # The paired ratios of 0.021/0.020 ... 0.051/0.050, their quartiles around the median.
    assert m["ttft_s"]["p25"] < m["ttft_s"]["median"] < m["ttft_s"]["p75"]
    assert m["of_medians"]["ttft_s"] == pytest.approx(0.036 / 0.035)
    assert vs["ollama"]["wire_bytes_per_token"]["median"] == pytest.approx(0.6)
    same = got["same_answer"]
    assert same["compared"] == 4 and same["same_text"] == 3 and same["same_tokens"] == 4
    assert [d["round"] for d in same["differ"]] == [3]


def dialects_section() -> dict[str, Any]:
    """A dialects section in the shape L{_dialects.measure} writes."""
    cpu = {d: {"main_s": 0.08, "other_s": 4.0} for d in _dialects.DIALECTS}
    return {
        **_dialects.summarise(canned_rounds(), cpu),
        "baseline": _dialects.BASELINE,
        "sizes": {"rounds": 4, "max_tokens": 100, "prompt_words": 16},
        "foreign_cores": {"max": 0.05},
        "rounds": [],
    }


def test_dialects_ratios_targets_table_and_schema() -> None:
    doc = synthetic_doc()
    before = len(doc["targets"])
    doc["dialects"] = dialects_section()
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    r = doc["ratios"]
    assert r["dialects_responses_ttft"] == pytest.approx(1.1)
    assert r["dialects_responses_ttft_diff_ms"] == pytest.approx(3.5)
    assert r["dialects_ollama_wire_bytes_per_token"] == pytest.approx(0.6)
    assert r["dialects_responses_decode"] == pytest.approx(0.99)
    assert r["dialects_messages_reactor_cpu"] == pytest.approx(1.0)
    assert "dialects_chat_ttft" not in r
    met = {t["name"]: t["met"] for t in doc["targets"][before:]}
    assert met == {
        "the same greedy answer through the four dialects": False,
        "dialect streams whole": True,
    }
    assert _report.validate(doc) == []
    text = _report.table(doc)
    assert "dialects: 4 rounds x 100 tokens" in text
    assert "responses" in text and "1.100 [1.100, 1.100]" in text and "+3.50" in text
    assert "same answer in all four: 3/4 rounds" in text
    assert "[MISS] the same greedy answer through the four dialects" in text


def test_no_dialects_section_no_dialects_lines() -> None:
    doc = synthetic_doc()
    assert not any(k.startswith("dialects_") for k in doc["ratios"])
    assert _parts.Dialects().targets(doc) == [] and _parts.Dialects().table(doc) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda s: s["per_dialect"].pop("ollama"), "dialects.per_dialect.ollama: missing"),
        (lambda s: s["vs_baseline"].pop("messages"), "dialects.vs_baseline.messages: missing"),
        (lambda s: s["per_dialect"]["chat"].pop("ttft_s"), "dialects.per_dialect.chat.ttft_s"),
        (
            lambda s: s["vs_baseline"]["responses"]["ttft_diff_ms"].pop("median"),
            "dialects.vs_baseline.responses.ttft_diff_ms.median",
        ),
        (lambda s: s.pop("rounds"), "dialects.rounds"),
    ],
)
def test_validate_names_what_is_wrong_in_dialects(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    doc["dialects"] = copy.deepcopy(dialects_section())
    breakage(doc["dialects"])
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems
