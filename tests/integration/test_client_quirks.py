"""
The small things a client trips on, against a real `twistd -n ds4tw` on
the scripted engine (the server's own HTTP stack; no model needed): a base
URL that ends in a slash, and the chat stream's first chunk (the role
chunk) as llama.cpp's test client and the openai SDK read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from .conftest import Twistd, start_twistd, stop_twistd

REPLY = "Hello from the scripted engine, friend."
#: A Hermes tool call (ChatML, the scripted engine's template): a turn that
#: is only a tool call, no text.
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    server = start_twistd(
        tmp_path_factory.mktemp("quirks"), "--model", f"scripted:tps=0,reply={REPLY}"
    )
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """A server whose every reply is a tool call."""
    server = start_twistd(tmp_path_factory.mktemp("caller"), "--model", f"scripted:reply={CALL}")
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def client(server: Twistd) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# -- a base URL that ends in a slash ---------------------------------------------


def test_the_openai_sdk_with_a_base_url_ending_in_a_slash(server: Twistd) -> None:
    """
    The SDK itself joins C{/v1/} and C{/chat/completions} with one slash
    (this passes without the server's collapsing too); it pins that such a
    base URL keeps working, streaming and not.
    """
    sdk = openai.OpenAI(base_url=server.url + "/v1/", api_key="unused", max_retries=0)
    assert [m.id for m in sdk.models.list().data] == ["scripted"]
    stream = sdk.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/completions"), ("POST", "/messages"), ("GET", "/models")],
)
def test_a_client_that_joins_base_url_and_path_as_strings(
    server: Twistd, method: str, path: str
) -> None:
    """
    C{base + "/chat/completions"} with C{base} ending in a slash asks for
    C{/v1//chat/completions}: served as the path it means, the body
    intact, with no redirect (a 500 before).
    """
    base = server.url + "/v1/"
    payload = {"model": "any", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.request(method, base + path, json=payload if method == "POST" else None)
    assert r.status_code == 200, r.text
    assert not r.history  # not redirected
    if path == "/chat/completions":
        assert r.json()["choices"][0]["message"]["content"] == REPLY
    elif path == "/messages":
        assert r.json()["content"][0]["text"] == REPLY
    else:
        assert r.json()["data"][0]["id"] == "scripted"
    page = httpx.get(server.url + "/ui//app.js")
    assert page.status_code == 200 and "javascript" in page.headers["content-type"]


# -- the role chunk --------------------------------------------------------------


def llama_cpp_reads(server: Twistd, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The stream's chunks, checked as llama.cpp's server tests read a stream
    (tools/server/tests/utils.py, make_any_request): a delta's content or
    reasoning_content, when present and not null, must not be empty. Its
    7 streamed cases failed against ds4tw on the role chunk's C{"content": ""}.
    """
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=payload) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                for key in ("content", "reasoning_content"):
                    if choice["delta"].get(key) is not None:
                        assert len(choice["delta"][key]) > 0, f"Expected non empty {key} delta!"
            chunks.append(chunk)
    return chunks


def test_the_role_chunk_passes_llama_cpps_test_client(server: Twistd, caller: Twistd) -> None:
    chat = {"model": "any", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    chunks = llama_cpp_reads(server, chat)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    called = llama_cpp_reads(caller, {**chat, "tools": [WEATHER]})
    assert called[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert not any("content" in c["choices"][0]["delta"] for c in called if c["choices"])


def test_the_openai_sdk_reads_the_role_chunk(server: Twistd, caller: Twistd) -> None:
    """Chunk by chunk, and through the .stream() helper's accumulator and events."""
    messages: Any = [{"role": "user", "content": "hi"}]
    chunks = list(
        client(server).chat.completions.create(model="any", messages=messages, stream=True)
    )
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY

    with client(server).chat.completions.stream(model="any", messages=messages) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e.delta for e in events if e.type == "content.delta"]
    assert "".join(deltas) == REPLY and all(deltas)
    assert [e.content for e in events if e.type == "content.done"] == [REPLY]
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == REPLY

    # A turn that is only a tool call: no text, as the SDK's own
    # non-streaming shape says (content None, not "").
    with client(caller).chat.completions.stream(
        model="any", messages=messages, tools=[WEATHER]
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert not [e for e in events if e.type in ("content.delta", "content.done")]
    message = final.choices[0].message
    assert message.content is None and message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"
