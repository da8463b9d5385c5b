"""
The official openai SDK's Responses API (C{client.responses}) against
`twistd -n ds4tw` on the demo model: streaming (raw events, and the SDK's
own C{responses.stream()} accumulator, which checks event order and item
identity), non-streaming, a max_output_tokens stop, and refused features
surfacing as the SDK's C{BadRequestError}. Then tools, structured output
and logprobs: a forced function call (streamed and not) whose arguments
validate against the tool's schema, a whole agent loop (call, the test
runs the tool, function_call_output, final answer), C{text.format} through
the SDK's C{responses.parse(text_format=...)}, and logprobs via C{include}.

The demo model's template has no tool support, so tools run the
documented fallback (Hermes C{<tool_call>} syntax) under the real
sampler's grammar. What the 135M model says in its answers is not
asserted; that the shapes are right and the loop completes is.

Caveat: the demo model does not think, so reasoning items are covered by
the scripted-engine tests (tests/unit/test_responses.py) only.
"""

from __future__ import annotations

import json
import math
from typing import Any

import openai
import pytest
from jsonschema import validate
from openai.types.responses import ResponseOutputMessage, ResponseOutputText
from pydantic import BaseModel

from .conftest import WEATHER_SCHEMA, Twistd

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture
def client(twistd: Twistd) -> openai.OpenAI:
    twistd.wait_idle()
    return openai.OpenAI(base_url=twistd.url + "/v1", api_key="unused", max_retries=0)


def test_non_streaming(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo",
        instructions="You are a helpful assistant.",
        input="What is the capital of France?",
        max_output_tokens=32,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    assert r.output_text
    assert [item.type for item in r.output] == ["message"]
    assert r.usage is not None and 0 < r.usage.output_tokens <= 32
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "You are a helpful assistant."


def test_streaming_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model="demo",
        input=[{"role": "user", "content": "Count from one to ten."}],
        max_output_tokens=20,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas and final.output_text == deltas
    assert final.id == events[0].response.id  # type: ignore[union-attr]


def test_sdk_stream_helper_accumulates_the_response(client: openai.OpenAI) -> None:
    """The SDK's accumulator raises on any out-of-order or mismatched event."""
    with client.responses.stream(
        model="demo",
        input="Say hello.",
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == deltas != ""


def test_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo",
        input="Write a long story about a dragon.",
        max_output_tokens=5,
        temperature=0,
    )
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 5
    streamed = client.responses.create(
        model="demo",
        input="Write a long story about a dragon.",
        max_output_tokens=5,
        temperature=0,
        stream=True,
    )
    last = list(streamed)[-1]
    assert last.type == "response.incomplete"
    # Greedy decoding of the same prompt gives the same text, streamed or not.
    assert last.response.output_text == r.output_text


def test_previous_response_id_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model="demo", input="And then?", previous_response_id="resp_123", max_output_tokens=5
        )
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "stores no responses" in e.value.message


def test_hosted_tools_are_left_out_and_stored_responses_refused(client: openai.OpenAI) -> None:
    # Codex sends web_search by default: served without it, echoed as sent.
    r = client.responses.create(
        model="demo", input="Search the web.", tools=[{"type": "web_search"}], max_output_tokens=4
    )
    assert r.status in ("completed", "incomplete") and [t.type for t in r.tools] == ["web_search"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model="demo",
            input="Search the web.",
            tools=[{"type": "web_search"}],
            tool_choice={"type": "web_search"},  # type: ignore[typeddict-item]
        )
    assert e.value.body["param"] == "tool_choice.type"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="hi", store=True)
    assert "stored responses are not supported" in e.value.message


def test_context_overflow_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="word " * 5000, max_output_tokens=5)
    assert e.value.code == "context_length_exceeded"
    assert "4096" in e.value.message


# -- tools, structured output, logprobs -----------------------------------------

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": WEATHER_SCHEMA,
    "strict": True,
}
TIME: Any = {
    "type": "function",
    "name": "get_time",
    "description": "Get the current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
}
ASK = "What is the weather in Paris right now?"
FORCED: Any = {"type": "function", "name": "get_weather"}


def test_forced_function_call_validates_against_the_schema(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo", input=ASK, tools=[WEATHER, TIME], tool_choice=FORCED,
        max_output_tokens=120, temperature=0,
    )  # fmt: skip
    assert r.status == "completed"
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls, "a forced call always comes"
    for call in calls:  # parallel calls are allowed: each must validate
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        assert call.status == "completed"
        validate(json.loads(call.arguments), WEATHER_SCHEMA)
    assert r.tool_choice.type == "function"  # type: ignore[union-attr]
    assert [t.name for t in r.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]


def test_forced_function_call_streams_through_the_sdk_accumulator(
    client: openai.OpenAI,
) -> None:
    with client.responses.stream(
        model="demo", input=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=120, temperature=0,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == deltas
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].arguments == deltas
    validate(json.loads(deltas), WEATHER_SCHEMA)
    assert kinds[-1] == "response.completed"


def test_agent_loop(client: openai.OpenAI) -> None:
    """Call, run the tool, send its output back, get a final text answer."""
    history: list[Any] = [{"role": "user", "content": ASK}]
    first = client.responses.create(
        model="demo", input=history, tools=[WEATHER], tool_choice=FORCED,
        parallel_tool_calls=False, max_output_tokens=120, temperature=0,
    )  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    args = json.loads(call.arguments)
    validate(args, WEATHER_SCHEMA)
    result = json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"]})
    # The stateless pattern: the previous output goes back as input.
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
    with client.responses.stream(
        model="demo", input=history, tools=[WEATHER], tool_choice="none",
        max_output_tokens=60, temperature=0,
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [item.type for item in final.output] == ["message"]
    assert final.output_text


class Capital(BaseModel):
    country: str
    capital: str


def test_structured_output_with_the_sdks_parse_helper(client: openai.OpenAI) -> None:
    r = client.responses.parse(
        model="demo",
        input="Give the capital of France as JSON.",
        text_format=Capital,
        max_output_tokens=80,
        temperature=0,
    )
    assert r.status == "completed"
    parsed = r.output_parsed
    assert isinstance(parsed, Capital)
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"


def text_part(r: Any) -> ResponseOutputText:
    message = r.output[0]
    assert isinstance(message, ResponseOutputMessage)
    part = message.content[0]
    assert isinstance(part, ResponseOutputText)
    return part


def test_logprobs_via_include(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo", input="Say hello.", include=["message.output_text.logprobs"],
        top_logprobs=3, max_output_tokens=12, temperature=0,
    )  # fmt: skip
    part = text_part(r)
    assert part.logprobs
    for lp in part.logprobs:
        assert lp.logprob <= 0 and math.isfinite(lp.logprob)
        tops = [t.logprob for t in lp.top_logprobs]
        assert 1 <= len(tops) <= 3 and tops == sorted(tops, reverse=True)
        assert all(t <= 0 for t in tops)
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert r.top_logprobs == 3
    stream = client.responses.create(
        model="demo", input="Say hello.", include=["message.output_text.logprobs"],
        top_logprobs=3, max_output_tokens=12, temperature=0, stream=True,
    )  # fmt: skip
    streamed = [lp for e in stream if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in part.logprobs]
    plain = client.responses.create(model="demo", input="Say hello.", max_output_tokens=4)
    assert text_part(plain).logprobs == []
