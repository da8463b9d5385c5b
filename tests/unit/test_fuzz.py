"""
Property-based fuzzing of every POST route on the scripted engine: arbitrary
bytes, arbitrary JSON objects (with the request model's own field names as
likely keys), and valid requests with random mutations (a value replaced, a
key dropped or added, the text truncated), under any content type.
Whatever comes in: no 5xx, every error in the route's dialect shape, every
response complete, and the server still answers a valid request afterwards.

One test per route (hypothesis inside C{@pytest.mark.parametrize} trips
pytest-twisted). C{DS4TW_FUZZ_EXAMPLES} sets the examples per route (100
by default; run with thousands locally after touching a schema).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ds4tw._api.anthropic.schema import CountTokensRequest, MessagesRequest
from ds4tw._api.openai.schema import ChatCompletionRequest, CompletionRequest
from ds4tw._api.responses.schema import ResponsesRequest

from .conftest import Rig, make_rig

CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    # Not multipart/form-data: twisted.web parses such a body before any
    # resource runs, and answers a malformed one with its own plain 400.
    "",
]
EXAMPLES = int(os.environ.get("DS4TW_FUZZ_EXAMPLES", "100"))

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]

VALID: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [
        {"model": "scripted", "messages": USER, "max_tokens": 8},
        {"model": "scripted", "messages": USER, "max_tokens": 8, "stream": True,
         "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, *USER], "max_tokens": 8,
         "tools": [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}],
         "tool_choice": "auto", "temperature": 0.5, "stop": ["\n\n"]},
        {"messages": USER, "max_completion_tokens": 8,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "w", "schema": SCHEMA}}},
    ],
    "/v1/completions": [
        {"model": "scripted", "prompt": "Once upon a time", "max_tokens": 8},
        {"prompt": [1, 2, 3], "max_tokens": 4, "stream": True, "logprobs": 2, "echo": False},
    ],
    "/v1/responses": [
        {"model": "scripted", "input": "hi", "max_output_tokens": 8},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
         "instructions": "Be brief.", "stream": True, "max_output_tokens": 8,
         "tools": [{"type": "function", "name": "weather", "parameters": SCHEMA}]},
        {"input": "hi", "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
         "max_output_tokens": 8, "reasoning": {"effort": "low"}},
    ],
    "/v1/messages": [
        {"model": "claude", "max_tokens": 8, "messages": USER},
        {"model": "claude", "max_tokens": 8, "system": "Be brief.", "stream": True,
         "messages": [*USER, {"role": "assistant", "content": "It is"}],
         "stop_sequences": ["\n"], "thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"model": "claude", "max_tokens": 8, "messages": USER,
         "tools": [{"name": "weather", "input_schema": SCHEMA}], "tool_choice": {"type": "any"}},
    ],
    "/v1/messages/count_tokens": [
        {"model": "claude", "messages": USER},
        {"model": "claude", "system": [{"type": "text", "text": "Be brief."}], "messages": USER,
         "tools": [{"name": "weather", "input_schema": SCHEMA}]},
    ],
}  # fmt: skip

MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
}


def field_names(model: type[BaseModel]) -> list[str]:
    """Every property name anywhere in the model's JSON schema (likely keys)."""
    names: set[str] = set()
    stack: list[Any] = [model.model_json_schema()]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                names.update(props)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(names)


def json_values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
        | st.sampled_from(["user", "assistant", "system", "tool", "function", "text", "auto"])
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def mutated(draw: st.DrawFn, path: str, keys: st.SearchStrategy[str]) -> bytes:
    """A valid request of C{path} with one to three random mutations."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(VALID[path])))
    values = json_values(keys)
    for _ in range(draw(st.integers(1, 3))):
        # Walk down to a random container.
        node = doc
        while True:
            children = [v for v in (node.values() if isinstance(node, dict) else node)]
            nested = [c for c in children if isinstance(c, dict | list) and c]
            if not nested or draw(st.booleans()):
                break
            node = draw(st.sampled_from(nested))
        if isinstance(node, dict):
            action = draw(st.sampled_from(["replace", "drop", "add"]))
            if action == "add" or not node:
                node[draw(keys)] = draw(values)
            elif action == "drop":
                del node[draw(st.sampled_from(sorted(node)))]
            else:
                node[draw(st.sampled_from(sorted(node)))] = draw(values)
        elif node:
            node[draw(st.integers(0, len(node) - 1))] = draw(values)
    text = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def bodies(path: str) -> st.SearchStrategy[bytes]:
    keys = st.sampled_from(field_names(MODELS[path])) | st.text(max_size=8)
    objects = st.dictionaries(keys, json_values(keys), max_size=6)
    return st.one_of(
        st.binary(max_size=64),
        objects.map(lambda d: json.dumps(d).encode()),
        json_values(keys).map(lambda v: json.dumps(v).encode()),
        mutated(path, keys),
    )


def check_error_shape(path: str, ex: Any) -> None:
    assert ex.header("content-type") == "application/json", ex.raw
    body = ex.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["message"], str)
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str)


def check_stream_errors(path: str, ex: Any) -> None:
    """A streamed 200 that failed mid-way says so in an error frame of its dialect."""
    for frame in ex.data():
        if isinstance(frame, dict) and (frame.get("type") == "error" or "error" in frame):
            if path.startswith("/v1/messages"):
                assert set(frame["error"]) >= {"type", "message"}, frame
            elif path == "/v1/responses":
                assert frame.get("type") in ("error", "response.failed"), frame
            else:
                assert set(frame["error"]) == {"message", "type", "param", "code"}, frame


def fuzz(path: str) -> None:
    rig = make_rig(["Hello there friend."])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies(path), content_type=st.sampled_from(CONTENT_TYPES))
    def one(body: bytes, content_type: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        ex = rig.http.request("POST", path, body, headers)
        rig.threads.run_until_idle()
        assert ex.finished, (body, ex.raw)
        assert 200 <= ex.status < 500, (body, ex.raw)
        if ex.status >= 400:
            check_error_shape(path, ex)
        elif (ex.header("content-type") or "").startswith("text/event-stream"):
            check_stream_errors(path, ex)
        else:
            ex.json()
        assert rig.server.worker.queue_depth == 0 and not rig.server.worker.busy

    one()
    still_serving(rig, path)


def still_serving(rig: Rig, path: str) -> None:
    ex = rig.http.post(path, VALID[path][0])
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.raw
    assert rig.http.get("/health").status == 200


def test_fuzz_chat_completions() -> None:
    fuzz("/v1/chat/completions")


def test_fuzz_completions() -> None:
    fuzz("/v1/completions")


def test_fuzz_responses() -> None:
    fuzz("/v1/responses")


def test_fuzz_messages() -> None:
    fuzz("/v1/messages")


def test_fuzz_count_tokens() -> None:
    fuzz("/v1/messages/count_tokens")


def test_the_valid_requests_are_valid() -> None:
    """The mutations start from requests that succeed."""
    rig = make_rig(["Hello there friend."])
    for path, requests in VALID.items():
        for payload in requests:
            ex = rig.http.post(path, payload)
            rig.threads.run_until_idle()
            assert ex.status == 200, (path, payload, ex.raw)
