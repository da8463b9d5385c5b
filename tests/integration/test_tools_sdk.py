"""
Tool calls, structured output and logprobs through the official openai
SDK's chat completions against `twistd -n ds4tw` on the demo model.

The demo model's template has no tool support, so these run the
documented fallback (tools in the system message, Hermes `<tool_call>`
syntax) with the real sampler's grammar: a forced call must validate
against its tool's schema even from a 135M model. What the model says in
its final answer is not asserted (it is a tiny model); that the loop
completes, in the right shapes, is.
"""

from __future__ import annotations

import json
import math
from typing import Any

import openai
import pytest
from jsonschema import validate
from pydantic import BaseModel

from .conftest import WEATHER_SCHEMA, Twistd

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris right now?"}]
FORCED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def client(twistd: Twistd) -> openai.OpenAI:
    twistd.wait_idle()
    return openai.OpenAI(base_url=twistd.url + "/v1", api_key="unused", max_retries=0)


def test_forced_call_validates_against_the_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice=FORCED,
        max_tokens=120, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls, "a forced call always comes"
    for call in calls:  # parallel calls are allowed: each must validate
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


def test_forced_call_streams_arguments_live(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, temperature=0, stream=True,
    )  # fmt: skip
    fragments: list[str] = []
    names = []
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            assert tc.index == 0
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            if tc.function and tc.function.arguments:
                fragments.append(tc.function.arguments)
        assert not delta.content, "no markup or text leaks beside a forced call"
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert len(names) == 1 and names[0] in ("get_weather", "get_time")
    assert len(fragments) > 1, "arguments arrive in pieces, as they are decoded"
    arguments = json.loads("".join(fragments))
    if names[0] == "get_weather":
        validate(arguments, WEATHER_SCHEMA)


def test_agent_loop(client: openai.OpenAI) -> None:
    messages: list[Any] = list(ASK)
    first = client.chat.completions.create(
        model="demo", messages=messages, tools=[WEATHER], tool_choice="required",
        max_tokens=120, temperature=0,
    )  # fmt: skip
    calls = first.choices[0].message.tool_calls or []
    assert calls
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    for call in calls:
        args = json.loads(call.function.arguments)  # the test runs the tool
        result = {"city": args["city"], "temperature": 18, "unit": args["unit"]}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(
        model="demo", messages=messages, tools=[WEATHER], tool_choice="none",
        max_tokens=40, temperature=0,
    )  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


class Capital(BaseModel):
    country: str
    capital: str
    population_millions: float


def test_structured_output_with_the_sdks_parse_helper(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="demo",
        messages=[{"role": "user", "content": "Tell me about France as JSON."}],
        response_format=Capital,
        max_tokens=80,
        temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Capital)


def test_json_object_mode(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert (r.choices[0].message.content or "").lstrip().startswith("{")


def test_logprobs_are_sensible(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content
    text = r.choices[0].message.content or ""
    assert "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(lp <= 0 for lp in tops)
        assert math.fsum(math.exp(lp) for lp in tops) <= 1.0 + 1e-6
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(tops[0], abs=1e-4)
