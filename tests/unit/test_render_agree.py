"""
Each dialect's builder gives the same reply streamed and plain: the same
output events go once through a builder's stream and once, collected,
through another builder made alike to its body; the stream is put back
together the way a client does (and, where the SDK has one, with the
official SDK's own accumulator), and must equal the body.

The reassembly is strict (whole objects, compared key by key), so a field
added to one path only fails here. What legitimately differs, and is
normalised before the comparison, is only this:

  - The body cannot keep the stream's interleaving: a collected turn has
    all of its reasoning, then all of its answer, then its calls (each
    scenario here is in that order).
  - Tool call ids are random per builder (OpenAI's C{call_...},
    Anthropic's C{toolu_...}): their form is checked, then they are
    numbered in order. (Responses' ids come from the response id, which
    the two builders share, so nothing is normalised there.)
  - Chat: a chunk's C{object} is C{chat.completion.chunk}, and its tool
    call fragments carry the C{index} that locates them; the stream never
    sends an empty C{content} delta (see L{ChatBuilder._role}), so a reply
    without text has no C{content} key where the body says C{""} (or
    C{null} beside tool calls); the usage is in the stream only with
    C{stream_options.include_usage}.
  - Anthropic: C{message_start} reports the prompt's size as
    C{input_tokens} before prefill splits it into fresh and cached input;
    C{message_delta}'s usage, cumulative totals, overwrites it.
  - Responses: a delta's logprobs have no C{bytes} (the SDK's delta shape);
    the C{output_text.done} event carries them whole.

Time is frozen, so that two builders made a second apart do not differ in
C{created}.

Caveat: the events are written by hand, not decoded from a model; the
route tests (test_openai_routes.py, test_anthropic.py, test_responses.py)
pin the wire shapes themselves, and the SDK integration tests the real
clients.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic_core import from_json

from ds4tw._api.anthropic.render import MessageBuilder
from ds4tw._api.openai.render import (
    ChatBuilder,
    CompletionBuilder,
    chat_logprobs,
    completion_logprobs,
)
from ds4tw._api.responses.render import ResponseBuilder
from ds4tw._types import (
    Collector,
    ContentText,
    Finish,
    Output,
    ReasoningText,
    Stage,
    StreamRenderer,
    TokenLogprob,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)

Body = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    events: tuple[Output, ...]
    finish: Finish


def usage() -> Usage:
    return Usage(prompt_tokens=20, completion_tokens=7, cached_tokens=4, reasoning_tokens=2)


def tok(text: str, logprob: float) -> TokenLogprob:
    piece = text.encode()
    return TokenLogprob(text, piece, logprob, ((text, piece, logprob), ("x", b"x", -9.5)))


def call(index: int, name: str, *fragments: str) -> list[Output]:
    """A call's events; its end carries what was written (also when cut off)."""
    return [
        ToolCallStart(index, name),
        *(ToolCallArgs(index, f) for f in fragments),
        ToolCallEnd(index, "".join(fragments)),
    ]


def scenario(
    name: str, events: Sequence[Output], reason: str = "stop", stop_sequence: str | None = None
) -> Scenario:
    return Scenario(name, tuple(events), Finish(reason, usage(), stop_sequence))


WEATHER = call(0, "get_weather", '{"city": ', '"Paris"}')
SCENARIOS = [
    scenario("text", [ContentText("Hello"), ContentText(", world.")]),
    scenario("reasoning", [ReasoningText("Two plus"), ReasoningText(" two."), ContentText("4")]),
    scenario(
        "logprobs",
        [
            ContentText("Hi", (tok("Hi", -0.25),)),
            ContentText(" you", (tok(" y", -1), tok("ou", -2))),
        ],
    ),
    scenario("nothing", []),
    scenario("reasoning only", [ReasoningText("Hmm.")]),
    scenario("length", [ContentText("Once upon")], "length"),
    scenario("client's stop sequence", [ContentText("a, b")], stop_sequence="END"),
    scenario("template's stop string", [ContentText("a, b")], stop_sequence="<|im_end|>"),
    scenario("tool call", [ContentText("Let me look."), *WEATHER], "tool_calls"),
    scenario("only a call", WEATHER, "tool_calls"),
    scenario(
        "parallel calls",
        [
            ReasoningText("Both cities."),
            *WEATHER,
            *call(1, "get_weather", '{"city"', ': "Oslo"}'),
            *call(2, "get_time", "{}"),
        ],
        "tool_calls",
    ),
    scenario(
        "call cut off",
        [ContentText("Writing."), *call(0, "write", '{"path": "a.txt", "text": "abc')],
        "length",
    ),
]
CUSTOM = scenario("custom tool", call(0, "apply_patch", "*** Begin", " Patch"), "tool_calls")


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)


def run_stream(renderer: StreamRenderer, s: Scenario) -> list[bytes]:
    """The frames of a stream, fed as the request lifecycle feeds them."""
    frames = renderer.opening()
    for stage in (Stage.PREFILL, Stage.DECODE):
        frames += renderer.stage(stage)
    for event in s.events:
        if isinstance(event, ReasoningText):
            frames += renderer.reasoning(event.text)
        elif isinstance(event, ContentText):
            frames += renderer.content(event)
        else:
            frames += renderer.tool_call(event)
    return frames + renderer.finish(s.finish)


def run_body(body: Callable[[Any], Body], s: Scenario) -> Body:
    collector = Collector()
    for event in s.events:
        collector.add(event)
    return body(collector.collected(s.finish))


def sse(frames: list[bytes]) -> Iterator[tuple[str | None, str]]:
    """C{(event name or None, data)} of each frame."""
    for f in frames:
        name = None
        data = []
        for line in f.decode().split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        assert data, f
        yield name, "\n".join(data)


def number_ids(value: Any, pattern: str) -> Any:
    """C{value} with every id matching C{pattern} replaced by its order of appearance."""
    seen: dict[str, str] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and re.fullmatch(pattern, v):
            return seen.setdefault(v, f"id-{len(seen)}")
        return v

    return walk(value)


def merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """
    A client's accumulation of one chunk's choice: text concatenates,
    objects merge, list items with an C{index} merge with that item,
    other lists extend, a null never overwrites, anything else replaces.
    """
    for key, value in delta.items():
        have = into.get(key)
        if value is None and key in into:
            continue
        if isinstance(value, str) and isinstance(have, str):
            into[key] = have + value
        elif isinstance(value, dict) and isinstance(have, dict):
            merge(have, value)
        elif isinstance(value, list) and isinstance(have, list):
            for item in value:
                index = item.get("index") if isinstance(item, dict) else None
                same = [h for h in have if index is not None and h.get("index") == index]
                if same:
                    merge(same[0], item)
                else:
                    have.append(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(value)


# -- OpenAI chat and completions ----------------------------------------------


def chunks(frames: list[bytes]) -> list[Body]:
    data = [d for name, d in sse(frames)]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def reassemble(frames: list[bytes], obj: str) -> Body:
    """An OpenAI stream's chunks as one object: the head every chunk repeats, the merged choice."""
    parts = chunks(frames)
    head = {k: v for k, v in parts[0].items() if k not in ("choices", "usage")}
    choice: dict[str, Any] = {}
    usages = [p["usage"] for p in parts if "usage" in p]
    for p in parts:
        assert {k: v for k, v in p.items() if k not in ("choices", "usage")} == head
        assert len(p["choices"]) == (0 if "usage" in p else 1)
        for c in p["choices"]:
            merge(choice, c)
    assert len(usages) <= 1
    return {**head, "object": obj, "choices": [choice], **({"usage": usages[0]} if usages else {})}


def no_tokens(body: Body, empty: Body) -> Body:
    """
    C{body} with logprobs that hold no token read as null: a stream has no
    chunk to carry an empty list (with logprobs asked for, a reply without
    an answer has none), where the body says the list is empty.
    (Applied to both sides: answer chunks of these hand-written events
    may carry no tokens.)
    """
    choice = body["choices"][0]
    return (
        {**body, "choices": [{**choice, "logprobs": None}]} if choice["logprobs"] == empty else body
    )


def chat_from_stream(frames: list[bytes]) -> Body:
    whole = reassemble(frames, "chat.completion")
    choice = whole["choices"][0]
    message = choice.pop("delta")
    choice["message"] = message
    for c in message.get("tool_calls", []):
        del c["index"]
    message.setdefault("content", None if "tool_calls" in message else "")
    return whole


CHAT_OPTIONS = [
    pytest.param(dict(include_usage=True, show_reasoning=True, logprobs=True), id="all"),
    pytest.param(dict(include_usage=True, show_reasoning=False, logprobs=False), id="hidden"),
    pytest.param(dict(include_usage=False, show_reasoning=True, logprobs=False), id="no-usage"),
]


@pytest.mark.parametrize("options", CHAT_OPTIONS)
@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_chat_stream_adds_up_to_the_body(s: Scenario, options: dict[str, bool]) -> None:
    def make() -> ChatBuilder:
        return ChatBuilder("chatcmpl-abc", "scripted", **options)

    frames = run_stream(make().stream(), s)
    body = run_body(make().body, s)
    streamed = number_ids(
        no_tokens(chat_from_stream(frames), chat_logprobs([])), r"call_[0-9a-f]{24}"
    )
    body = number_ids(no_tokens(body, chat_logprobs([])), r"call_[0-9a-f]{24}")
    if not options["include_usage"]:
        assert "usage" not in streamed
        body.pop("usage")
    assert streamed == body


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_chat_stream_through_the_sdk_accumulator_is_the_body(s: Scenario) -> None:
    """What the openai SDK's own accumulator makes of the stream is the body, read by the SDK."""

    def make() -> ChatBuilder:
        return ChatBuilder("chatcmpl-abc", "scripted", True, True, True)

    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks(run_stream(make().stream(), s)):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    body = ChatCompletion.model_validate(no_tokens(run_body(make().body, s), chat_logprobs([])))

    def seen(c: ChatCompletion) -> Body:
        d = c.model_dump(exclude_none=True)
        message = d["choices"][0]["message"]
        message.pop("parsed", None)
        if not message.get("content"):  # "" in a body, absent in a stream: no text either way
            message.pop("content", None)
        for t in message.get("tool_calls", []):
            t.pop("index", None)  # the accumulator's own, from the fragments
            t["function"].pop("parsed_arguments", None)
        return number_ids(d, r"call_[0-9a-f]{24}")

    # The snapshot, not get_final_completion(), which refuses a "length" finish.
    final = ChatCompletion.model_validate(
        no_tokens(state.current_completion_snapshot.to_dict(), chat_logprobs([]))
    )
    assert seen(final) == seen(body)


def completion_from_stream(frames: list[bytes]) -> Body:
    return reassemble(frames, "text_completion")


@pytest.mark.parametrize("logprobs", [True, False], ids=["logprobs", "plain"])
@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_completion_stream_adds_up_to_the_body(s: Scenario, logprobs: bool) -> None:
    def make() -> CompletionBuilder:
        return CompletionBuilder("cmpl-abc", "scripted", True, logprobs)

    frames = run_stream(make().stream(), s)
    body = no_tokens(run_body(make().body, s), completion_logprobs([]))
    assert no_tokens(completion_from_stream(frames), completion_logprobs([])) == body


# -- Anthropic messages --------------------------------------------------------


def message_from_stream(frames: list[bytes]) -> Body:
    """
    A client's message from the events: C{message_start}'s message, each
    block as started and then filled by its deltas (a call's input from
    its JSON fragments, parsed at the block's stop), C{message_delta}'s
    stop and usage over it, ended by C{message_stop}.
    """
    events = []
    for name, data in sse(frames):
        payload = json.loads(data)
        assert name == payload["type"]
        events.append(payload)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    message = copy.deepcopy(events[0]["message"])
    blocks: list[Body] = message["content"]
    inputs: dict[int, str] = {}
    for e in events[1:-1]:
        match e["type"]:
            case "content_block_start":
                assert e["index"] == len(blocks)
                blocks.append(copy.deepcopy(e["content_block"]))
            case "content_block_delta":
                block, delta = blocks[e["index"]], e["delta"]
                match delta["type"]:
                    case "text_delta":
                        block["text"] += delta["text"]
                    case "thinking_delta":
                        block["thinking"] += delta["thinking"]
                    case "signature_delta":
                        block["signature"] = delta["signature"]
                    case "input_json_delta":
                        inputs[e["index"]] = inputs.get(e["index"], "") + delta["partial_json"]
                    case other:
                        raise AssertionError(other)
            case "content_block_stop":
                if e["index"] in inputs:
                    blocks[e["index"]]["input"] = from_json(inputs[e["index"]], allow_partial=True)
            case "message_delta":
                message.update(e["delta"])
                message["usage"].update(e["usage"])
            case other:
                raise AssertionError(other)
    return message


MESSAGE_OPTIONS = [
    pytest.param(dict(display="full"), id="full"),
    pytest.param(dict(display="omitted"), id="omitted"),
    pytest.param(dict(display="none"), id="none"),
    pytest.param(dict(display="full", context_capped=True), id="context-capped"),
]


def message_builder(options: dict[str, Any]) -> MessageBuilder:
    return MessageBuilder("msg_abc", "claude-local", 20, stop_sequences=("END",), **options)


@pytest.mark.parametrize("options", MESSAGE_OPTIONS)
@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_message_stream_adds_up_to_the_body(s: Scenario, options: dict[str, Any]) -> None:
    frames = run_stream(message_builder(options).stream(), s)
    body = run_body(message_builder(options).body, s)
    ids = r"toolu_[0-9a-f]{24}"
    assert number_ids(message_from_stream(frames), ids) == number_ids(body, ids)


@pytest.mark.parametrize("options", MESSAGE_OPTIONS)
@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_message_stream_through_the_sdk_accumulator_is_the_body(
    s: Scenario, options: dict[str, Any]
) -> None:
    """What the anthropic SDK's own accumulator makes of the stream is the body, read by the SDK."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    for _, data in sse(run_stream(message_builder(options).stream(), s)):
        event = json.loads(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    body = Message.model_validate(run_body(message_builder(options).body, s))
    ids = r"toolu_[0-9a-f]{24}"
    final = Message.model_validate(snapshot.to_dict())
    assert number_ids(final.model_dump(exclude_none=True), ids) == number_ids(
        body.model_dump(exclude_none=True), ids
    )


# -- OpenAI Responses -----------------------------------------------------------


def without_bytes(entries: list[Body]) -> list[Body]:
    return [
        {
            **{k: v for k, v in e.items() if k != "bytes"},
            "top_logprobs": [
                {k: v for k, v in t.items() if k != "bytes"} for t in e["top_logprobs"]
            ],
        }
        for e in entries
    ]


def response_from_stream(frames: list[bytes]) -> Body:
    """
    The response a client builds from the events: each item as added,
    its content part as added, filled by the deltas, its status set when
    it is done; each C{.done} event must hold what the deltas made. The
    terminal event's response must hold the same items.
    """
    events = []
    for n, (name, data) in enumerate(sse(frames)):
        payload = json.loads(data)
        assert name == payload["type"] and payload.pop("sequence_number") == n
        events.append(payload)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    output: list[Body] = []
    for e in events[2:-1]:
        kind = e["type"].removeprefix("response.")
        item = output[e["output_index"]] if kind != "output_item.added" else {}
        text_event = kind.startswith(("output_text.", "reasoning_text.", "content_part.done"))
        part = item["content"][e["content_index"]] if text_event else {}
        match kind:
            case "output_item.added":
                assert e["output_index"] == len(output)
                output.append(copy.deepcopy(e["item"]))
            case "content_part.added":
                assert e["content_index"] == len(item["content"])
                item["content"].append(copy.deepcopy(e["part"]))
            case "output_text.delta":
                part["text"] += e["delta"]
                part["logprobs"] += e["logprobs"]
            case "reasoning_text.delta":
                part["text"] += e["delta"]
            case "function_call_arguments.delta":
                item["arguments"] += e["delta"]
            case "custom_tool_call_input.delta":
                item["input"] += e["delta"]
            case "output_text.done":
                assert (part["text"], part["logprobs"]) == (e["text"], without_bytes(e["logprobs"]))
                part["logprobs"] = e["logprobs"]
            case "reasoning_text.done":
                assert part["text"] == e["text"]
            case "content_part.done":
                assert part == e["part"]
            case "function_call_arguments.done":
                assert item["arguments"] == e["arguments"]
            case "custom_tool_call_input.done":
                assert item["input"] == e["input"]
            case "output_item.done":
                if "status" in item:
                    item["status"] = e["item"]["status"]
                assert item == e["item"]
            case other:
                raise AssertionError(other)
    last = events[-1]
    assert last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["output"] == output
    return dict(last["response"])


RESPONSE_OPTIONS = [
    pytest.param(dict(show_reasoning=True, logprobs=True), id="all"),
    pytest.param(dict(show_reasoning=False, logprobs=False), id="hidden"),
]


@pytest.mark.parametrize("options", RESPONSE_OPTIONS)
@pytest.mark.parametrize("s", [*SCENARIOS, CUSTOM], ids=lambda s: s.name)
def test_response_stream_adds_up_to_the_body(s: Scenario, options: dict[str, bool]) -> None:
    def make() -> ResponseBuilder:
        return ResponseBuilder(
            "resp_0123456789abcdef",
            {"model": "scripted", "instructions": None},
            options["show_reasoning"],
            tool_kinds={"apply_patch": "custom", "get_weather": "function"},
            logprobs=options["logprobs"],
            namespaces={"get_time": ("clock", "now")},
        )

    frames = run_stream(make().stream(), s)
    assert response_from_stream(frames) == run_body(make().body, s)


# -- the check itself ----------------------------------------------------------


def make_chat() -> ChatBuilder:
    return ChatBuilder("chatcmpl-abc", "scripted", True)


def make_completion() -> CompletionBuilder:
    return CompletionBuilder("cmpl-abc", "scripted", True)


def make_message() -> MessageBuilder:
    return message_builder({"display": "full"})


def make_response() -> ResponseBuilder:
    return ResponseBuilder("resp_0123456789abcdef", {}, True)


#: Each builder, its stream's reassembly, and the innermost object of its body.
DIALECTS: dict[str, tuple[Callable[[], Any], Callable[[list[bytes]], Body], Callable[[Body], Body]]]
DIALECTS = {
    "chat": (make_chat, chat_from_stream, lambda b: b["choices"][0]["message"]),
    "completion": (make_completion, completion_from_stream, lambda b: b["choices"][0]),
    "messages": (make_message, message_from_stream, lambda b: b["content"][0]),
    "responses": (make_response, response_from_stream, lambda b: b["output"][0]["content"][0]),
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_field_in_one_path_only_fails(dialect: str) -> None:
    """
    The comparison is of whole objects: a field the body has and the
    stream has not (even a null one, deep inside) makes them differ.
    """
    make, reassemble_stream, inner = DIALECTS[dialect]
    s = SCENARIOS[0]
    streamed = reassemble_stream(run_stream(make().stream(), s))
    body = run_body(make().body, s)
    assert streamed == body
    inner(body)["extra"] = None
    assert streamed != body
