"""
Graceful shutdown (Worker.stopService, driven by twistd's SIGTERM): /health
says draining at once, new requests get 503 + Retry-After, the running and
queued jobs get --drain-timeout seconds of the server's clock, and whatever
is left then ends with its dialect's final frame (a stream) or a 503 body
(a waiting non-streaming request). Never a bare cut.

The real SIGTERM against `twistd -n ds4tw` is in
tests/integration/test_twistd.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from anthropic.types import ErrorResponse, RawMessageStreamEvent
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent, ResponseStreamEvent
from pydantic import TypeAdapter
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw.testing import Exchange

from .conftest import Rig, make_rig

LONG = "a b c d e f g h i j k l m n o p"
TIMEOUT = 30.0  # ServerConfig's default

ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: Any) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def stop(rig: Rig) -> Deferred[Any]:
    """What twistd does on SIGTERM."""
    return rig.server.stopService()


# -- the four streaming dialects, each with its SDK's types -------------


def chat(rig: Rig, stream: bool = True) -> Exchange:
    return rig.chat(LONG, stream=stream)


def completions(rig: Rig, stream: bool = True) -> Exchange:
    payload = {"model": "scripted", "prompt": LONG, "stream": stream}
    return rig.http.post("/v1/completions", payload)


def messages(rig: Rig, stream: bool = True) -> Exchange:
    payload = {
        "model": "claude-local",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": LONG}],
        "stream": stream,
    }
    return rig.http.post("/v1/messages", payload)


def responses(rig: Rig, stream: bool = True) -> Exchange:
    return rig.http.post("/v1/responses", {"model": "scripted", "input": LONG, "stream": stream})


def completion_chunk(payload: dict[str, Any]) -> None:
    # The SDK's Completion wants a finish_reason, which streamed chunks
    # (OpenAI's too) have only at the end.
    assert payload["object"] == "text_completion"
    if all(c["finish_reason"] is not None for c in payload["choices"]):
        Completion.model_validate(payload)


def openai_frames(validate: Callable[[Any], Any]) -> Callable[[Exchange], list[Any]]:
    def frames(ex: Exchange) -> list[Any]:
        out: list[Any] = []
        for name, data in ex.events():
            if name == "comment":
                continue
            if data == "[DONE]":
                out.append("[DONE]")
                continue
            payload = json.loads(data)
            if name == "error":
                assert set(payload) == {"error"}
                out.append(("error", payload["error"]))
            else:
                validate(payload)
                out.append(payload)
        return out

    return frames


def anthropic_frames(ex: Exchange) -> list[Any]:
    out: list[Any] = []
    for name, data in ex.events():
        if name in ("comment", "ping"):
            continue
        payload = json.loads(data)
        assert name == payload["type"]
        if name == "error":
            ErrorResponse.model_validate(payload)
            out.append(("error", payload["error"]))
        else:
            ANTHROPIC_EVENT.validate_python(payload)
            out.append(payload)
    return out


def responses_frames(ex: Exchange) -> list[Any]:
    out: list[Any] = []
    for name, data in ex.events():
        if name == "comment":
            continue
        payload = json.loads(data)
        assert name == payload["type"]
        RESPONSES_EVENT.validate_python(payload)
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def completed_normally(name: str, frames: list[Any]) -> bool:
    if name in ("chat", "completions"):
        finish = frames[-2]["choices"][0]["finish_reason"]
        return frames[-1] == "[DONE]" and finish is not None
    if name == "messages":
        return frames[-1]["type"] == "message_stop"
    return bool(frames[-1]["type"] == "response.completed")


def cut_off_by_shutdown(name: str, frames: list[Any]) -> None:
    """The dialect's final frame(s) for a job the drain timeout cut off."""
    if name in ("chat", "completions"):
        kind, error = frames[-2]
        assert kind == "error" and frames[-1] == "[DONE]"
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    elif name == "messages":
        kind, error = frames[-1]
        assert kind == "error" and error["type"] == "overloaded_error"
        assert "shut down" in error["message"]
        assert all(isinstance(f, dict) and f["type"] != "message_stop" for f in frames[:-1])
    else:
        error_event, failed = frames[-2:]
        ResponseErrorEvent.model_validate(error_event)
        assert error_event["code"] == "server_shutting_down"
        response = ResponseFailedEvent.model_validate(failed).response
        assert response.status == "failed" and response.error is not None
        assert response.error.code == "server_error"


DIALECTS: dict[str, tuple[Callable[..., Exchange], Callable[[Exchange], list[Any]]]] = {
    "chat": (chat, openai_frames(ChatCompletionChunk.model_validate)),
    "completions": (completions, openai_frames(completion_chunk)),
    "messages": (messages, anthropic_frames),
    "responses": (responses, responses_frames),
}


def error_of(name: str, ex: Exchange) -> dict[str, Any]:
    """A non-streamed error body, checked for its dialect's shape."""
    body = ex.json()
    if name == "messages":
        ErrorResponse.model_validate(body)
        assert body["error"]["type"] == "overloaded_error"
    else:
        assert set(body["error"]) >= {"message", "type", "code"}
        assert body["error"]["code"] == "server_shutting_down"
    return dict(body["error"])


# -- /health and admission -----------------------------------------------


def test_health_says_draining_from_the_first_moment() -> None:
    rig = make_rig([LONG])
    assert rig.http.get("/health").json()["status"] == "ok"
    ex = rig.stream()
    rig.threads.step(2)
    stopped = stop(rig)
    health = rig.http.get("/health")
    assert health.status == 503
    assert health.json()["status"] == "draining" and health.json()["busy"]
    assert health.header("retry-after")
    rig.threads.run_until_idle()
    assert ex.finished and stopped.called
    assert rig.http.get("/health").json()["status"] == "draining"


@pytest.mark.parametrize("name", sorted(DIALECTS))
@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "plain"])
def test_a_new_request_during_the_drain_gets_503_in_its_dialect(name: str, streaming: bool) -> None:
    rig = make_rig([LONG, "never"])
    running = rig.stream()
    rig.threads.step(2)
    stop(rig)
    post, _ = DIALECTS[name]
    late = post(rig, stream=streaming)
    assert late.status == 503 and late.finished
    assert late.header("retry-after") == "5"
    assert "shutting down" in error_of(name, late)["message"]
    assert rig.server.worker.queue_depth == 0  # never queued
    rig.threads.run_until_idle()
    assert running.data()[-1] == "[DONE]"
    assert len(rig.engine.calls) == 1


# -- the drain -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_a_stream_that_finishes_within_the_drain_completes_normally(name: str) -> None:
    rig = make_rig([LONG])
    post, frames = DIALECTS[name]
    ex = post(rig)
    rig.threads.step(3)
    stopped = stop(rig)
    rig.clock.advance(TIMEOUT - 1)
    assert not stopped.called
    rig.threads.run_until_idle()
    assert ex.finished and completed_normally(name, frames(ex))
    assert stopped.called and rig.engine.closed and rig.threads.stopped
    assert not rig.clock.getDelayedCalls()  # the drain timer is gone too


def test_queued_jobs_are_drained_too() -> None:
    rig = make_rig([LONG, "second reply", "third reply"])
    first, second, third = rig.stream(), rig.chat("plain"), rig.stream("also queued")
    rig.threads.step()
    assert rig.server.worker.queue_depth == 2
    stopped = stop(rig)
    rig.threads.run_until_idle()
    assert first.data()[-1] == "[DONE]" and third.data()[-1] == "[DONE]"
    assert second.status == 200
    assert second.json()["choices"][0]["message"]["content"] == "second reply"
    assert stopped.called and len(rig.engine.calls) == 3


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_a_stream_still_running_at_the_timeout_gets_its_dialects_final_frame(name: str) -> None:
    rig = make_rig([LONG, LONG])
    post, frames = DIALECTS[name]
    running, queued = post(rig), post(rig)
    rig.threads.step(4)  # prefill and three tokens
    stopped = stop(rig)
    rig.threads.step(2)
    rig.clock.advance(TIMEOUT)
    # The queued one ends at once; the running one at the model thread's next check.
    assert queued.finished and not running.finished
    computed = list(rig.engine.computed)
    rig.threads.step()
    assert rig.engine.computed == [*computed, ("closed", None)]  # nothing after the timeout
    for ex in (running, queued):
        assert ex.status == 200 and ex.finished
        cut_off_by_shutdown(name, frames(ex))
    assert stopped.called and rig.engine.closed
    assert len(rig.engine.calls) == 1  # the queued job never reached the engine


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_a_waiting_non_streaming_request_gets_a_503_body(name: str) -> None:
    rig = make_rig([LONG, LONG])
    post, _ = DIALECTS[name]
    running, queued = post(rig, stream=False), post(rig, stream=False)
    rig.threads.step(3)
    assert not running.headers_sent and not queued.headers_sent
    stopped = stop(rig)
    rig.clock.advance(TIMEOUT)
    rig.threads.step()
    for ex in (running, queued):
        assert ex.status == 503 and ex.finished
        assert ex.header("retry-after") == "5"
        assert "shut down" in error_of(name, ex)["message"]
    assert stopped.called


def test_a_client_that_leaves_during_the_drain_is_not_counted_as_cancelled(
    logged: list[str],
) -> None:
    rig = make_rig([LONG])
    ex = rig.stream()
    rig.threads.step(2)
    stopped = stop(rig)
    ex.disconnect()
    rig.threads.step()
    assert stopped.called
    assert any(
        "0 drained, 0 cancelled at the drain timeout, 1 ended otherwise" in x for x in logged
    )


def test_the_log_line_counts_drained_and_cancelled(logged: list[str]) -> None:
    rig = make_rig(["short", LONG, LONG])
    first, second, third = rig.stream(), rig.stream(), rig.chat()
    rig.threads.step()
    stopped = stop(rig)
    assert any("draining 1 running and 2 queued jobs for up to 30.0s" in x for x in logged), logged
    rig.threads.step(3)  # the first finishes; the second starts
    assert first.data()[-1] == "[DONE]"
    rig.clock.advance(TIMEOUT)
    rig.threads.step()
    assert stopped.called
    cut_off_by_shutdown("chat", DIALECTS["chat"][1](second))
    assert third.status == 503
    result = rig.server.worker.drain_result
    assert result is not None and (result.drained, result.cancelled) == (1, 2)
    assert result.timed_out and result.seconds == TIMEOUT
    assert any(
        "1 drained, 2 cancelled at the drain timeout, 0 ended otherwise" in x for x in logged
    )
    assert sum("cancelled at" in x and "(server shutting down)" in x for x in logged) == 2


def test_an_idle_server_stops_at_once() -> None:
    rig = make_rig()
    stopped = stop(rig)
    assert stopped.called and rig.engine.closed and not rig.clock.getDelayedCalls()


def test_drain_timeout_zero_cancels_at_once() -> None:
    rig = make_rig([LONG], drain_timeout=0)
    ex = rig.stream()
    rig.threads.step(2)
    stopped = stop(rig)
    rig.threads.step()
    assert stopped.called
    cut_off_by_shutdown("chat", DIALECTS["chat"][1](ex))
