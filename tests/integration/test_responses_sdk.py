"""
The official openai SDK's Responses API (C{client.responses}) against
`twistd -n ds4tw` on the demo model: streaming (raw events, and the SDK's
own C{responses.stream()} accumulator, which checks event order and item
identity), non-streaming, a max_output_tokens stop, and refused features
surfacing as the SDK's C{BadRequestError}.

Caveat: the demo model does not think, so reasoning items are covered by
the scripted-engine tests (tests/unit/test_responses.py) only.
"""

from __future__ import annotations

import openai
import pytest

from .conftest import Twistd

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


def test_hosted_tools_and_stored_responses_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model="demo", input="Search the web.", tools=[{"type": "web_search"}]
        )
    assert e.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="hi", store=True)
    assert "stored responses are not supported" in e.value.message


def test_context_overflow_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="word " * 5000, max_output_tokens=5)
    assert e.value.code == "context_length_exceeded"
    assert "4096" in e.value.message
