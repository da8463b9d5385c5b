"""The official openai SDK against `twistd -n ds4tw` on the demo model."""

from __future__ import annotations

import openai
import pytest

from .conftest import Twistd


@pytest.fixture
def client(twistd: Twistd) -> openai.OpenAI:
    twistd.wait_idle()
    return openai.OpenAI(base_url=twistd.url + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="The sky is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(
        model="demo", prompt="The sky is", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in streamed)
    # Greedy decoding of the same prompt gives the same text, streamed or not.
    assert text == r.choices[0].text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample() -> str | None:
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Write a short poem about tea."}],
            max_tokens=24,
            temperature=1.0,
            seed=1234,
        )
        return r.choices[0].message.content

    assert sample() == sample()


def test_stop_sequence_is_not_sent(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="demo", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert " 7" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_context_overflow_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=5
        )
    assert e.value.code == "context_length_exceeded"
    assert "4096" in e.value.message


def test_bad_request_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[], max_tokens=5)
    assert e.value.body["param"] == "messages"  # type: ignore[index]
