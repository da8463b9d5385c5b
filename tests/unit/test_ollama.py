"""
The Ollama dialect's own behaviour on the scripted engine: NDJSON lines
and their content type, the counters of the last line, the keepalive as
an empty chunk of the answer's kind (never a comment or a blank line),
options mapped onto sampling (num_predict, num_ctx, stop, seed...),
think, format, tools with object arguments and tool results paired with
their calls, /api/generate (templated, raw, refused overrides), errors in
Ollama's shape (in a body and as a stream's last line), and the load and
unload requests and keep_alive on an on-demand fleet. Every line is
validated against the official C{ollama} library's types. What every chat
dialect does alike (cancel at each stage, held-back text under the
keepalive, 503s) is in tests/unit/test_dialects.py; the routes beyond
turns in tests/unit/test_ollama_models.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from ollama import ChatResponse, GenerateResponse
from twisted.internet.task import Clock

from ds4tw import Server, ServerConfig
from ds4tw._api.ollama.schema import ChatRequest, _duration
from ds4tw._runtime.fleet import Model
from ds4tw.testing import Exchange, HTTPHarness, Reply, ScriptedEngine, SteppedThreads

from .conftest import Rig, fail_every_step, make_rig
from .tools import CALL, WEATHER

THINKING = Reply.of("<think>", "Let me", " see.", "</think>", "It is", " 4.")
COUNTERS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


def chat(rig: Rig, text: str = "hi", **kw: Any) -> Exchange:
    payload = {"model": "scripted", "messages": [{"role": "user", "content": text}], **kw}
    return rig.http.post("/api/chat", payload)


def generate(rig: Rig, prompt: str = "hi", **kw: Any) -> Exchange:
    return rig.http.post("/api/generate", {"model": "scripted", "prompt": prompt, **kw})


def lines(ex: Exchange, kind: str = "chat") -> list[dict[str, Any]]:
    """Every line of the NDJSON stream, each one JSON object checked against the library."""
    raw = ex.body
    assert raw.endswith(b"\n") and b"\n\n" not in raw and not raw.startswith(b":"), raw
    out = []
    for text in raw.decode().splitlines():
        got = json.loads(text)
        if "error" not in got:
            (ChatResponse if kind == "chat" else GenerateResponse).model_validate(got)
        out.append(got)
    return out


def keepalives(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        g
        for g in got
        if not g.get("done")
        and not g.get("response")
        and not g.get("thinking")
        and not (g.get("message") or {}).get("content")
        and not (g.get("message") or {}).get("thinking")
        and not (g.get("message") or {}).get("tool_calls")
    ]


def text_of(got: list[dict[str, Any]], field: str = "content") -> str:
    return "".join((g.get("message") or {}).get(field) or "" for g in got)


def prompt_text(rig: Rig, call: int = -1) -> str:
    return "".join(chr(t) for t in rig.engine.calls[call][0])


# -- the stream -------------------------------------------------------------------


def test_a_chat_streams_ndjson_with_ollama_counters_on_the_last_line() -> None:
    rig = make_rig([THINKING])
    ex = chat(rig)
    rig.threads.run_until_idle()
    assert ex.status == 200 and ex.header("content-type") == "application/x-ndjson"
    got = lines(ex)
    assert text_of(got) == "It is 4." and text_of(got, "thinking") == "Let me see."
    *body, last = got
    assert not any(g["done"] for g in body) and last["done"] is True
    assert last["done_reason"] == "stop" and last["message"] == {"role": "assistant", "content": ""}
    assert all(isinstance(last[k], int) and last[k] >= 0 for k in COUNTERS)
    assert last["prompt_eval_count"] == len(rig.engine.calls[0][0])
    assert last["eval_count"] == 6
    assert last["total_duration"] >= last["prompt_eval_duration"] > 0
    assert all(g["model"] == "scripted" and g["created_at"].endswith("Z") for g in got)


def test_the_plain_body_says_what_the_stream_said() -> None:
    rig = make_rig([THINKING, THINKING])
    streamed = chat(rig)
    rig.threads.run_until_idle()
    plain = chat(rig, stream=False)
    rig.threads.run_until_idle()
    assert plain.header("content-type") == "application/json"
    body = plain.json()
    ChatResponse.model_validate(body)
    got = lines(streamed)
    assert body["message"] == {
        "role": "assistant",
        "content": text_of(got),
        "thinking": text_of(got, "thinking"),
    }
    assert body["done"] is True and body["done_reason"] == got[-1]["done_reason"]
    assert body["eval_count"] == got[-1]["eval_count"]


def test_a_reply_cut_by_num_predict_is_done_for_length() -> None:
    rig = make_rig(["one two three four five"])
    ex = chat(rig, options={"num_predict": 3})
    rig.threads.run_until_idle()
    got = lines(ex)
    assert got[-1]["done_reason"] == "length" and got[-1]["eval_count"] == 3
    assert rig.engine.calls[0][1].max_tokens == 3


# -- the keepalive ------------------------------------------------------------------


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_a_queued_request_is_kept_alive_with_empty_chunks_of_its_own_kind(route: str) -> None:
    rig = make_rig(["busy " * 3, "Hello."], keepalive=2.0)
    first = chat(rig)
    rig.threads.step()  # the first request holds the one slot
    waiting = chat(rig) if route == "chat" else generate(rig)
    rig.clock.advance(2.0)
    rig.clock.advance(2.0)
    before = lines(waiting, route)
    assert len(before) == 2 and keepalives(before) == before
    if route == "chat":
        assert before[0]["message"] == {"role": "assistant", "content": ""}
        assert "response" not in before[0]
    else:
        assert before[0]["response"] == "" and "message" not in before[0]
    assert all(b["done"] is False and b["model"] == "scripted" for b in before)
    rig.threads.run_until_idle()
    assert first.finished and waiting.finished
    got = lines(waiting, route)
    said = text_of(got) if route == "chat" else "".join(g["response"] for g in got)
    assert said == "Hello."
    assert (
        rig.server.metrics.registry.get_sample_value(
            "ds4tw_keepalive_frames_total", {"stage": "queued"}
        )
        == 2.0
    )


def test_a_busy_stream_carries_no_keepalive() -> None:
    rig = make_rig(["a b c d"], keepalive=2.0)
    ex = chat(rig)
    for _ in range(6):
        rig.threads.step()
        rig.clock.advance(1.0)
    assert keepalives(lines(ex)) == []


def test_progress_comments_are_never_written_into_ndjson() -> None:
    rig = make_rig(["Hello."], keepalive=2.0)
    ex = rig.http.post(
        "/api/chat",
        {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-DS4TW-Progress": "1"},
    )
    rig.clock.advance(3.0)
    rig.threads.run_until_idle()
    assert text_of(lines(ex)) == "Hello."


# -- options, think, format ------------------------------------------------------------


def test_options_map_onto_sampling() -> None:
    rig = make_rig(["ok"])
    ex = chat(
        rig,
        stream=False,
        options={
            "temperature": 0.2,
            "top_p": 0.5,
            "top_k": 7,
            "min_p": 0.1,
            "seed": 42,
            "stop": ["END"],
            "repeat_penalty": 1.3,
            "presence_penalty": 0.4,
            "frequency_penalty": 0.6,
            "num_predict": 9,
            # Load-time options: the server's command line sets them.
            "num_gpu": 99,
            "num_thread": 3,
            "use_mmap": False,
        },
    )
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    params = rig.engine.calls[0][1]
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.2, 0.5, 7, 0.1)
    assert (params.seed, params.repeat_penalty, params.max_tokens) == (42, 1.3, 9)
    assert (params.presence_penalty, params.frequency_penalty) == (0.4, 0.6)
    assert params.stop[0] == "END"


@pytest.mark.parametrize("num_predict", [-1, -2, 0])
def test_num_predict_without_a_limit_leaves_the_context(num_predict: int) -> None:
    rig = make_rig(["ok"], n_ctx=512)
    chat(rig, stream=False, options={"num_predict": num_predict})
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].max_tokens == 512 - len(rig.engine.calls[0][0])


def test_a_smaller_num_ctx_caps_the_turn_and_a_larger_one_is_the_slot() -> None:
    rig = make_rig(["ok", "ok"], n_ctx=512)
    chat(rig, stream=False, options={"num_ctx": 100})
    chat(rig, stream=False, options={"num_ctx": 100_000})
    rig.threads.run_until_idle()
    prompt = len(rig.engine.calls[0][0])
    assert rig.engine.calls[0][1].max_tokens == 100 - prompt
    assert rig.engine.calls[1][1].max_tokens == 512 - prompt


def test_a_prompt_longer_than_num_ctx_is_a_400_before_anything_is_queued() -> None:
    rig = make_rig(["ok"], n_ctx=512)
    ex = chat(rig, "x" * 80, options={"num_ctx": 50})
    assert ex.status == 400 and "50" in ex.json()["error"]
    assert set(ex.json()) == {"error"} and rig.engine.calls == []


@pytest.mark.parametrize(
    ("think", "enabled", "shown"), [(None, None, True), (True, True, True), (False, False, False)]
)
def test_think_reaches_the_template_and_decides_what_is_shown(
    think: bool | None, enabled: bool | None, shown: bool
) -> None:
    rig = make_rig([THINKING])
    asked: dict[str, Any] = {} if think is None else {"think": think}
    ex = chat(rig, stream=False, **asked)
    rig.threads.run_until_idle()
    kwargs = rig.engine.template_kwargs[-1]
    assert kwargs.get("enable_thinking") is enabled
    message = ex.json()["message"]
    assert message["content"] == "It is 4."
    assert ("thinking" in message) is shown


def test_think_as_an_effort_reaches_the_template() -> None:
    rig = make_rig(["ok"])
    chat(rig, stream=False, think="high")
    rig.threads.run_until_idle()
    kwargs = rig.engine.template_kwargs[-1]
    assert kwargs["enable_thinking"] is True and kwargs["reasoning_effort"] == "high"


@pytest.mark.parametrize(
    "fmt", ["json", {"type": "object", "properties": {"a": {"type": "string"}}}]
)
def test_format_constrains_the_reply_with_a_grammar(fmt: Any) -> None:
    rig = make_rig(['{"a": "b"}'])
    ex = chat(rig, stream=False, format=fmt)
    rig.threads.run_until_idle()
    assert ex.status == 200
    grammar = rig.engine.calls[0][1].grammar
    assert grammar is not None and grammar.triggers == ()
    assert json.loads(ex.json()["message"]["content"]) == {"a": "b"}


def test_an_invalid_format_schema_is_a_400() -> None:
    rig = make_rig()
    ex = chat(rig, format={"type": 12})
    assert ex.status == 400 and ex.json()["error"].startswith("format:")


# -- tools ------------------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": WEATHER.name,
        "description": WEATHER.description,
        "parameters": dict(WEATHER.parameters),
    },
}


@pytest.mark.parametrize("stream", [True, False])
def test_a_tool_call_comes_whole_with_its_arguments_as_an_object(stream: bool) -> None:
    rig = make_rig([Reply.of("Checking.", CALL)])
    ex = chat(rig, "weather in Paris?", stream=stream, tools=[TOOL])
    rig.threads.run_until_idle()
    got = lines(ex) if stream else [ex.json()]
    calls = [c for g in got for c in (g.get("message") or {}).get("tool_calls") or []]
    assert len(calls) == 1
    (call,) = calls
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
    assert call["id"].startswith("call_")
    assert got[-1]["done_reason"] == "stop"
    if stream:
        # The call's chunk carries no text; the text before it went out as text.
        (chunk,) = [g for g in got if g["message"].get("tool_calls")]
        assert chunk["message"]["content"] == "" and chunk["done"] is False


def test_tool_results_are_paired_with_their_calls_by_tool_name() -> None:
    rig = make_rig(["It is sunny."])
    messages = [
        {"role": "user", "content": "weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_time", "arguments": {}}},
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
    ]
    ex = rig.http.post(
        "/api/chat", {"model": "scripted", "messages": messages, "tools": [TOOL], "stream": False}
    )
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    sent = ChatRequest.model_validate({"model": "m", "messages": messages}).template_messages()
    calls = sent[1]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ["{}", '{"city": "Paris"}']
    by_id = {c["id"]: c["function"]["name"] for c in calls}
    assert by_id[sent[2]["tool_call_id"]] == "get_weather" and sent[2]["name"] == "get_weather"
    assert by_id[sent[3]["tool_call_id"]] == "get_time"


def test_a_message_with_images_is_refused_until_vision_exists() -> None:
    rig = make_rig()
    ex = rig.http.post(
        "/api/chat",
        {
            "model": "scripted",
            "messages": [{"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}],
        },
    )
    assert ex.status == 400 and "images" in ex.json()["error"] and rig.engine.calls == []


# -- /api/generate ---------------------------------------------------------------------


def test_generate_runs_the_prompt_through_the_template_with_its_system() -> None:
    rig = make_rig(["Hi!"])
    ex = generate(rig, "hello there", system="Be brief.", stream=False)
    rig.threads.run_until_idle()
    body = ex.json()
    GenerateResponse.model_validate(body)
    assert body["response"] == "Hi!" and body["done"] is True
    text = prompt_text(rig)
    assert "Be brief." in text and "hello there" in text and "<|im_start|>" in text


def test_raw_generate_sends_the_prompt_as_it_is() -> None:
    rig = make_rig(["!"])
    ex = generate(rig, "Once upon a time", raw=True)
    rig.threads.run_until_idle()
    assert "".join(g["response"] for g in lines(ex, "generate")) == "!"
    assert prompt_text(rig).endswith("Once upon a time") and "<|im_start|>" not in prompt_text(rig)


@pytest.mark.parametrize(
    ("field", "value"),
    [("suffix", "return x"), ("template", "{{ .Prompt }}"), ("context", [1, 2]), ("images", ["x"])],
)
def test_generate_refuses_what_it_cannot_honour(field: str, value: Any) -> None:
    rig = make_rig()
    ex = generate(rig, **{field: value})
    assert ex.status == 400 and field in ex.json()["error"] and rig.engine.calls == []


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model is required"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"model": "m", "messages": [], "options": {"temperature": -1}}, "temperature"),
        ({"model": "m", "messages": [], "keep_alive": "forever"}, "keep_alive"),
    ],
)
def test_bad_requests_are_400s_in_ollama_shape(payload: dict[str, Any], words: str) -> None:
    rig = make_rig()
    ex = rig.http.post("/api/chat", payload)
    assert ex.status == 400 and set(ex.json()) == {"error"}
    assert words in ex.json()["error"]


def test_not_json_is_a_400_in_ollama_shape() -> None:
    rig = make_rig()
    ex = rig.http.post("/api/chat", b"{nope")
    assert ex.status == 400 and set(ex.json()) == {"error"}


def test_a_path_under_api_that_does_not_exist_is_a_404_in_ollama_shape() -> None:
    rig = make_rig()
    ex = rig.http.get("/api/nothing-here")
    assert ex.status == 404 and set(ex.json()) == {"error"}


@pytest.mark.logs_engine_errors
def test_an_engine_failure_mid_stream_is_a_last_error_line() -> None:
    rig = make_rig(["a b c"])
    fail_every_step(rig)
    ex = chat(rig)
    rig.threads.run_until_idle()
    got = lines(ex)
    assert got[-1] == {"error": "generation failed: the GPU caught fire"}
    assert not any(g.get("done") for g in got)


# -- keep_alive and durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("0", 0.0),
        (0, 0.0),
        (30, 30.0),
        ("-1", None),
        (-1, None),
        ("-1m", None),
    ],
)
def test_keep_alive_reads_ollama_durations(value: Any, seconds: float | None) -> None:
    assert _duration(value) == seconds


# -- load, unload and keep_alive on a fleet -----------------------------------------------


def fleet(on_demand: bool = True) -> tuple[Server, HTTPHarness, SteppedThreads, Clock]:
    threads = SteppedThreads()
    clock = Clock()
    engine = ScriptedEngine(("Reply.",), model_id="a", load_steps=2, tps=0)
    if on_demand:
        server = Server(
            models=[Model(engine, name="a"), Model(ScriptedEngine(("B.",), model_id="b"))],
            config=ServerConfig(keepalive=2.0),
            clock=clock,
            threads=threads,
        )
    else:
        server = Server(engine, ServerConfig(keepalive=2.0), clock=clock, threads=threads)
    server.startService()
    return server, HTTPHarness(server.resource(), clock), threads, clock


def settle(threads: SteppedThreads) -> None:
    for _ in range(100):
        if threads.called:
            threads.release_calls()
        elif threads.busy:
            threads.run_until_idle()
        else:
            return


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
def test_a_request_with_nothing_to_say_loads_the_model(route: str) -> None:
    server, http, threads, _ = fleet()
    threads.hold_calls = True
    runner = server.fleet.models["a"].runner
    ex = http.post(route, {"model": "a"})
    assert runner.state.value == "loading" and not ex.finished
    settle(threads)
    assert runner.state.value == "ready"
    body = ex.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["model"] == "a"
    # Loaded: the next one answers at once.
    assert http.post(route, {"model": "a"}).json()["done_reason"] == "load"


def test_keep_alive_zero_unloads_the_model() -> None:
    server, http, threads, _ = fleet()
    http.post("/api/chat", {"model": "a"})
    settle(threads)
    model = server.fleet.models["a"]
    ex = http.post("/api/chat", {"model": "a", "keep_alive": 0})
    settle(threads)
    assert ex.json()["done_reason"] == "unload" and model.runner.state.value == "unloaded"
    assert model.unloads == {"requested": 1}


def test_keep_alive_zero_on_a_busy_model_unloads_it_once_idle() -> None:
    server, http, threads, _ = fleet()
    turn = http.post("/api/chat", {"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    settle_calls(threads)
    assert server.fleet.models["a"].runner.state.value == "ready"
    threads.step()
    ex = http.post("/api/chat", {"model": "a", "keep_alive": 0})
    assert ex.json()["done_reason"] == "unload"
    assert server.fleet.models["a"].runner.state.value == "ready"  # still running the turn
    settle(threads)
    assert turn.finished and text_of(lines(turn)) == "Reply."
    assert server.fleet.models["a"].runner.state.value == "unloaded"


def settle_calls(threads: SteppedThreads) -> None:
    while threads.called:
        threads.release_calls()


def test_a_turns_keep_alive_sets_when_the_idle_model_unloads() -> None:
    server, http, threads, clock = fleet()
    ex = http.post(
        "/api/chat",
        {"model": "a", "keep_alive": "30s", "messages": [{"role": "user", "content": "hi"}]},
    )
    settle(threads)
    assert ex.finished
    runner = server.fleet.models["a"].runner
    clock.advance(29)
    assert runner.state.value == "ready"
    clock.advance(2)
    settle(threads)
    assert runner.state.value == "unloaded"
    assert server.fleet.models["a"].unloads == {"idle": 1}


def test_a_server_with_one_preloaded_model_does_not_unload_it() -> None:
    server, http, threads, _ = fleet(on_demand=False)
    settle(threads)
    ex = http.post("/api/chat", {"model": "x", "keep_alive": 0})
    assert ex.status == 400 and "keeps its model loaded" in ex.json()["error"]
    assert server.worker.state.value == "ready"
    assert http.post("/api/chat", {"model": "x"}).json()["done_reason"] == "load"


def test_a_model_that_is_not_served_is_a_404_in_ollamas_words() -> None:
    _, http, _, _ = fleet()
    ex = http.post("/api/chat", {"model": "llama3", "messages": []})
    assert ex.status == 404 and ex.json() == {"error": "model 'llama3' not found"}


def test_a_client_that_leaves_a_load_request_stops_the_load() -> None:
    server, http, threads, _ = fleet()
    threads.hold_calls = True
    ex = http.post("/api/chat", {"model": "a"})
    runner = server.fleet.models["a"].runner
    assert runner.state.value == "loading"
    ex.disconnect()
    assert runner.idle
    settle(threads)
    assert runner.state.value == "unloaded"


def test_a_name_with_ollamas_latest_tag_is_the_untagged_model() -> None:
    server, http, threads, _ = fleet()
    ex = http.post(
        "/api/chat", {"model": "a:latest", "messages": [{"role": "user", "content": "hi"}]}
    )
    settle(threads)
    got = lines(ex)
    assert text_of(got) == "Reply." and got[0]["model"] == "a:latest"
    assert server.fleet.find("b:latest") is server.fleet.models["b"]
    missing = http.post("/api/chat", {"model": "c:latest", "messages": []})
    assert missing.status == 404 and missing.json() == {"error": "model 'c:latest' not found"}


def test_a_turn_with_keep_alive_zero_unloads_the_model_when_it_is_done() -> None:
    server, http, threads, _ = fleet()
    ex = http.post(
        "/api/chat",
        {"model": "a", "keep_alive": 0, "messages": [{"role": "user", "content": "hi"}]},
    )
    settle(threads)
    assert text_of(lines(ex)) == "Reply."
    model = server.fleet.models["a"]
    assert model.runner.state.value == "unloaded" and model.unloads == {"requested": 1}
