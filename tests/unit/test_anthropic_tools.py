"""
Tool use in the Anthropic dialect on the scripted engine: C{tool_use}
blocks streamed live (C{input_json_delta} per fragment the model writes)
and collected, C{stop_reason: tool_use}, tools and earlier calls and
results in the prompt (fallback system text, and a template with tool
support), a call cut by C{max_tokens}, C{output_config.format}, and
every 400. What every dialect does alike with calls (splits, malformed
calls, one call only, held arguments under the keepalive, a disconnect
mid-call, the grammar each C{tool_choice} builds) is in
tests/unit/test_dialects.py.

The scripted engine's ChatML template has no tool support, so the model's
calls are written in the Hermes syntax (the fallback parser's). Every
event and body is validated against the official SDK's types, and each
stream is also folded by the SDK's own accumulator.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message

from ds4tw._api import prompt as _prompt
from ds4tw._api.anthropic.schema import MessagesRequest
from ds4tw.testing import Exchange, Reply

from . import tools
from .conftest import Rig, make_rig
from .dialects import blocks
from .test_anthropic import (
    BASE,
    ENABLED,
    STREAM_EVENT,
    body,
    events,
    post,
    prompt_text,
    sequence,
    stream,
)
from .tools import anthropic_tool

WEATHER = anthropic_tool(tools.WEATHER)
TIME = anthropic_tool(tools.TIME)
TOOLS = [WEATHER, TIME]

PARIS = (
    "<tool_call>",
    "\n",
    '{"name": ',
    '"get_weather"',
    ', "arguments": ',
    '{"city": ',
    '"Paris"}',
    "}",
    "\n",
    "</tool_call>",
)
UTC = (
    "<tool_call>",
    '{"name": "get_time", ',
    '"arguments": ',
    '{"tz": "UTC"}',
    "}",
    "</tool_call>",
)


def tool_stream(rig: Rig, **kw: Any) -> Exchange:
    return stream(rig, **{"tools": TOOLS, **kw})


def tool_post(rig: Rig, **kw: Any) -> Exchange:
    return post(rig, **{"tools": TOOLS, **kw})


def final(ex: Exchange) -> Message:
    """The message as the SDK's own stream accumulator builds it."""
    snapshot: Any = None
    bufs: dict[int, bytes] = {}
    for e in events(ex):
        event = STREAM_EVENT.validate_python(e)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return Message.model_validate(snapshot.to_dict())


def partial_json(ex: Exchange, index: int) -> str:
    return "".join(
        e["delta"]["partial_json"]
        for e in events(ex)
        if e["type"] == "content_block_delta"
        and e["index"] == index
        and e["delta"]["type"] == "input_json_delta"
    )


def stop_reason(ex: Exchange) -> str:
    (delta,) = [e for e in events(ex) if e["type"] == "message_delta"]
    reason: str = delta["delta"]["stop_reason"]
    return reason


# -- golden event sequences ----------------------------------------------------


def test_golden_one_call() -> None:
    rig = make_rig([Reply.of(*PARIS)])
    ex = tool_stream(rig)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:tool_use",
        "content_block_delta:input_json_delta",
        "content_block_delta:input_json_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    evs = events(ex)
    start = evs[1]
    assert start["index"] == 0
    block = start["content_block"]
    assert block["id"].startswith("toolu_") and len(block["id"]) > len("toolu_")
    assert block == {"type": "tool_use", "id": block["id"], "name": "get_weather", "input": {}}
    # The fragments are the model's own JSON text, as it wrote it.
    assert [e["delta"]["partial_json"] for e in evs[2:4]] == ['{"city": ', '"Paris"}']
    assert evs[4] == {"type": "content_block_stop", "index": 0}
    assert evs[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert evs[-2]["usage"]["output_tokens"] == len(PARIS)
    # A message that is only a tool call has no (empty) text block.
    got = final(ex)
    assert [b.type for b in got.content] == ["tool_use"]
    assert got.content[0].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert got.stop_reason == "tool_use"
    assert ex.finished


def test_golden_two_parallel_calls() -> None:
    rig = make_rig([Reply.of(*PARIS, "\n", *UTC)])
    ex = tool_stream(rig)
    rig.threads.run_until_idle()
    assert blocks(ex) == [
        {
            "index": 0,
            "block": {"type": "tool_use", "name": "get_weather", "input": {}},
            "deltas": {"input_json_delta": '{"city": "Paris"}'},
            "stopped": True,
        },
        {
            "index": 1,
            "block": {"type": "tool_use", "name": "get_time", "input": {}},
            "deltas": {"input_json_delta": '{"tz": "UTC"}'},
            "stopped": True,
        },
        {"stop_reason": "tool_use"},
    ]
    ids = [e["content_block"]["id"] for e in events(ex) if e["type"] == "content_block_start"]
    assert len(set(ids)) == 2
    got = final(ex)
    assert [(b.name, b.input) for b in got.content] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "UTC"}),
    ]


def test_golden_text_then_a_call() -> None:
    rig = make_rig([Reply.of("Let me", " check.", *PARIS)])
    ex = tool_stream(rig)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:text",
        "content_block_delta:text_delta",
        "content_block_delta:text_delta",
        "content_block_stop",
        "content_block_start:tool_use",
        "content_block_delta:input_json_delta",
        "content_block_delta:input_json_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [e.get("index") for e in events(ex)[1:-2]] == [0] * 4 + [1] * 4
    got = final(ex)
    assert [b.type for b in got.content] == ["text", "tool_use"]
    assert got.content[0].text == "Let me check."  # type: ignore[union-attr]


def test_golden_a_call_after_thinking() -> None:
    rig = make_rig([Reply.of("<think>", "Weather", " tool.", "</think>", "\n\n", *PARIS)])
    ex = tool_stream(rig, thinking=ENABLED)
    rig.threads.run_until_idle()
    assert sequence(ex) == [
        "message_start",
        "content_block_start:thinking",
        "content_block_delta:thinking_delta",
        "content_block_delta:thinking_delta",
        "content_block_delta:signature_delta",
        "content_block_stop",
        "content_block_start:tool_use",
        "content_block_delta:input_json_delta",
        "content_block_delta:input_json_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    got = final(ex)
    assert [b.type for b in got.content] == ["thinking", "tool_use"]
    assert got.content[0].thinking == "Weather tool."  # type: ignore[union-attr]
    assert stop_reason(ex) == "tool_use"
    assert message_usage(ex)["output_tokens_details"] == {"thinking_tokens": 4}


def message_usage(ex: Exchange) -> dict[str, Any]:
    (delta,) = [e for e in events(ex) if e["type"] == "message_delta"]
    usage: dict[str, Any] = delta["usage"]
    return usage


# -- the prompt ----------------------------------------------------------------


def test_tools_reach_the_prompt_as_fallback_system_text() -> None:
    rig = make_rig()
    tool_post(rig, system="Be brief.")
    rig.threads.run_until_idle()
    (system, user) = rig.engine.template_messages[0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in system["content"]
    assert '"description": "The weather in a city."' in system["content"]
    assert json.dumps(WEATHER["input_schema"]) in system["content"]
    assert user == {"role": "user", "content": "hi"}


AGENT_TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and the time in UTC?"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "two tools", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "UTC"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Here you go."},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, cloudy"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "content": [{"type": "text", "text": "clock"}, {"type": "text", "text": "broke"}],
                "is_error": True,
            },
        ],
    },
]


def test_calls_and_results_become_hugging_face_messages() -> None:
    req = MessagesRequest.model_validate({**BASE, "messages": AGENT_TURNS, "tools": TOOLS})
    messages, prefill = req.template_messages()
    assert prefill == ""
    assert messages == [
        {"role": "user", "content": "Weather in Paris and the time in UTC?"},
        {
            "role": "assistant",
            "content": "Checking.",
            # The thinking block reaches the template (interleaved thinking).
            "reasoning_content": "two tools",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
                },
            ],
        },
        # Results first, in order, then the rest of the user's turn.
        {
            "role": "tool",
            "tool_call_id": "toolu_1",
            "name": "get_weather",
            "content": "18 C, cloudy",
        },
        {
            "role": "tool",
            "tool_call_id": "toolu_2",
            "name": "get_time",
            "content": "Error: clock\nbroke",
        },
        {"role": "user", "content": "Here you go."},
    ]


def test_calls_and_results_reach_a_template_without_tool_support() -> None:
    rig = make_rig(["It is 18 C."])
    ex = tool_post(rig, messages=AGENT_TURNS)
    rig.threads.run_until_idle()
    assert body(ex)["stop_reason"] == "end_turn"
    text = prompt_text(rig)
    assert (
        "<|im_start|>assistant\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C, cloudy\n</tool_response>\n"
        "<tool_response>\nError: clock\nbroke\n</tool_response>\nHere you go.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ) in text


#: A Hermes/Qwen-style template that renders C{tools}, C{tool_calls} and
#: role C{tool} itself.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>"
    "<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}"
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{% elif message.role == 'tool' %}<|im_start|>tool\n"
    "[{{ message.name }} {{ message.tool_call_id }}] {{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{{ message.content }}{% for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_tool_capable_template_renders_tools_calls_and_results_natively() -> None:
    rig = make_rig([Reply.of(*PARIS)], chat_template=TOOL_TEMPLATE)
    ex = tool_stream(rig, messages=AGENT_TURNS)
    rig.threads.run_until_idle()
    assert stop_reason(ex) == "tool_use"
    kwargs = rig.engine.template_kwargs[0]
    assert [t["function"]["name"] for t in kwargs["tools"]] == ["get_weather", "get_time"]
    assert kwargs["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    messages = rig.engine.template_messages[0]
    # No fallback system text: the template renders the tools itself.
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    text = prompt_text(rig)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n")
    assert '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\n[get_weather toolu_1] 18 C, cloudy<|im_end|>\n" in text
    assert "<|im_start|>tool\n[get_time toolu_2] Error: clock\nbroke<|im_end|>\n" in text
    assert "You may call one or more functions" not in text


def test_a_text_only_follow_up_after_results_is_merged_with_them() -> None:
    """Two user turns in a row stay one turn, results still first."""
    turns = [*AGENT_TURNS, {"role": "user", "content": "Thanks."}]
    req = MessagesRequest.model_validate({**BASE, "messages": turns, "tools": TOOLS})
    messages, _ = req.template_messages()
    assert messages[-1] == {"role": "user", "content": "Here you go.\n\nThanks."}
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]


def test_a_prefilled_assistant_turn_after_results_is_continued() -> None:
    rig = make_rig([Reply.of("18 C.")])
    turns = [*AGENT_TURNS, {"role": "assistant", "content": "In Paris it is"}]
    ex = tool_post(rig, messages=turns)
    rig.threads.run_until_idle()
    assert prompt_text(rig).endswith("<|im_start|>assistant\nIn Paris it is")
    assert body(ex)["content"] == [{"type": "text", "text": "18 C."}]


# -- non-streaming ---------------------------------------------------------------


def test_non_streaming_tool_use_blocks() -> None:
    rig = make_rig([Reply.of(*PARIS), Reply.of("Let me", " check.", *PARIS, "\n", *UTC)])
    only = tool_post(rig)
    both = tool_post(rig)
    rig.threads.run_until_idle()
    got = body(only)
    (block,) = got["content"]
    assert block["id"].startswith("toolu_")
    assert block == {
        "type": "tool_use",
        "id": block["id"],
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert (got["stop_reason"], got["stop_sequence"]) == ("tool_use", None)
    got = body(both)
    assert [(b["type"], b.get("text"), b.get("input")) for b in got["content"]] == [
        ("text", "Let me check.", None),
        ("tool_use", None, {"city": "Paris"}),
        ("tool_use", None, {"tz": "UTC"}),
    ]


def test_non_streaming_call_after_thinking() -> None:
    rig = make_rig([Reply.of("<think>", "hmm", "</think>", *UTC)])
    ex = tool_post(rig, thinking=ENABLED)
    rig.threads.run_until_idle()
    got = body(ex)
    assert [b["type"] for b in got["content"]] == ["thinking", "tool_use"]
    assert got["content"][1]["input"] == {"tz": "UTC"}


@pytest.mark.parametrize("streaming", [True, False])
def test_a_call_cut_by_max_tokens(streaming: bool) -> None:
    # Cut inside the arguments, after '{"city": ' and part of the value.
    pieces = (*PARIS[:6], '"Par', 'is"}', "}", "</tool_call>")
    rig = make_rig([Reply.of(*pieces)])
    ex = tool_post(rig, stream=streaming, max_tokens=7)
    rig.threads.run_until_idle()
    if streaming:
        assert sequence(ex)[-5:] == [
            "content_block_delta:input_json_delta",
            "content_block_delta:input_json_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert partial_json(ex, 0) == '{"city": "Par'
        assert stop_reason(ex) == "max_tokens"
        assert final(ex).content[0].type == "tool_use"
    else:
        got = body(ex)
        assert got["stop_reason"] == "max_tokens"
        # What of the JSON parses is kept; the cut string is dropped.
        (block,) = got["content"]
        assert (block["type"], block["name"], block["input"]) == ("tool_use", "get_weather", {})


def test_a_cut_call_keeps_its_complete_fields() -> None:
    pieces = ("<tool_call>", '{"name": "get_time", "arguments": {"tz": "UTC", ', '"x": 1', "}}")
    rig = make_rig([Reply.of(*pieces)])
    ex = tool_post(rig, max_tokens=3)
    rig.threads.run_until_idle()
    assert body(ex)["content"][0]["input"] == {"tz": "UTC", "x": 1}


# -- count_tokens and structured output --------------------------------------------


def test_count_tokens_counts_the_tools() -> None:
    rig = make_rig()
    plain = {"model": "m", "messages": BASE["messages"]}
    without = rig.http.post("/v1/messages/count_tokens", plain).json()["input_tokens"]
    ex = rig.http.post("/v1/messages/count_tokens", {**plain, "tools": TOOLS})
    with_tools = ex.json()["input_tokens"]
    assert with_tools > without + len(json.dumps(WEATHER["input_schema"]))
    none = {**plain, "tools": TOOLS, "tool_choice": {"type": "none"}}
    assert rig.http.post("/v1/messages/count_tokens", none).json()["input_tokens"] == without
    started = tool_stream(rig)
    assert events(started)[0]["message"]["usage"]["input_tokens"] == with_tools


def test_count_tokens_builds_no_grammar(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing is sampled: Claude Code counts its whole tool list often.
    built: list[Any] = []
    monkeypatch.setattr(_prompt._GRAMMARS, "_cached", lambda *a: built.append(a))
    rig = make_rig()
    payload = {"model": "m", "messages": BASE["messages"], "tools": TOOLS}
    ex = rig.http.post("/v1/messages/count_tokens", payload)
    assert ex.status == 200 and ex.json()["input_tokens"] > 0
    assert built == []


#: Claude Code 2.1's Workflow tool property (no "type": any JSON value),
#: which once made its first request and every count_tokens a 400.
WORKFLOW = {
    "name": "Workflow",
    "description": "Run a workflow script.",
    "input_schema": {
        "type": "object",
        "properties": {
            "script": {"type": "string"},
            "args": {
                "description": "Optional input value exposed to the script as the global args"
            },
        },
        "required": ["script"],
    },
}


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_tool_property_without_a_type_is_served(route: str) -> None:
    rig = make_rig([Reply.of("ok")])
    ex = rig.http.post(route, {**BASE, "tools": [WEATHER, WORKFLOW]})
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    if route == "/v1/messages":
        grammar = rig.engine.calls[0][1].grammar
        assert grammar is not None and "Workflow" in grammar.gbnf


def test_server_tools_are_left_out_and_the_rest_served() -> None:
    rig = make_rig([Reply.of("ok")])
    web = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    ex = rig.http.post("/v1/messages", {**BASE, "tools": [web, WEATHER]})
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    prompt = "".join(chr(t) for t in rig.engine.calls[0][0])
    assert "get_weather" in prompt and "web_search" not in prompt


def test_count_tokens_counts_calls_and_results() -> None:
    rig = make_rig()
    payload = {"model": "m", "messages": AGENT_TURNS, "tools": TOOLS}
    counted = rig.http.post("/v1/messages/count_tokens", payload).json()["input_tokens"]
    ex = tool_stream(rig, messages=AGENT_TURNS)
    assert events(ex)[0]["message"]["usage"]["input_tokens"] == counted


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("streaming", [True, False])
def test_output_config_format_constrains_the_reply(streaming: bool) -> None:
    rig = make_rig([Reply.of('{"answer"', ": 4}")])
    ex = post(
        rig, stream=streaming, output_config={"format": {"type": "json_schema", "schema": SCHEMA}}
    )
    rig.threads.run_until_idle()
    grammar = rig.engine.calls[0][1].grammar
    assert grammar is not None and grammar.triggers == ()
    assert "answer" in grammar.gbnf
    if streaming:
        assert final(ex).content[0].text == '{"answer": 4}'  # type: ignore[union-attr]
    else:
        assert body(ex)["content"] == [{"type": "text", "text": '{"answer": 4}'}]


def test_output_config_format_with_tools_that_are_off() -> None:
    rig = make_rig([Reply.of('{"answer": 4}')])
    fmt = {"format": {"type": "json_schema", "schema": SCHEMA}}
    ex = tool_post(rig, output_config=fmt, tool_choice={"type": "none"})
    rig.threads.run_until_idle()
    assert body(ex)["content"] == [{"type": "text", "text": '{"answer": 4}'}]
    grammar = rig.engine.calls[0][1].grammar
    assert grammar is not None and "get_weather" not in grammar.gbnf


# -- errors --------------------------------------------------------------------


def _req(**kw: Any) -> dict[str, Any]:
    return {**BASE, **kw}


def _turns(*messages: dict[str, Any]) -> dict[str, Any]:
    return _req(messages=list(messages))


ASKED = {"role": "user", "content": "weather?"}
CALLED = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
}


def _result(**kw: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", **kw}]}


BAD_TOOL_REQUESTS: list[tuple[dict[str, Any], str]] = [
    *[
        (
            _req(tools=[WEATHER, {"type": t, "name": n}]),
            f"tools.1.type: tools of type {t!r} are not supported",
        )
        # Anthropic-defined client tools: their schemas are Anthropic's.
        for t, n in [
            ("bash_20250124", "bash"),
            ("text_editor_20250728", "str_replace_based_edit_tool"),
            ("computer_20250124", "computer"),
        ]
    ],
    (
        _req(
            tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
            tool_choice={"type": "tool", "name": "web_search"},
        ),
        "tool_choice.name: 'web_search' is one of Anthropic's server tools",
    ),
    (_req(tools=[{"name": "f"}]), "tools.0.input_schema: Field required"),
    (
        _req(tools=[{"name": "f", "input_schema": {"type": "object", "properties": 5}}]),
        "tools.0.input_schema: not a valid JSON Schema at properties",
    ),
    (_req(tools=[{"name": "f", "input_schema": "object"}]), "tools.0.input_schema: a JSON Schema"),
    (
        _req(tools=[{"name": "f", "input_schema": {"type": "string"}}]),
        "tools.0.input_schema.type: a tool's input_schema must have type 'object'",
    ),
    (_req(tools=[WEATHER, TIME, WEATHER]), "tools.2: the tool name 'get_weather' is defined twice"),
    (_req(tools=[{**WEATHER, "name": ""}]), "tools.0: a tool needs a name"),
    (
        _req(tools=TOOLS, tool_choice={"type": "tool", "name": "get_news"}),
        "tool_choice: no tool named 'get_news' is defined (tools: 'get_weather', 'get_time')",
    ),
    (_req(tool_choice={"type": "any"}), "tool_choice: a tool call is required but no tools"),
    (_req(tools=TOOLS, tool_choice={"type": "tool"}), "tool_choice.tool.name: Field required"),
    (_req(tools=TOOLS, tool_choice={"type": "sometimes"}), "tool_choice: Input tag 'sometimes'"),
    (
        _turns(ASKED, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}),
        "messages.1.content.0.tool_use_id: this tool result answers 'x', which no earlier",
    ),
    (
        _turns(_result(content="18 C"), CALLED, _result(content="18 C")),
        "messages.0.content.0.tool_use_id: this tool result answers 'toolu_1'",
    ),
    (
        _turns(
            ASKED, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "1"}]}
        ),
        "messages.1.content.0: a tool_result block cannot appear in a assistant turn",
    ),
    (
        _turns(
            {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
        ),
        "messages.0.content.0: a tool_use block cannot appear in a user turn",
    ),
    (
        _turns(
            ASKED,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]},
            ASKED,
        ),
        "messages.1.content.0.input: a tool_use block needs an 'input' object",
    ),
    (
        _turns(
            ASKED,
            {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]},
            ASKED,
        ),
        "messages.1.content.0.id: a tool_use block needs an 'id'",
    ),
    (
        _turns(ASKED, CALLED),
        "messages.1: tool_use ids were found without tool_result blocks after them: toolu_1",
    ),
    (
        _turns(ASKED, CALLED, _result(content=[{"type": "image", "source": {}}])),
        "messages.2.content.0.content.0: content blocks of type 'image' are not supported",
    ),
    (
        _turns(
            ASKED, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]}, ASKED
        ),
        "messages.1.content.0: content blocks of type 'server_tool_use' are not supported",
    ),
    (
        _req(output_config={"format": {"type": "json_schema", "schema": {"type": 5}}}),
        "output_config.format.schema: not a valid JSON Schema",
    ),
    (
        _req(output_config={"format": {"type": "json_schema"}}),
        "output_config.format.schema: Field required",
    ),
    (
        _req(output_config={"format": {"type": "xml"}}),
        "output_config.format.type: Input should be 'json_schema'",
    ),
]


@pytest.mark.parametrize(("payload", "fragment"), BAD_TOOL_REQUESTS)
def test_invalid_tool_requests_get_anthropic_400s_and_queue_nothing(
    payload: dict[str, Any], fragment: str
) -> None:
    rig = make_rig()
    for streaming in (False, True):
        ex = rig.http.post("/v1/messages", {**payload, "stream": streaming})
        assert ex.status == 400
        assert ex.header("content-type") == "application/json"
        got = ex.json()
        assert got == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": got["error"]["message"]},
        }
        assert fragment in got["error"]["message"]
    # count_tokens checks the conversation and the tools the same way.
    if "output_config" not in payload:
        counted = {k: v for k, v in payload.items() if k != "max_tokens"}
        ex = rig.http.post("/v1/messages/count_tokens", counted)
        assert ex.status == 400 and fragment in ex.json()["error"]["message"]
    assert rig.engine.calls == [] and rig.engine.template_kwargs == []
    assert not rig.threads.busy and rig.server.worker.queue_depth == 0


def test_tool_schemas_are_checked_once_not_every_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    # The metaschema check runs on the reactor thread: Claude Code's twelve
    # tools took 56 ms a request before it was cached. A bad schema is
    # still a 400 every time.
    from jsonschema import Draft202012Validator

    from ds4tw._formats.tools import spec

    spec._schema_problem.cache_clear()
    checked: list[Any] = []
    real = Draft202012Validator.check_schema
    monkeypatch.setattr(
        Draft202012Validator, "check_schema", lambda s: (checked.append(s), real(s))[1]
    )
    rig = make_rig()
    for _ in range(3):
        ex = rig.http.post("/v1/messages/count_tokens", {**BASE, "tools": [WEATHER, WORKFLOW]})
        assert ex.status == 200, ex.body
    assert len(checked) == 2  # one per distinct schema
    bad = {"name": "f", "input_schema": {"type": "object", "properties": 5}}
    for _ in range(2):
        ex = rig.http.post("/v1/messages/count_tokens", {**BASE, "tools": [bad]})
        assert ex.status == 400 and "not a valid JSON Schema" in ex.body.decode()
