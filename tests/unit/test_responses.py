"""
The OpenAI Responses dialect (C{POST /v1/responses}) on the scripted
engine: golden event sequences, every event and body validated against
the installed C{openai} SDK's own models, reasoning effort, and every
unsupported or invalid request answered with an OpenAI-shaped 400 before
anything is queued. What every dialect does alike (disconnects, split
tags and UTF-8, hidden reasoning under the keepalive, 503s) is in
tests/unit/test_dialects.py.

Caveat: the SDK models prove required fields and types, not the SDK's
stream-accumulation rules (event order, item identity); the integration
test drives C{client.responses.stream()} against the real server for
those.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import BaseModel as SDKModel
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCustomToolCallInputDeltaEvent,
    ResponseCustomToolCallInputDoneEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from ds4tw import AbortFlag, StepResult
from ds4tw.testing import Exchange, Reply

from .conftest import Rig, make_rig

SDK_EVENTS: dict[str, type[SDKModel]] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.completed": ResponseCompletedEvent,
    "response.incomplete": ResponseIncompleteEvent,
    "response.failed": ResponseFailedEvent,
    "error": ResponseErrorEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.reasoning_text.delta": ResponseReasoningTextDeltaEvent,
    "response.reasoning_text.done": ResponseReasoningTextDoneEvent,
    "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent,
    "response.custom_tool_call_input.delta": ResponseCustomToolCallInputDeltaEvent,
    "response.custom_tool_call_input.done": ResponseCustomToolCallInputDoneEvent,
}

THINKING = Reply.of("<think>", "Two", " plus", " two", ".", "</think>", "\n\n", "It is", " 4.")

OPEN = ["response.created", "response.in_progress"]
REASONING_ITEM_OPEN = ["response.output_item.added", "response.content_part.added"]
REASONING_ITEM_DONE = [
    "response.reasoning_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
MESSAGE_OPEN = ["response.output_item.added", "response.content_part.added"]
MESSAGE_DONE = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def post(rig: Rig, stream: bool = False, **kw: Any) -> Exchange:
    payload = {"model": "scripted", "input": "What is 2+2?", **kw}
    if stream:
        payload["stream"] = True
    return rig.http.post("/v1/responses", payload)


def events(ex: Exchange) -> list[dict[str, Any]]:
    """
    The stream's events so far, each checked three ways: the SSE event
    name is its C{type}, it validates against the SDK's model for that
    type, and the sequence numbers run 0, 1, 2, ... with no gap.
    """
    out = []
    for name, data in ex.events():
        if name == "comment":
            continue
        payload = json.loads(data)
        assert payload["type"] == name
        SDK_EVENTS[name].model_validate(payload)
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def types(ex: Exchange) -> list[str]:
    return [e["type"] for e in events(ex)]


def texts(ex: Exchange) -> tuple[str, str]:
    """(reasoning, answer) as streamed so far."""
    evs = events(ex)
    reasoning = "".join(e["delta"] for e in evs if e["type"] == "response.reasoning_text.delta")
    answer = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    return reasoning, answer


def final(ex: Exchange) -> Response:
    last = events(ex)[-1]
    assert last["type"] in ("response.completed", "response.incomplete", "response.failed")
    return Response.model_validate(last["response"])


def body(ex: Exchange) -> Response:
    assert ex.status == 200, ex.body
    return Response.model_validate(ex.json())


# -- golden event sequences ----------------------------------------------


def test_golden_reasoning_then_text() -> None:
    rig = make_rig([THINKING])
    ex = post(rig, stream=True)
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        *REASONING_ITEM_OPEN,
        *["response.reasoning_text.delta"] * 4,
        *REASONING_ITEM_DONE,
        *MESSAGE_OPEN,
        *["response.output_text.delta"] * 2,
        *MESSAGE_DONE,
        "response.completed",
    ]
    assert texts(ex) == ("Two plus two.", "It is 4.")
    assert ex.finished and "[DONE]" not in ex.body.decode()
    response = final(ex)
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == "It is 4."
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content is not None and reasoning.content[0].text == "Two plus two."
    assert (reasoning.status, message.status) == ("completed", "completed")
    assert response.usage is not None
    assert response.usage.output_tokens == 9
    assert response.usage.output_tokens_details.reasoning_tokens == 6
    assert response.usage.input_tokens == len(rig.engine.calls[0][0])
    assert response.usage.total_tokens == response.usage.input_tokens + 9


def test_every_event_locates_its_item() -> None:
    rig = make_rig([THINKING])
    ex = post(rig, stream=True)
    rig.threads.run_until_idle()
    evs = events(ex)
    added = [e["item"] for e in evs if e["type"] == "response.output_item.added"]
    assert [(i["type"], i["status"], i["content"]) for i in added] == [
        ("reasoning", "in_progress", []),
        ("message", "in_progress", []),
    ]
    ids = [i["id"] for i in added]
    assert ids[0].startswith("rs_") and ids[1].startswith("msg_")
    for e in evs:
        if "item_id" in e:
            assert e["item_id"] == ids[e["output_index"]]
            assert e["content_index"] == 0
        if e["type"] == "response.output_item.done":
            assert e["item"]["id"] == ids[e["output_index"]]
    created = evs[0]["response"]
    assert created["id"].startswith("resp_") and created["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    assert {e["response"]["id"] for e in evs if "response" in e} == {created["id"]}
    assert [item.id for item in final(ex).output] == ids


def test_golden_max_output_tokens_is_incomplete() -> None:
    rig = make_rig(["a b c d e f"])
    ex = post(rig, stream=True, max_output_tokens=2)
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        *MESSAGE_OPEN,
        *["response.output_text.delta"] * 2,
        *MESSAGE_DONE,
        "response.incomplete",
    ]
    assert rig.engine.calls[0][1].max_tokens == 2
    response = final(ex)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "a b"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.usage is not None and response.usage.output_tokens == 2
    assert response.completed_at is None


def test_golden_max_output_tokens_while_thinking() -> None:
    """Out of tokens mid-thought: the reasoning item, no message (as OpenAI)."""
    rig = make_rig([THINKING])
    ex = post(rig, stream=True, max_output_tokens=3)
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        *REASONING_ITEM_OPEN,
        *["response.reasoning_text.delta"] * 2,
        *REASONING_ITEM_DONE,
        "response.incomplete",
    ]
    response = final(ex)
    assert [(i.type, i.status) for i in response.output] == [("reasoning", "incomplete")]
    assert response.output_text == ""


@pytest.mark.parametrize(
    ("reply", "tokens"),
    [
        (Reply.of("Hi", " there"), 2),  # end of generation
        # The chat template's end-of-turn text is a stop sequence, split
        # across tokens: never sent, and nothing computed after it.
        (Reply.of("Hi", " there", "<|im_", "end|>", "never computed"), 4),
    ],
    ids=["eos", "stop-sequence"],
)
def test_golden_stop_is_completed(reply: Reply, tokens: int) -> None:
    rig = make_rig([reply])
    ex = post(rig, stream=True)
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        *MESSAGE_OPEN,
        *["response.output_text.delta"] * 2,
        *MESSAGE_DONE,
        "response.completed",
    ]
    response = final(ex)
    assert response.output_text == "Hi there"
    assert response.completed_at is not None
    assert [k for k, _ in rig.engine.computed].count("token") == tokens


def test_golden_empty_answer_is_one_empty_message() -> None:
    rig = make_rig([Reply.of()])
    ex = post(rig, stream=True)
    rig.threads.run_until_idle()
    assert types(ex) == [*OPEN, *MESSAGE_OPEN, *MESSAGE_DONE, "response.completed"]
    response = final(ex)
    assert [i.type for i in response.output] == ["message"]
    assert response.output_text == ""


def test_created_and_in_progress_reach_a_queued_client_at_once() -> None:
    rig = make_rig(["one two three four"], keepalive=15)
    post(rig, stream=True)
    rig.threads.step()
    queued = post(rig, stream=True)
    assert queued.status == 200
    assert queued.header("content-type") == "text/event-stream; charset=utf-8"
    assert types(queued) == OPEN
    rig.clock.advance(15)
    rig.clock.advance(15)
    assert queued.comments() == ["queued", "queued"]


# -- non-streaming ----------------------------------------------------------


def test_non_streaming_body() -> None:
    rig = make_rig([THINKING])
    ex = post(rig)
    rig.threads.run_until_idle()
    assert ex.header("content-type") == "application/json"
    response = body(ex)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == "scripted"
    assert response.output_text == "It is 4."
    assert [i.type for i in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 6
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.tools == [] and response.tool_choice == "auto"
    assert ex.json()["store"] is False


def test_streamed_and_non_streamed_responses_agree() -> None:
    rig = make_rig([THINKING])
    streamed = post(rig, stream=True, max_output_tokens=8)
    rig.threads.run_until_idle()
    plain = post(rig, max_output_tokens=8)
    rig.threads.run_until_idle()

    def comparable(r: dict[str, Any]) -> dict[str, Any]:
        drop = {"id", "created_at", "completed_at"}
        out = {k: v for k, v in r.items() if k not in drop}
        out["output"] = [{k: v for k, v in i.items() if k != "id"} for i in r["output"]]
        return out

    last = events(streamed)[-1]
    assert last["type"] == "response.incomplete"
    assert comparable(last["response"]) == comparable(plain.json())


def test_non_streaming_incomplete() -> None:
    rig = make_rig(["a b c d e f"])
    ex = post(rig, max_output_tokens=3)
    rig.threads.run_until_idle()
    response = body(ex)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "a b c"


def test_request_settings_are_echoed() -> None:
    rig = make_rig()
    ex = post(
        rig,
        instructions="Be brief.",
        max_output_tokens=50,
        temperature=0.2,
        top_p=0.5,
        metadata={"ticket": "42"},
        user="u1",
        truncation="auto",
        reasoning={"effort": "high", "summary": "auto"},
        store=False,
        parallel_tool_calls=False,
        tool_choice="none",
        tools=[],
        text={"format": {"type": "text"}},
        stream_options={"include_obfuscation": False},
        service_tier="auto",
        prompt_cache_key="k",
    )
    rig.threads.run_until_idle()
    response = body(ex)
    assert response.instructions == "Be brief."
    assert (response.max_output_tokens, response.temperature, response.top_p) == (50, 0.2, 0.5)
    assert response.metadata == {"ticket": "42"} and response.user == "u1"
    assert response.truncation == "auto" and response.parallel_tool_calls is False
    assert response.tool_choice == "none"
    assert response.reasoning is not None and response.reasoning.effort == "high"
    params = rig.engine.calls[0][1]
    assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.5, 50)


# -- translation to the engine ---------------------------------------------


def prompt_text(rig: Rig, call: int = 0) -> str:
    return "".join(chr(t) for t in rig.engine.calls[call][0])


def test_input_items_become_the_chat_prompt() -> None:
    rig = make_rig()
    items = [
        {"role": "developer", "content": "Dev says"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Hello"},
                {"type": "input_text", "text": "!"},
            ],
        },
        # A previous turn's output sent back as input, as the SDK's
        # stateless multi-turn pattern does: its reasoning is left out.
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
        },
        {"role": "user", "content": "Again"},
    ]
    post(rig, instructions="Be brief.", input=items)
    rig.threads.run_until_idle()
    assert prompt_text(rig) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>system\nDev says<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_stateless_agents_asking_for_encrypted_reasoning_are_served() -> None:
    """
    Agents that keep no server state send include=[reasoning.encrypted_content]
    and pass reasoning items back next turn; both are accepted.
    """
    rig = make_rig()
    ex = post(rig, store=False, include=["reasoning.encrypted_content"])
    rig.threads.run_until_idle()
    assert ex.status == 200
    assert ex.json()["status"] == "completed"


def test_string_input_is_one_user_message() -> None:
    rig = make_rig()
    post(rig, input="Hello")
    rig.threads.run_until_idle()
    assert prompt_text(rig) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_default_max_output_tokens_is_the_rest_of_the_context() -> None:
    rig = make_rig(n_ctx=200)
    post(rig)
    rig.threads.run_until_idle()
    prompt, params = rig.engine.calls[0]
    assert params.max_tokens == 200 - len(prompt)
    assert "<|im_end|>" in params.stop


# -- reasoning -------------------------------------------------------------


@pytest.mark.parametrize("effort", ["none", "minimal"])
def test_effort_none_or_minimal_turns_thinking_off_and_hides_it(effort: str) -> None:
    rig = make_rig([THINKING])
    ex = post(rig, reasoning={"effort": effort})
    rig.threads.run_until_idle()
    off = {"enable_thinking": False, "thinking": False}
    # gpt-oss cannot stop thinking: it is told to think as little as it can.
    assert rig.engine.template_kwargs[-1] == (
        off if effort == "none" else {**off, "reasoning_effort": "low"}
    )
    response = body(ex)
    assert [i.type for i in response.output] == ["message"]
    assert response.output_text == "It is 4."


def test_other_efforts_leave_thinking_on() -> None:
    rig = make_rig([THINKING])
    ex = post(rig, reasoning={"effort": "low"})
    rig.threads.run_until_idle()
    assert rig.engine.template_kwargs[-1] == {
        "enable_thinking": True,
        "thinking": True,
        "reasoning_effort": "low",
    }
    assert [i.type for i in body(ex).output] == ["reasoning", "message"]


# -- errors ----------------------------------------------------------------

FUNCTION_TOOL = {"type": "function", "name": "f", "parameters": {}}
IMAGE = {"type": "input_image", "image_url": "https://example.com/cat.png"}

BAD_REQUESTS: list[tuple[bytes | dict[str, Any], str | None, str]] = [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "empty"),
    (b"[1]", None, "must be a JSON object"),
    ({}, "input", "Field required"),
    ({"input": 5}, "input", "a string or a list of input items"),
    ({"input": []}, "input", "at least one input item"),
    ({"input": ["hi"]}, "input.0", "expected an input item object"),
    ({"input": "x", "store": True}, "store", "stored responses are not supported"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stores no"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "not supported"),
    ({"input": "x", "background": True}, "background", "not supported"),
    (
        {"input": "x", "tools": [FUNCTION_TOOL, {"type": "web_search"}], "tool_choice": "web"},
        "tool_choice",
        "expected 'auto'",
    ),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "no tools are defined"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format", "not supported"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity", "only 'medium'"),
    (
        {"input": "x", "include": ["reasoning.encrypted_content", "file_search_call.results"]},
        "include",
        "(file_search_call.results) is not supported",
    ),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs", "needs include"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "prompt templates"),
    (
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        "input.0.type",
        "'item_reference' are not supported",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"}, IMAGE]}]},
        "input.0.content.1.type",
        "'input_image' is not supported",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
        "input.0.content.0.type",
        "'input_file' is not supported",
    ),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "Input should be"),
    ({"input": [{"role": "user"}]}, "input.0.content", "Field required"),
    ({"input": [{"role": "user", "content": 5}]}, "input.0.content", "a string or a list"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "input.0.content.0.text",
        "Field required",
    ),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": "x", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"input": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "Input should be"),
    ({"input": "x", "truncation": "sometimes"}, "truncation", "Input should be"),
]


@pytest.mark.parametrize(("payload", "param", "fragment"), BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_requests_get_openai_400s_and_queue_nothing(
    payload: bytes | dict[str, Any], param: str | None, fragment: str, stream: bool
) -> None:
    rig = make_rig()
    if stream and isinstance(payload, dict):
        payload = {**payload, "stream": True}
    ex = rig.http.post("/v1/responses", payload)
    assert ex.status == 400
    assert ex.header("content-type") == "application/json"
    error = ex.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"], error["message"]
    assert error["param"] == param
    assert rig.engine.calls == [] and not rig.threads.busy
    assert rig.server.worker.queue_depth == 0


def test_context_overflow_is_a_400_with_both_sizes() -> None:
    rig = make_rig(n_ctx=100)
    ex = post(rig, stream=True, input="x" * 200)
    assert ex.status == 400
    error = ex.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    prompt_tokens = len(
        rig.engine.apply_chat_template([{"role": "user", "content": "x" * 200}]).text
    )
    assert "100 tokens" in error["message"] and f"{prompt_tokens} tokens" in error["message"]
    assert rig.engine.calls == [] and rig.server.worker.queue_depth == 0


def test_api_key_is_required_when_set() -> None:
    rig = make_rig(api_key="sekrit")
    ex = post(rig)
    assert ex.status == 401
    assert ex.json()["error"]["code"] == "invalid_api_key"
    assert rig.engine.calls == []
    ok = rig.http.post(
        "/v1/responses",
        {"model": "m", "input": "hi"},
        headers={"Authorization": "Bearer sekrit"},
    )
    rig.threads.run_until_idle()
    assert body(ok).status == "completed"


HALF = Reply.of("Half", " an answer", " never sent")


def broken_engine(rig: Rig) -> None:
    """The engine dies after two tokens of an answer."""
    step = rig.engine.step

    def broken(abort: AbortFlag | None = None) -> StepResult:
        if [kind for kind, _ in rig.engine.computed].count("token") >= 2:
            raise RuntimeError("the GPU caught fire")
        return step(abort)

    rig.engine.step = broken  # type: ignore[method-assign]


@pytest.mark.logs_engine_errors
def test_engine_failure_mid_stream_is_error_then_response_failed() -> None:
    rig = make_rig([HALF])
    broken_engine(rig)
    ex = post(rig, stream=True)
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        *MESSAGE_OPEN,
        *["response.output_text.delta"] * 2,
        "error",
        "response.failed",
    ]
    error = events(ex)[-2]
    assert "the GPU caught fire" in error["message"] and error["code"] == "engine_error"
    response = final(ex)
    assert response.status == "failed"
    assert response.error is not None and response.error.code == "server_error"
    assert "the GPU caught fire" in response.error.message
    # What was said before the failure is there, marked incomplete.
    assert response.output_text == "Half an answer"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert ex.finished
    # The worker moves on.
    rig.engine.step = type(rig.engine).step.__get__(rig.engine)  # type: ignore[method-assign]
    nxt = post(rig)
    rig.threads.run_until_idle()
    assert body(nxt).status == "completed"


@pytest.mark.logs_engine_errors
def test_engine_failure_without_streaming_is_a_500() -> None:
    rig = make_rig([HALF])
    broken_engine(rig)
    ex = post(rig)
    rig.threads.run_until_idle()
    assert ex.status == 500
    error = ex.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "the GPU caught fire" in error["message"]
