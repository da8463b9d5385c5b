"""
The OpenAI dialect on the scripted engine: wire shapes, sampling
parameters reaching the engine, and every invalid request answered with
a 400 in OpenAI's shape before anything is queued. Stop sequences and
partial UTF-8 held back, and the 503 while loading, are checked for
every dialect alike in tests/unit/test_dialects.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import fail_every_step, make_rig


def test_chat_stream_shape() -> None:
    rig = make_rig(["Hello there friend."])
    ex = rig.stream(stream_options={"include_usage": True})
    rig.threads.run_until_idle()
    chunks = ex.data()
    assert chunks[-1] == "[DONE]"
    first, *middle, finish, usage, _ = chunks
    assert first["object"] == "chat.completion.chunk"
    # No content, not "" (llama.cpp's client refuses an empty content delta)
    # nor null (delta.get("content", "") would be None).
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert [c["choices"][0]["delta"]["content"] for c in middle] == ["Hello", " there", " friend."]
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["prompt_tokens"] == len(rig.engine.calls[0][0])
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert ex.finished


def test_chat_stream_without_include_usage_has_no_usage_chunk() -> None:
    rig = make_rig(["Hi."])
    ex = rig.stream()
    rig.threads.run_until_idle()
    assert all("usage" not in c for c in ex.data()[:-1])


def test_chat_non_streaming_shape() -> None:
    rig = make_rig(["Hello there."])
    ex = rig.chat()
    rig.threads.run_until_idle()
    assert ex.status == 200
    body = ex.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2


def test_max_tokens_gives_length() -> None:
    rig = make_rig(["a b c d e f"])
    ex = rig.chat(max_tokens=2)
    rig.threads.run_until_idle()
    assert ex.json()["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "a b"},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_max_completion_tokens_is_honoured() -> None:
    rig = make_rig(["a b c d e f"])
    ex = rig.chat(max_completion_tokens=3)
    rig.threads.run_until_idle()
    assert ex.json()["usage"]["completion_tokens"] == 3


def test_ignore_eos_generates_exactly_max_tokens() -> None:
    rig = make_rig(["short"])
    ex = rig.chat(max_tokens=7, ignore_eos=True)
    rig.threads.run_until_idle()
    assert ex.json()["usage"]["completion_tokens"] == 7
    assert ex.json()["choices"][0]["finish_reason"] == "length"


def test_sampling_parameters_reach_the_engine() -> None:
    rig = make_rig()
    rig.chat(
        max_tokens=9,
        temperature=0.3,
        top_p=0.5,
        top_k=7,
        min_p=0.1,
        seed=42,
        repeat_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop="zz",
    )
    rig.threads.run_until_idle()
    params = rig.engine.calls[0][1]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (9, 0.3, 0.5, 7)
    assert (params.min_p, params.seed, params.repeat_penalty) == (0.1, 42, 1.2)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert "zz" in params.stop and "<|im_end|>" in params.stop


def test_default_max_tokens_is_the_rest_of_the_context() -> None:
    rig = make_rig(n_ctx=200)
    rig.chat()
    rig.threads.run_until_idle()
    prompt, params = rig.engine.calls[0]
    assert params.max_tokens == 200 - len(prompt)


def test_completions_stream_and_non_stream() -> None:
    rig = make_rig(["Once upon", "a time"])
    ex = rig.http.post("/v1/completions", {"prompt": "Tell me", "stream": True, "max_tokens": 5})
    rig.threads.run_until_idle()
    chunks = ex.data()
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Once upon"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    ex = rig.http.post("/v1/completions", {"prompt": ["Tell me"], "max_tokens": 1})
    rig.threads.run_until_idle()
    body = ex.json()
    assert body["choices"][0]["text"] == "a"
    assert body["choices"][0]["finish_reason"] == "length"
    # Completions add BOS (the scripted engine's token 1); chat relies on the template.
    assert rig.engine.calls[1][0][0] == 1


def test_completions_default_max_tokens_is_16() -> None:
    rig = make_rig()
    rig.http.post("/v1/completions", {"prompt": "x"})
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].max_tokens == 16


def test_models() -> None:
    rig = make_rig()
    body = rig.http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["scripted"]
    assert rig.http.get("/v1/models/scripted").json()["id"] == "scripted"
    missing = rig.http.get("/v1/models/nope")
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"


BAD_REQUESTS: list[tuple[bytes | dict[str, Any], str | None, str]] = [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "empty"),
    (b"[1, 2]", None, "must be a JSON object"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
    (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
        "greater than or equal to 1",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
        "max_tokens",
        "integer",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        "temperature",
        "less than or equal to 2",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, None, "n=1"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, "stop", "at most"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content.0.type",
        "image_url",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        "tools.0.function",
        "Field required",
    ),
]


@pytest.mark.parametrize(("payload", "param", "fragment"), BAD_REQUESTS)
def test_invalid_requests_get_openai_400s_and_queue_nothing(
    payload: bytes | dict[str, Any], param: str | None, fragment: str
) -> None:
    rig = make_rig()
    ex = rig.http.post("/v1/chat/completions", payload)
    assert ex.status == 400
    error = ex.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    assert error["param"] == param
    assert rig.engine.calls == [] and not rig.threads.busy


def test_context_overflow_is_a_400_with_both_sizes() -> None:
    rig = make_rig(n_ctx=100)
    ex = rig.stream("x" * 200)
    assert ex.status == 400
    error = ex.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "100 tokens" in error["message"]
    assert (
        str(len(rig.engine.tokenize("x" * 200))) in error["message"]
        or "prompt is" in error["message"]
    )
    assert rig.engine.calls == [] and rig.server.worker.queue_depth == 0


def test_invalid_completion_requests() -> None:
    rig = make_rig()
    for payload, fragment in [
        ({}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ]:
        ex = rig.http.post("/v1/completions", payload)
        assert ex.status == 400, payload
        assert fragment in ex.json()["error"]["message"], payload
    assert rig.engine.calls == []


@pytest.mark.logs_engine_errors
def test_engine_failure_mid_stream_is_an_error_event() -> None:
    rig = make_rig(["a b c"])
    fail_every_step(rig)
    ex = rig.stream()
    rig.threads.run_until_idle()
    events = ex.events()
    # The error event, then [DONE]: a client reading to [DONE] is not left hanging.
    assert events[-2][0] == "error" and events[-1] == (None, "[DONE]")
    assert "the GPU caught fire" in events[-2][1]
    assert ex.finished
