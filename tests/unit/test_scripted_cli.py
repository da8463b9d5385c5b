"""
C{twistd ds4tw --model scripted:SPEC}: the spec's grammar and its errors,
the engine it builds (replies, reasoning, pacing, the prefix cache), and
C{X-Session-Id} (echoed, named in the job's log line).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage

from ds4tw import Options, Server, makeService
from ds4tw._engine.interface import Aborted, AbortFlag, PrefillProgress, SamplingParams, Token
from ds4tw._engine.scripted import ScriptedSpec, parse_spec
from ds4tw.testing import ScriptedEngine

from .conftest import make_rig


def parse(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


# -- the grammar ------------------------------------------------------------


def test_empty_spec_is_the_defaults() -> None:
    assert parse_spec("") == ScriptedSpec()


def test_pairs_separated_by_commas_or_semicolons() -> None:
    spec = parse_spec("tps=50;prefill_tps=200, think=3,eos=0")
    assert spec == ScriptedSpec(tps=50.0, prefill_tps=200.0, think=3, eos=False)
    assert parse_spec("tps=5,,;") == ScriptedSpec(tps=5.0)


def test_reply_takes_the_rest_verbatim() -> None:
    spec = parse_spec("tps=50,reply=Hello there, friend; think=1 is text here.")
    assert spec.replies == ("Hello there, friend; think=1 is text here.",)
    assert spec.tps == 50.0 and spec.think == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tps=x", r"tps must be a number >= 0, got 'x'"),
        ("tps=-1", r"tps must be a number >= 0"),
        ("prefill_tps=nan", r"prefill_tps must be a number >= 0"),
        ("think=1.5", r"think must be a whole number >= 0"),
        ("eos=yes", r"eos must be 1 or 0, got 'yes'"),
        ("speed=3", r"unknown key 'speed'; known keys: reply, tps, prefill_tps, think, eos, when"),
        ("when=x", r"when must be an object of texts to non-empty replies"),
        ("tps=1;tps=2", r"'tps' given twice"),
        ("tps=1,think", r"expected KEY=VALUE, got 'think'"),
        ("=3", r"expected KEY=VALUE, got '=3'"),
        ("reply=", r"reply must be non-empty text"),
        ("nofile.json", r"cannot read the scripted spec file 'nofile.json'"),
    ],
)
def test_a_bad_spec_is_a_usage_error_naming_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)
    with pytest.raises(usage.UsageError, match=message):
        parse("--model", "scripted:" + spec)


def test_a_json_file_with_the_same_keys(tmp_path: Path) -> None:
    f = tmp_path / "spec.json"
    f.write_text(json.dumps({"reply": ["One, two.", "Three."], "tps": 40, "eos": False}))
    assert parse_spec(str(f)) == ScriptedSpec(("One, two.", "Three."), tps=40.0, eos=False)
    f.write_text(json.dumps({"tps": "fast"}))
    with pytest.raises(ValueError, match=r"tps must be a number >= 0 in '.*spec.json'"):
        parse_spec(str(f))
    f.write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        parse_spec(str(f))
    f.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        parse_spec(str(f))
    f.write_text(json.dumps({"reply": []}))
    with pytest.raises(ValueError, match="reply must be non-empty text"):
        parse_spec(str(f))


def test_a_file_maps_prompt_texts_to_replies(tmp_path: Path) -> None:
    f = tmp_path / "spec.json"
    f.write_text(json.dumps({"reply": "Call.", "when": {"PAPAYA": "Read it.", "title": "T."}}))
    assert parse_spec(str(f)) == ScriptedSpec(
        ("Call.",), when=(("PAPAYA", "Read it."), ("title", "T."))
    )
    for bad in (["PAPAYA", "x"], {"": "x"}, {"PAPAYA": " "}, {"PAPAYA": 3}):
        f.write_text(json.dumps({"when": bad}))
        with pytest.raises(ValueError, match=r"when must be an object .* in '.*spec.json'"):
            parse_spec(str(f))


def test_the_option_help_documents_the_spec() -> None:
    text = str(Options())
    assert "scripted:KEY=VALUE" in text and "prefill_tps" in text


# -- the engine it builds ---------------------------------------------------


def test_the_service_serves_the_scripted_engine() -> None:
    o = parse("--model", "scripted:tps=0,reply=Hi, you.", "--ctx", "512", "--batch", "16")
    (server,) = [s for s in makeService(o) if isinstance(s, Server)]  # type: ignore[attr-defined]
    engine = server.engine
    assert isinstance(engine, ScriptedEngine)
    assert (engine.n_ctx, engine.n_batch, engine.model_id) == (512, 16, "scripted")
    assert engine.prefix_cache
    named = parse("--model", "scripted:", "--model-id", "fake-llm")
    (server,) = [s for s in makeService(named) if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.engine.model_id == "fake-llm"


def pieces(engine: ScriptedEngine, prompt: list[int], **kw: Any) -> list[bytes]:
    return [
        e.piece
        for e in engine.generate(prompt, SamplingParams(max_tokens=kw.pop("max_tokens", 50), **kw))
        if isinstance(e, Token)
    ]


def test_think_opens_a_reasoning_block_and_eos_0_pads() -> None:
    engine = ScriptedSpec(("Hi, you.",), think=2).engine()
    assert b"".join(pieces(engine, [1, 2])) == b"<think> thinking thinking</think>\n\nHi, you."
    padded = ScriptedSpec(("Hi.",), eos=False).engine()
    assert pieces(padded, [1, 2], max_tokens=3) == [b"Hi.", b" x", b" x"]


def test_replies_from_a_file_play_in_turn() -> None:
    engine = ScriptedSpec(("One.", "Two.")).engine()
    assert [pieces(engine, [i, 9]) for i in range(3)] == [[b"One."], [b"Two."], [b"Two."]]


def test_a_prompt_containing_a_when_text_gets_its_reply_out_of_turn() -> None:
    engine = ScriptedSpec(
        ("One.", "Two."), think=1, when=(("tool said 42", "It is 42."), ("42", "Never."))
    ).engine()
    prompt = engine.tokenize(engine.apply_chat_template([{"role": "user", "content": "Go"}]).text)
    answered = engine.tokenize("... the tool said 42 ...")
    assert b"".join(pieces(engine, answered)) == b"<think> thinking</think>\n\nIt is 42."
    # It took no turn: the list still starts at its first reply.
    assert b"".join(pieces(engine, prompt)).endswith(b"One.")
    assert b"".join(pieces(engine, answered)).endswith(b"It is 42.")
    assert b"".join(pieces(engine, prompt)).endswith(b"Two.")


def test_pacing_takes_real_time_per_token_and_prefill_token() -> None:
    engine = ScriptedEngine(["a b c d"], tps=200, prefill_tps=1000, n_batch=10)
    t0 = time.perf_counter()
    assert pieces(engine, list(range(20))) == [b"a", b" b", b" c", b" d"]
    elapsed = time.perf_counter() - t0
    # 20 prompt tokens at 1000/s and 4 tokens at 200/s: 40 ms.
    assert 0.032 <= elapsed < 0.5


def test_a_paced_step_stops_inside_itself_at_an_abort() -> None:
    engine = ScriptedEngine(["a"], prefill_tps=1, n_batch=10)
    flag = AbortFlag()
    gen = engine.generate(list(range(10)), SamplingParams(max_tokens=5), flag)
    timer = threading.Timer(0.05, flag.set)  # as the reactor sets it, mid-step
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(Aborted):
        next(gen)  # a 10 s prefill batch
    assert time.perf_counter() - t0 < 1.0
    assert ("prefill", 10) not in engine.computed
    timer.join()


def test_unpaced_by_default() -> None:
    engine = ScriptedEngine()
    assert (engine.tps, engine.prefill_tps, engine.prefix_cache) == (0.0, 0.0, False)


# -- the prefix cache ---------------------------------------------------------


def progress(engine: ScriptedEngine, prompt: list[int]) -> list[PrefillProgress]:
    return [
        e
        for e in engine.generate(prompt, SamplingParams(max_tokens=2))
        if isinstance(e, PrefillProgress)
    ]


def test_the_prefix_shared_with_the_last_prompt_is_cached() -> None:
    engine = ScriptedEngine(["a"], n_batch=4, prefix_cache=True)
    first = progress(engine, list(range(10)))
    assert [(p.done, p.cached) for p in first] == [(4, 0), (8, 0), (10, 0)]
    # A second turn: the whole first prompt, then more.
    second = progress(engine, [*range(10), 50, 51])
    assert [(p.done, p.total, p.cached) for p in second] == [(12, 12, 10)]
    # The same prompt again: all but one token (sampling needs fresh logits).
    again = progress(engine, [*range(10), 50, 51])
    assert [(p.done, p.cached) for p in again] == [(12, 11)]
    # Another conversation shares only what it shares.
    other = progress(engine, [0, 1, 99, 98])
    assert [(p.done, p.cached) for p in other] == [(4, 2)]
    assert progress(engine, [0, 1, 99, 98, 5])[-1].cached == 4


def test_a_cancelled_prefill_caches_only_what_it_computed() -> None:
    engine = ScriptedEngine(["a"], n_batch=4, prefix_cache=True)
    gen = engine.generate(list(range(12)), SamplingParams(max_tokens=2))
    assert next(gen) == PrefillProgress(4, 12, 0)
    gen.close()
    assert progress(engine, list(range(12)))[0].cached == 4


def test_prefill_pacing_costs_only_the_uncached_tokens() -> None:
    engine = ScriptedEngine(["a"], prefill_tps=500, n_batch=64, prefix_cache=True)
    progress(engine, list(range(50)))  # 100 ms
    t0 = time.perf_counter()
    progress(engine, [*range(50), 7])  # 1 token: 2 ms
    assert time.perf_counter() - t0 < 0.05


def test_second_turn_reports_cached_tokens_over_http() -> None:
    rig = make_rig()
    # The engine was built without a prefix cache: turn its slot table's reuse on.
    rig.engine.table.reuse = True
    first = rig.chat("Hi")
    rig.threads.run_until_idle()
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And then?"},
    ]
    second = rig.http.post("/v1/chat/completions", {"model": "m", "messages": messages})
    rig.threads.run_until_idle()
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert prompt_tokens - 1 <= cached <= second.json()["usage"]["prompt_tokens"]


# -- X-Session-Id -------------------------------------------------------------


def test_session_id_is_echoed_and_logged() -> None:
    rig = make_rig()
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"X-Session-Id": "conv-7f3a.1"}
        paths = {
            "/v1/chat/completions": payload,
            "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 3},
            "/v1/responses": {"model": "m", "input": "hi"},
            "/v1/messages": {**payload, "max_tokens": 8},
        }
        exchanges = [rig.http.post(path, body, headers) for path, body in paths.items()]
        rig.threads.run_until_idle()
        assert [ex.status for ex in exchanges] == [200] * 4
        assert {ex.header("x-session-id") for ex in exchanges} == {"conv-7f3a.1"}
        done = [line for line in lines if " done: " in line]
        assert len(done) == 4 and all("session=conv-7f3a.1 done:" in line for line in done)
        # Any response echoes it; none is invented; an insane one is ignored.
        assert rig.http.get("/health", headers).header("x-session-id") == "conv-7f3a.1"
        assert rig.http.get("/health").header("x-session-id") is None
        lines.clear()
        bad = rig.http.post("/v1/chat/completions", payload, {"X-Session-Id": "has space"})
        rig.threads.run_until_idle()
        assert bad.status == 200 and bad.header("x-session-id") is None
        assert not any("session=" in line for line in lines)
    finally:
        globalLogPublisher.removeObserver(observer)


def test_the_job_log_line_names_the_request_id_the_client_saw() -> None:
    rig = make_rig()
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        paths = {
            "/v1/chat/completions": payload,
            "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 3},
            "/v1/responses": {"model": "m", "input": "hi"},
            "/v1/messages": {**payload, "max_tokens": 8},
        }
        given = [
            rig.http.post(path, body, {"X-Request-Id": f"client-{i}"})
            for i, (path, body) in enumerate(paths.items())
        ]
        fresh = rig.http.post("/v1/chat/completions", payload)
        rig.threads.run_until_idle()
        done = [line for line in lines if " done: " in line]
        assert len(done) == 5
        for i in range(4):
            assert given[i].header("x-request-id") == f"client-{i}"
            assert sum(f"request=client-{i} done:" in line for line in done) == 1
        # A request without one gets a fresh id, and the log line names that one.
        rid = fresh.header("x-request-id")
        assert rid is not None and rid.startswith("req_")
        assert sum(f"request={rid} done:" in line for line in done) == 1
    finally:
        globalLogPublisher.removeObserver(observer)
