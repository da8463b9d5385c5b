"""
The Anthropic dialect (C{/v1/messages}, C{/v1/messages/count_tokens}) on
the scripted engine: golden event sequences, stop reasons, thinking
blocks on, off and omitted, count_tokens, the keepalive as
C{event: ping}, and every invalid request answered in
Anthropic's error shape before anything is queued. What every dialect
does alike (disconnects, split tags, stop sequences and UTF-8, hidden
thinking under the keepalive, 503s) is in tests/unit/test_dialects.py.

Every event and body is also validated against the official C{anthropic}
SDK's own types, so a renamed or missing field fails here, not only in
the real-socket tests.

Tool use is covered by tests/unit/test_anthropic_tools.py.

Caveat: the scripted engine's tokenizer is one token per character and
its template is ChatML; the integration tests cover a real template.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from ds4tw import AbortFlag, StepResult
from ds4tw._runtime.worker import ModelState
from ds4tw.testing import Exchange, Reply

from .conftest import Rig, make_rig

STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
BASE: dict[str, Any] = {
    "model": "claude-local",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
ENABLED = {"type": "enabled", "budget_tokens": 1024}
THINKING = Reply.of("<think>", "Two", " plus", " two", ".", "</think>", "\n\n", "It is", " 4.")
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def post(rig: Rig, path: str = "/v1/messages", **kw: Any) -> Exchange:
    return rig.http.post(path, {**BASE, **kw})


def stream(rig: Rig, **kw: Any) -> Exchange:
    return post(rig, stream=True, **kw)


def events(ex: Exchange) -> list[dict[str, Any]]:
    """The data events so far (no comments, no pings), each checked against the SDK's types."""
    out = []
    for name, data in ex.events():
        if name in ("comment", "ping"):
            continue
        payload = json.loads(data)
        assert name == payload["type"], (name, payload)
        if name != "error":
            STREAM_EVENT.validate_python(payload)
        out.append(payload)
    return out


def sequence(ex: Exchange) -> list[str]:
    """Event types, with the block or delta type where there is one."""
    out = []
    for e in events(ex):
        if e["type"] == "content_block_start":
            out.append(f"content_block_start:{e['content_block']['type']}")
        elif e["type"] == "content_block_delta":
            out.append(f"content_block_delta:{e['delta']['type']}")
        else:
            out.append(e["type"])
    return out


def streamed(ex: Exchange, kind: str) -> str:
    """All C{thinking_delta} or C{text_delta} text so far."""
    key = {"thinking_delta": "thinking", "text_delta": "text"}[kind]
    return "".join(
        e["delta"][key]
        for e in events(ex)
        if e["type"] == "content_block_delta" and e["delta"]["type"] == kind
    )


def message_delta(ex: Exchange) -> dict[str, Any]:
    (delta,) = [e for e in events(ex) if e["type"] == "message_delta"]
    return delta


def prompt_text(rig: Rig, call: int = 0) -> str:
    return "".join(chr(t) for t in rig.engine.calls[call][0])


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def body(ex: Exchange) -> dict[str, Any]:
    got: dict[str, Any] = ex.json()
    Message.model_validate(got)
    return got


# -- golden event sequences ----------------------------------------------------


def test_golden_reasoning_then_text() -> None:
    rig = make_rig([THINKING])
    ex = stream(rig, thinking=ENABLED)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:thinking",
        "content_block_delta:thinking_delta",
        "content_block_delta:thinking_delta",
        "content_block_delta:thinking_delta",
        "content_block_delta:thinking_delta",
        "content_block_delta:signature_delta",
        "content_block_stop",
        "content_block_start:text",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    evs = events(ex)
    assert [e.get("index") for e in evs[1:-2]] == [0] * 7 + [1] * 4
    start = evs[0]["message"]
    prompt_tokens = len(rig.engine.calls[0][0])
    assert start["id"].startswith("msg_") and start["model"] == "claude-local"
    assert (start["type"], start["role"], start["content"]) == ("message", "assistant", [])
    assert (start["stop_reason"], start["stop_sequence"]) == (None, None)
    assert start["usage"]["input_tokens"] == prompt_tokens
    assert evs[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert evs[6]["delta"] == {"type": "signature_delta", "signature": sha("Two plus two.")}
    assert evs[8]["content_block"] == {"type": "text", "text": ""}
    assert (streamed(ex, "thinking_delta"), streamed(ex, "text_delta")) == (
        "Two plus two.",
        "It is 4.",
    )
    assert evs[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": prompt_tokens,
            "output_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens_details": {"thinking_tokens": 6},
        },
    }
    assert evs[-1] == {"type": "message_stop"}
    assert ex.finished


def test_golden_max_tokens_stop() -> None:
    rig = make_rig(["a b c d e f"])
    ex = stream(rig, max_tokens=3)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:text",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert streamed(ex, "text_delta") == "a b c"
    delta = message_delta(ex)
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3


def test_golden_max_tokens_inside_a_think_still_ends_with_a_text_block() -> None:
    rig = make_rig([Reply.of("<think>", "still", " going", " on")])
    ex = stream(rig, max_tokens=3, thinking=ENABLED)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:thinking",
        "content_block_delta:thinking_delta",
        "content_block_delta:thinking_delta",
        "content_block_delta:signature_delta",
        "content_block_stop",
        "content_block_start:text",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert message_delta(ex)["delta"]["stop_reason"] == "max_tokens"


def test_golden_stop_sequence_stop() -> None:
    rig = make_rig([Reply.of("The answer", " is 4", "2. ST", "O", "P and more", "never computed")])
    ex = stream(rig, stop_sequences=["STOP", "HALT"])
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:text",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert streamed(ex, "text_delta") == "The answer is 42. "
    assert message_delta(ex)["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    # Decoding stopped at the match: the piece after it was never computed.
    assert [k for k, _ in rig.engine.computed].count("token") == 5


# -- stop reasons --------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_the_templates_end_of_turn_string_is_end_turn_not_stop_sequence(streaming: bool) -> None:
    rig = make_rig([Reply.of("Hi", "<|im_end|>", "never")])
    ex = post(rig, stream=streaming, stop_sequences=["zz"])
    rig.threads.run_until_idle()
    if streaming:
        assert message_delta(ex)["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert streamed(ex, "text_delta") == "Hi"
    else:
        got = body(ex)
        assert (got["stop_reason"], got["stop_sequence"]) == ("end_turn", None)
        assert got["content"] == [{"type": "text", "text": "Hi"}]


def test_running_out_of_context_is_model_context_window_exceeded() -> None:
    rig = make_rig([Reply.of("x", eos=False)], n_ctx=100)
    ex = post(rig, max_tokens=1000)
    rig.threads.run_until_idle()
    got = body(ex)
    assert got["stop_reason"] == "model_context_window_exceeded"
    assert got["usage"]["output_tokens"] == 100 - len(rig.engine.calls[0][0])


# -- non-streaming -------------------------------------------------------------


def test_non_streaming_message_with_thinking() -> None:
    rig = make_rig([THINKING])
    ex = post(rig, thinking=ENABLED)
    rig.threads.run_until_idle()
    assert ex.status == 200 and ex.header("content-type") == "application/json"
    got = body(ex)
    assert got.pop("id").startswith("msg_")
    assert got == {
        "type": "message",
        "role": "assistant",
        "model": "claude-local",
        "content": [
            {"type": "thinking", "thinking": "Two plus two.", "signature": sha("Two plus two.")},
            {"type": "text", "text": "It is 4."},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": len(rig.engine.calls[0][0]),
            "output_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens_details": {"thinking_tokens": 6},
        },
    }
    assert rig.engine.template_kwargs == [{"enable_thinking": True, "thinking": True}]


def test_non_streaming_max_tokens() -> None:
    rig = make_rig(["a b c d"])
    ex = post(rig, max_tokens=2)
    rig.threads.run_until_idle()
    got = body(ex)
    assert got["content"] == [{"type": "text", "text": "a b"}]
    assert (got["stop_reason"], got["stop_sequence"]) == ("max_tokens", None)
    assert got["usage"]["output_tokens"] == 2


@pytest.mark.parametrize("streaming", [True, False])
def test_non_streaming_and_streaming_agree_on_stop_sequence(streaming: bool) -> None:
    rig = make_rig([Reply.of("one", " two", " END", " three")])
    ex = post(rig, stream=streaming, stop_sequences=[" END"])
    rig.threads.run_until_idle()
    if streaming:
        text = streamed(ex, "text_delta")
        delta = message_delta(ex)["delta"]
        reason, seq = delta["stop_reason"], delta["stop_sequence"]
    else:
        got = body(ex)
        text, reason, seq = got["content"][-1]["text"], got["stop_reason"], got["stop_sequence"]
    assert (text, reason, seq) == ("one two", "stop_sequence", " END")


# -- thinking on, off, absent --------------------------------------------------


@pytest.mark.parametrize(
    ("thinking", "kwargs", "shown"),
    [
        (None, {}, False),
        ({"type": "disabled"}, {"enable_thinking": False, "thinking": False}, False),
        (ENABLED, {"enable_thinking": True, "thinking": True}, True),
        ({"type": "adaptive"}, {}, True),
    ],
)
def test_thinking_field_sets_the_template_and_what_is_shown(
    thinking: dict[str, Any] | None, kwargs: dict[str, Any], shown: bool
) -> None:
    rig = make_rig([THINKING])
    extra = {} if thinking is None else {"thinking": thinking}
    ex = post(rig, **extra)
    rs = stream(rig, **extra)
    rig.threads.run_until_idle()
    assert rig.engine.template_kwargs == [kwargs, kwargs]
    content = body(ex)["content"]
    assert content[-1] == {"type": "text", "text": "It is 4."}
    assert [b["type"] for b in content] == (["thinking", "text"] if shown else ["text"])
    assert ("content_block_start:thinking" in sequence(rs)) is shown
    assert streamed(rs, "text_delta") == "It is 4."


def test_display_omitted_sends_signed_empty_thinking_blocks() -> None:
    rig = make_rig([THINKING])
    omitted = {**ENABLED, "display": "omitted"}
    ex = post(rig, thinking=omitted)
    rs = stream(rig, thinking=omitted)
    rig.threads.run_until_idle()
    assert body(ex)["content"][0] == {
        "type": "thinking",
        "thinking": "",
        "signature": sha("Two plus two."),
    }
    assert sequence(rs)[:4] == [
        "message_start",
        "content_block_start:thinking",
        "content_block_delta:signature_delta",
        "content_block_stop",
    ]


# -- a template that opens the block ------------------------------------------


def test_template_that_opens_the_block_starts_in_a_thinking_block() -> None:
    rig = make_rig([Reply.of("Hmm", ".", "</think>", "Yes.")])
    rig.engine.generation_prompt_suffix = "<think>\n"
    ex = post(rig, thinking=ENABLED)
    rig.threads.run_until_idle()
    assert [b.get("thinking", b.get("text")) for b in body(ex)["content"]] == ["Hmm.", "Yes."]


# -- the keepalive as Anthropic's ping ---------------------------------------------

LONG_THINK = Reply.of("<think>", *["hmm "] * 8, "</think>", "Done.")


def test_anthropic_ping_replaces_the_comment_frames() -> None:
    rig = make_rig([LONG_THINK], keepalive=15, anthropic_ping=True)
    ex = stream(rig)
    rig.threads.step(2)
    for _ in range(8):
        rig.threads.step()
        rig.clock.advance(10)
    assert ex.comments() == []
    assert [n for n, _ in ex.events()] == ["message_start"] + ["ping"] * 5
    assert ex.body.count(PING) == 5
    rig.threads.run_until_idle()
    assert sequence(ex)[-1] == "message_stop"
    metrics = rig.http.get("/metrics").body.decode()
    assert 'ds4tw_keepalive_frames_total{stage="decode"} 5.0' in metrics


def test_a_queued_stream_gets_message_start_first_then_pings() -> None:
    rig = make_rig(["one two three"], keepalive=15, anthropic_ping=True)
    first = stream(rig)
    rig.threads.step()
    queued = stream(rig)
    assert queued.status == 200 and queued.headers_sent
    assert queued.header("content-type") == "text/event-stream; charset=utf-8"
    assert [n for n, _ in queued.events()] == ["message_start"]
    rig.clock.advance(15)
    rig.clock.advance(15)
    assert [n for n, _ in queued.events()] == ["message_start", "ping", "ping"]
    rig.threads.run_until_idle()
    assert sequence(first)[-1] == sequence(queued)[-1] == "message_stop"


def test_plain_comments_while_queued_by_default() -> None:
    rig = make_rig(["one two three"], keepalive=15)
    stream(rig)
    rig.threads.step()
    queued = stream(rig)
    rig.clock.advance(15)
    rig.clock.advance(15)
    assert queued.comments() == ["queued", "queued"]
    assert b"event: ping" not in queued.body


# -- request translation -------------------------------------------------------


def test_sampling_parameters_and_stop_sequences_reach_the_engine() -> None:
    rig = make_rig()
    post(
        rig,
        max_tokens=9,
        temperature=0.3,
        top_p=0.5,
        top_k=7,
        stop_sequences=["zz"],
        metadata={"user_id": "u-1"},
        service_tier="auto",
    )
    rig.threads.run_until_idle()
    params = rig.engine.calls[0][1]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (9, 0.3, 0.5, 7)
    assert params.stop == ("zz", "<|im_end|>")


def test_system_string_and_blocks_become_a_system_message() -> None:
    rig = make_rig()
    post(rig, system="Be brief.")
    post(rig, system=[{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}])
    rig.threads.run_until_idle()
    assert prompt_text(rig, 0).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt_text(rig, 1).startswith("<|im_start|>system\nBe\n\nbrief.<|im_end|>\n")


def test_block_content_consecutive_turns_and_passed_back_thinking() -> None:
    rig = make_rig()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c", "cache_control": {"type": "ephemeral"}},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "secret", "signature": "s"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "Hi."},
            ],
        },
        {"role": "user", "content": "more"},
    ]
    post(rig, messages=messages)
    rig.threads.run_until_idle()
    assert prompt_text(rig) == (
        "<|im_start|>user\nab\n\nc<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\nmore<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_trailing_assistant_turn_is_continued() -> None:
    rig = make_rig([Reply.of("B", ")")])
    ex = post(
        rig,
        messages=[
            {"role": "user", "content": "Sun in Greek? (A) Sol (B) Helios"},
            {"role": "assistant", "content": "The best answer is ("},
        ],
    )
    rig.threads.run_until_idle()
    assert prompt_text(rig).endswith("<|im_end|>\n<|im_start|>assistant\nThe best answer is (")
    assert body(ex)["content"] == [{"type": "text", "text": "B)"}]


# -- count_tokens --------------------------------------------------------------


def test_count_tokens_uses_the_same_rendering_and_runs_nothing() -> None:
    rig = make_rig()
    payload = {"model": "claude-local", "system": "Be brief.", "messages": BASE["messages"]}
    ex = rig.http.post("/v1/messages/count_tokens", payload)
    assert ex.status == 200 and ex.header("content-type") == "application/json"
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    expected += "<|im_start|>assistant\n"
    assert ex.json() == {"input_tokens": len(expected)}
    assert rig.engine.calls == [] and rig.server.worker.queue_depth == 0
    # The same request as a message reports the same input size.
    started = stream(rig, system="Be brief.")
    assert events(started)[0]["message"]["usage"]["input_tokens"] == len(expected)


def test_count_tokens_counts_a_prompt_too_long_to_run() -> None:
    rig = make_rig(n_ctx=100)
    payload = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}]}
    ex = rig.http.post("/v1/messages/count_tokens", payload)
    assert ex.status == 200 and ex.json()["input_tokens"] > 200
    assert post(rig, messages=payload["messages"]).status == 400


def test_count_tokens_passes_the_thinking_switch_to_the_template() -> None:
    rig = make_rig()
    payload = {**BASE, "thinking": {"type": "disabled"}}
    del payload["max_tokens"]
    assert rig.http.post("/v1/messages/count_tokens", payload).status == 200
    assert rig.engine.template_kwargs == [{"enable_thinking": False, "thinking": False}]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        ({"model": "m", "messages": []}, "at least 1"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "'image'",
        ),
        (
            {"model": "m", "messages": BASE["messages"], "tools": [{"name": "t"}]},
            "tools.0.input_schema: Field required",
        ),
    ],
)
def test_invalid_count_tokens_requests(payload: dict[str, Any], fragment: str) -> None:
    rig = make_rig()
    ex = rig.http.post("/v1/messages/count_tokens", payload)
    assert ex.status == 400
    assert ex.json()["type"] == "error"
    assert ex.json()["error"]["type"] == "invalid_request_error"
    assert fragment in ex.json()["error"]["message"]
    assert rig.engine.template_kwargs == []


# -- errors --------------------------------------------------------------------


def _with(**kw: Any) -> dict[str, Any]:
    return {**BASE, **kw}


def _user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return _with(messages=[{"role": "user", "content": list(blocks)}])


BAD_REQUESTS: list[tuple[bytes | dict[str, Any], str]] = [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "must be a JSON object"),
    ({"model": "m", "messages": BASE["messages"]}, "max_tokens: Field required"),
    ({"max_tokens": 5, "messages": BASE["messages"]}, "model: Field required"),
    (_with(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    (_with(max_tokens="lots"), "max_tokens: Input should be a valid integer"),
    (_with(messages=[]), "messages: List should have at least 1 item"),
    (_with(messages="hi"), "messages: Input should be a valid list"),
    (_with(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    (_with(messages=[{"role": "user"}]), "messages.0.content: Field required"),
    (_with(temperature=1.5), "temperature: Input should be less than or equal to 1"),
    (_with(top_p=0), "top_p: Input should be greater than 0"),
    (_with(top_k=-1), "top_k: Input should be greater than or equal to 0"),
    (_with(stop_sequences=["a"] * 17), "at most 16 stop sequences"),
    (_with(thinking={"type": "enabled"}), "thinking.enabled.budget_tokens: Field required"),
    (_with(thinking={"type": "sometimes"}), "thinking: Input tag 'sometimes'"),
    (
        _user({"type": "image", "source": {"type": "base64", "data": "AA=="}}),
        "messages.0.content.0: content blocks of type 'image' are not supported",
    ),
    (_user({"type": "document", "source": {}}), "type 'document' are not supported"),
    (_user({"type": "thinking", "thinking": "x"}), "type 'thinking' are not supported"),
    (_user({"type": "text"}), "messages.0.content.0.text: a text block needs"),
    (_with(system=[{"type": "image"}]), "system.0: content blocks of type 'image'"),
]


@pytest.mark.parametrize(("payload", "fragment"), BAD_REQUESTS)
def test_invalid_requests_get_anthropic_400s_and_queue_nothing(
    payload: bytes | dict[str, Any], fragment: str
) -> None:
    rig = make_rig()
    for streaming in (False, True):
        sent = dict(payload, stream=streaming) if isinstance(payload, dict) else payload
        ex = rig.http.post("/v1/messages", sent)
        assert ex.status == 400
        assert ex.header("content-type") == "application/json"
        got = ex.json()
        assert got == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": got["error"]["message"]},
        }
        assert fragment in got["error"]["message"]
    assert rig.engine.calls == [] and not rig.threads.busy
    assert rig.server.worker.queue_depth == 0


def test_context_overflow_is_anthropics_prompt_is_too_long() -> None:
    rig = make_rig(n_ctx=100)
    ex = stream(rig, messages=[{"role": "user", "content": "x" * 200}])
    assert ex.status == 400
    error = ex.json()["error"]
    prompt_tokens = len("<|im_start|>user\n" + "x" * 200 + "<|im_end|>\n<|im_start|>assistant\n")
    assert error["type"] == "invalid_request_error"
    # Anthropic's wording, which its clients (Claude Code) match to know a full context.
    assert error["message"] == f"prompt is too long: {prompt_tokens} tokens > 99 maximum"
    assert rig.engine.calls == [] and rig.server.worker.queue_depth == 0


def test_api_key_in_x_api_key() -> None:
    rig = make_rig(api_key="sekrit")
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        denied = post(rig, path)
        assert denied.status == 401
        assert denied.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "Invalid or missing API key."},
        }
    wrong = rig.http.post("/v1/messages", BASE, headers={"x-api-key": "nope"})
    assert wrong.status == 401
    assert rig.engine.calls == []
    ok = rig.http.post("/v1/messages", BASE, headers={"x-api-key": "sekrit"})
    rig.threads.run_until_idle()
    assert ok.status == 200 and body(ok)["stop_reason"] == "end_turn"


def test_count_tokens_is_overloaded_while_the_model_loads() -> None:
    # /v1/messages itself: tests/unit/test_dialects.py.
    rig = make_rig()
    rig.server.worker.state = ModelState.LOADING
    ex = post(rig, "/v1/messages/count_tokens")
    assert ex.status == 503
    assert ex.header("retry-after") == "5"
    assert ex.json()["error"]["type"] == "overloaded_error"
    assert rig.engine.template_kwargs == []


def test_body_too_large_is_request_too_large() -> None:
    rig = make_rig(max_body_bytes=200)
    ex = post(rig, system="x" * 300)
    assert ex.status == 413
    assert ex.json()["error"]["type"] == "request_too_large"


def test_other_methods_and_paths_are_anthropic_shaped() -> None:
    rig = make_rig()
    get = rig.http.get("/v1/messages")
    assert get.status == 405 and get.header("allow") == "POST"
    assert get.json()["error"]["type"] == "invalid_request_error"
    get_count = rig.http.get("/v1/messages/count_tokens")
    assert get_count.status == 405 and get_count.header("allow") == "POST"
    batches = rig.http.post("/v1/messages/batches", {})
    assert batches.status == 404
    assert batches.json()["error"]["type"] == "not_found_error"
    assert "/v1/messages/batches" in batches.json()["error"]["message"]


def _broken(rig: Rig) -> None:
    def step(abort: AbortFlag | None = None) -> StepResult:
        raise RuntimeError("the GPU caught fire")

    rig.engine.step = step  # type: ignore[method-assign]


@pytest.mark.logs_engine_errors
def test_engine_failure_mid_stream_is_an_error_event_without_message_stop() -> None:
    rig = make_rig()
    _broken(rig)
    ex = stream(rig)
    rig.threads.run_until_idle()
    evs = events(ex)
    assert [e["type"] for e in evs] == ["message_start", "error"]
    assert evs[-1]["error"]["type"] == "api_error"
    assert "the GPU caught fire" in evs[-1]["error"]["message"]
    assert ex.finished


@pytest.mark.logs_engine_errors
def test_engine_failure_without_streaming_is_a_500_api_error() -> None:
    rig = make_rig()
    _broken(rig)
    ex = post(rig)
    rig.threads.run_until_idle()
    assert ex.status == 500
    assert ex.json()["type"] == "error"
    assert ex.json()["error"]["type"] == "api_error"
    assert "the GPU caught fire" in ex.json()["error"]["message"]
