"""
The official anthropic SDK against `twistd -n ds4tw` on the demo model
(messages.create, messages.stream, count_tokens, error types), plus the
raw SSE bytes of /v1/messages over a real socket: message_start first,
`event: ping` keepalives with --anthropic-ping, and a hang-up that frees
the worker.

The demo model (SmolLM2, ChatML) does not think, so thinking blocks are
covered by tests/unit/test_anthropic.py on the scripted engine; here a
thinking request is only shown to be accepted. Greedy decoding
(temperature 0, see GREEDY) makes the streamed and non-streamed answers comparable.

Tool use runs the documented fallback (the demo template has no tool
support: tools in the system message, Hermes `<tool_call>` syntax) under
the real sampler's grammar: a forced call's input must validate against
the tool's input_schema even from a 135M model. What the model says in
its final answer is not asserted; that the agent loop completes, in the
right shapes, is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from jsonschema import validate

from .conftest import WEATHER_SCHEMA, Twistd, sse_lines, start_twistd, stop_twistd, unique_words

# This SDK version no longer has sampling arguments (newer Claude models
# dropped them); older SDKs and other clients still send them, and the
# server honours them, so they go in the body.
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER: Any = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": WEATHER_SCHEMA,
}
TIME: Any = {
    "name": "get_time",
    "description": "Get the current time in a time zone.",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}},
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris right now?"}]
FORCED: Any = {"type": "tool", "name": "get_weather"}


@pytest.fixture
def client(twistd: Twistd) -> anthropic.Anthropic:
    twistd.wait_idle()
    return anthropic.Anthropic(base_url=twistd.url, api_key="unused", max_retries=0)


def test_create(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="demo", max_tokens=24, extra_body=GREEDY, messages=QUESTION)
    assert isinstance(m, anthropic.types.Message)
    assert m.id.startswith("msg_") and m.role == "assistant" and m.model == "demo"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 24


def test_stream_agrees_with_create(client: anthropic.Anthropic) -> None:
    kw = {"model": "demo", "max_tokens": 16, "extra_body": GREEDY, "system": "Be helpful."}
    messages = [{"role": "user", "content": "Name three colours."}]
    with client.messages.stream(messages=messages, **kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed and final.content[-1].type == "text"
    assert final.content[-1].text == streamed
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 16
    again = client.messages.create(messages=messages, **kw)
    assert again.content[-1].type == "text" and again.content[-1].text == streamed


def test_client_stop_sequence(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=QUESTION)
    text = full.content[-1].text  # type: ignore[union-attr]
    assert len(text) > 12, text
    stop = text[len(text) // 2 :][:3]
    cut = client.messages.create(
        model="demo", max_tokens=30, extra_body=GREEDY, messages=QUESTION, stop_sequences=[stop]
    )
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[-1].text == text[: text.find(stop)]  # type: ignore[union-attr]


def test_thinking_is_accepted_by_a_model_that_does_not_think(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="demo",
        max_tokens=8,
        extra_body=GREEDY,
        messages=QUESTION,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert m.content[-1].type == "text"


def test_count_tokens_matches_the_message_input(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="demo", system="Be brief.", messages=QUESTION)
    m = client.messages.create(
        model="demo", max_tokens=2, extra_body=GREEDY, system="Be brief.", messages=QUESTION
    )
    # Anthropic splits input into fresh and cache-read tokens; their sum is the prompt.
    assert counted.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_image_block_is_a_bad_request(client: anthropic.Anthropic) -> None:
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="demo",
            max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "image", "source": image}]}],
        )
    assert e.value.status_code == 400
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "'image'" in e.value.message


def test_context_overflow_is_a_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="demo", max_tokens=5, messages=[{"role": "user", "content": "word " * 5000}]
        )
    # Anthropic's wording, which Claude Code matches (the demo's context is 4096).
    assert re.search(r"prompt is too long: \d+ tokens > 4095 maximum", e.value.message)


def test_anthropic_tool_types(client: anthropic.Anthropic) -> None:
    # A server tool (Anthropic runs it) is left out and the rest served...
    web = {"type": "web_search_20250305", "name": "web_search"}
    m = client.messages.create(
        model="demo", max_tokens=5, messages=QUESTION, tools=[WEATHER, web]
    )  # fmt: skip
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # ...but cannot be forced; a client tool of Anthropic's own schema is refused.
    with pytest.raises(anthropic.BadRequestError, match="server tools") as e:
        client.messages.create(
            model="demo", max_tokens=5, messages=QUESTION, tools=[WEATHER, web],
            tool_choice={"type": "tool", "name": "web_search"},
        )  # fmt: skip
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    bash = {"type": "bash_20250124", "name": "bash"}
    with pytest.raises(anthropic.BadRequestError, match="bash_20250124") as e:
        client.messages.create(
            model="demo", max_tokens=5, messages=QUESTION, tools=[WEATHER, bash]
        )  # fmt: skip
    assert "tools.1.type" in e.value.message


def test_forced_tool_call_validates_against_the_schema(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="demo", max_tokens=120, extra_body=GREEDY, messages=ASK,
        tools=[WEATHER, TIME], tool_choice=FORCED,
    )  # fmt: skip
    assert m.stop_reason == "tool_use"
    calls = [b for b in m.content if b.type == "tool_use"]
    assert calls, "a forced call always comes"
    # Parallel calls are allowed: each must validate. No text beside a forced call.
    assert [b.type for b in m.content] == ["tool_use"] * len(calls)
    for call in calls:
        assert call.name == "get_weather" and call.id.startswith("toolu_")
        validate(call.input, WEATHER_SCHEMA)


def test_forced_tool_call_streams_its_input_live(client: anthropic.Anthropic) -> None:
    fragments: list[str] = []
    kinds: list[str] = []
    with client.messages.stream(
        model="demo", max_tokens=120, extra_body=GREEDY, messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={**FORCED, "disable_parallel_tool_use": True},
    ) as s:  # fmt: skip
        for event in s:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments.append(event.delta.partial_json)
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert len(fragments) > 1, "the input arrives in pieces, as it is decoded"
    assert json.loads("".join(fragments)) == call.input
    validate(call.input, WEATHER_SCHEMA)
    assert "text" not in kinds


def test_agent_loop(client: anthropic.Anthropic) -> None:
    messages: list[Any] = list(ASK)
    first = client.messages.create(
        model="demo", max_tokens=120, extra_body=GREEDY, messages=messages,
        tools=[WEATHER], tool_choice={"type": "any"},
    )  # fmt: skip
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert calls
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    results = []
    for call in calls:  # the test runs the tool
        args: Any = call.input
        result = {"city": args["city"], "temperature": 18, "unit": args["unit"]}
        results.append(
            {"type": "tool_result", "tool_use_id": call.id, "content": json.dumps(result)}
        )
    messages.append({"role": "user", "content": results})
    counted = client.messages.count_tokens(model="demo", messages=messages, tools=[WEATHER])
    final = client.messages.create(
        model="demo", max_tokens=40, extra_body=GREEDY, messages=messages,
        tools=[WEATHER], tool_choice={"type": "none"},
    )  # fmt: skip
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text  # type: ignore[union-attr]
    # tool_choice none leaves the tools out of the prompt: fewer tokens.
    prompt = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert 0 < prompt < counted.input_tokens


def test_structured_output(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    m = client.messages.create(
        model="demo", max_tokens=60, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Tell me about France as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )  # fmt: skip
    assert m.content[0].type == "text"
    if m.stop_reason == "end_turn":
        validate(json.loads(m.content[0].text), schema)
    else:  # cut by max_tokens: still the start of an object
        assert m.content[0].text.lstrip().startswith("{")


def test_raw_stream_starts_with_message_start_and_ends_with_message_stop(twistd: Twistd) -> None:
    twistd.wait_idle()
    payload = {"model": "demo", "max_tokens": 8, "stream": True, "messages": QUESTION}
    lines = [line for _, line in sse_lines(twistd.url + "/v1/messages", payload)]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == events


def test_hang_up_mid_stream_frees_the_worker(twistd: Twistd) -> None:
    twistd.wait_idle()
    before = twistd.metric("ds4tw_jobs_total", outcome="cancelled")
    payload = {
        "model": "demo",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
    }
    lines = sse_lines(
        twistd.url + "/v1/messages",
        payload,
        stop_after=lambda ls: sum("text_delta" in line for _, line in ls) >= 5,
    )
    assert sum("text_delta" in line for _, line in lines) == 5
    twistd.wait_idle(timeout=10)
    assert twistd.metric("ds4tw_jobs_total", outcome="cancelled") == before + 1


@pytest.fixture(scope="module")
def pinging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    server = start_twistd(
        tmp_path_factory.mktemp("twistd-ping"), "--keepalive", "1", "--anthropic-ping"
    )
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def test_anthropic_ping_keeps_a_long_prefill_alive(pinging: Twistd) -> None:
    payload = {
        "model": "demo",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": unique_words(1500, seed=7)}],
    }
    t0 = time.monotonic()
    lines = sse_lines(
        pinging.url + "/v1/messages",
        payload,
        stop_after=lambda ls: sum(line == 'data: {"type": "ping"}' for _, line in ls) >= 2,
    )
    kinds = [line for _, line in lines]
    assert kinds[:2] == ["event: message_start", kinds[1]] and kinds[1].startswith("data: ")
    assert kinds[2:] == ["event: ping", 'data: {"type": "ping"}'] * 2
    assert not any(k.startswith(":") for k in kinds)
    assert time.monotonic() - t0 < 10
    pinging.wait_idle(timeout=10)
    assert pinging.metric("ds4tw_cancelled_jobs_total", stage="prefill") == 1
