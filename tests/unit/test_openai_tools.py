"""
Tool calls, structured output and logprobs in OpenAI chat completions (and
logprobs in completions) on the scripted engine: the chunks, validated
against the official SDK's own types, the tools and earlier calls reaching
the chat template, structured output, and 400s for bad tool input. What
every dialect does alike with calls (splits, malformed calls, one call
only, held arguments under the keepalive, a disconnect mid-call, the
grammar each choice builds) is in tests/unit/test_dialects.py.

Caveat: the scripted engine ignores the grammar it is given (the tests
assert which grammar was built); the real sampler is covered by
tests/integration/test_tools_sdk.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from ds4tw._engine.scripted import TOKEN_LOGPROB
from ds4tw.testing import Exchange, Reply

from . import tools
from .conftest import Rig, make_rig
from .dialects import chunks
from .tools import CALL, chat_tool

WEATHER = chat_tool(tools.WEATHER)
TIME = chat_tool(tools.TIME)

#: A Hermes/Qwen-style template that renders tools, calls and results itself.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}:"
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% if m.role == 'tool' %}[{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_deltas(ex: Exchange) -> list[dict[str, Any]]:
    return [
        tc
        for c in chunks(ex)
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    ]


def calls_of(ex: Exchange) -> dict[int, dict[str, str]]:
    """Tool calls reassembled the way the SDKs do it: by index."""
    calls: dict[int, dict[str, str]] = {}
    for d in tool_deltas(ex):
        call = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += d.get("id") or ""
        call["name"] += (d.get("function") or {}).get("name") or ""
        call["arguments"] += (d.get("function") or {}).get("arguments") or ""
    return calls


def finish_reason(ex: Exchange) -> str:
    return [c for c in chunks(ex) if c["choices"]][-1]["choices"][0]["finish_reason"]


def text_of(ex: Exchange) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks(ex) if c["choices"]
    )


def ask(rig: Rig, stream: bool = True, **kw: Any) -> Exchange:
    kw.setdefault("tools", [WEATHER, TIME])
    ex = rig.stream("weather?", **kw) if stream else rig.chat("weather?", **kw)
    rig.threads.run_until_idle()
    return ex


def test_one_call_streams_name_first_then_arguments_live() -> None:
    rig = make_rig([Reply.of("<tool_call>", '\n{"name": "get_weather", "arguments": ',
                             '{"city"', ': "Par', 'is"}', "}\n", "</tool_call>")])  # fmt: skip
    ex = ask(rig)
    deltas = tool_deltas(ex)
    head = deltas[0]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    # Fragments as the model wrote them: never re-serialised.
    assert [d["function"]["arguments"] for d in deltas[1:]] == ['{"city"', ': "Par', 'is"}']
    assert calls_of(ex)[0]["arguments"] == '{"city": "Paris"}'
    assert text_of(ex) == ""
    assert finish_reason(ex) == "tool_calls"
    assert "<tool_call>" not in ex.body.decode()


def test_a_call_after_reasoning() -> None:
    rig = make_rig([Reply.of("<think>", "Need the", " weather.", "</think>", "\n", CALL)])
    ex = ask(rig)
    reasoning = "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks(ex) if c["choices"]
    )
    assert reasoning == "Need the weather."
    assert calls_of(ex)[0]["name"] == "get_weather"
    assert text_of(ex) == ""


def test_non_streaming_body() -> None:
    rig = make_rig([Reply.of("Checking.\n", CALL, CALL.replace("get_weather", "get_time"))])
    ex = ask(rig, stream=False)
    body = ex.json()
    ChatCompletion.model_validate(body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in
            message["tool_calls"]] == [("get_weather", {"city": "Paris"}),
                                       ("get_time", {"city": "Paris"})]  # fmt: skip
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_only_calls_means_null_content() -> None:
    ex = ask(make_rig([Reply.of(CALL)]), stream=False)
    assert ex.json()["choices"][0]["message"]["content"] is None


def test_the_lazy_trigger_is_disarmed_inside_reasoning() -> None:
    rig = make_rig([Reply.of("<think>", "hmm", "</think>", "ok")], n_batch=100_000)
    ex = rig.stream("weather?", tools=[WEATHER])
    armed: list[tuple[str, bool]] = []

    def before(unit: tuple[str, int]) -> None:
        grammar = rig.engine.calls[0][1].grammar
        assert grammar is not None and grammar.armed is not None
        armed.append((unit[0], grammar.armed()))

    rig.engine.step_hook = before
    rig.threads.run_until_idle()
    # Asked before each token is sampled (the first by the prefill, in one
    # batch): armed until "<think>" opens the block, disarmed inside it,
    # armed again once it is closed.
    assert armed == [("prefill", True), ("token", False), ("token", False), ("token", True)]
    assert text_of(ex) == "ok"


def test_fallback_prompt_describes_tools_and_rewrites_history() -> None:
    rig = make_rig(["Sunny."])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
    ]
    ex = rig.http.post(
        "/v1/chat/completions", {"messages": messages, "tools": [WEATHER], "stream": True}
    )
    rig.threads.run_until_idle()
    assert ex.status == 200
    sent = rig.engine.template_messages[-1]
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Be brief.")
    assert "<tools>" in sent[0]["content"] and '"get_weather"' in sent[0]["content"]
    assert sent[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call>",
    }
    assert sent[3] == {
        "role": "user",
        "content": "<tool_response>\n12 C, rain\n</tool_response>",
    }


def test_a_tool_template_gets_tools_and_history_natively() -> None:
    rig = make_rig(["Sunny."], chat_template=TOOL_TEMPLATE)
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_9", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
    ]  # fmt: skip
    rig.http.post("/v1/chat/completions", {"messages": messages, "tools": [WEATHER]})
    rig.threads.run_until_idle()
    prompt = "".join(chr(t) for t in rig.engine.calls[0][0])
    assert "TOOLS:get_weather;" in prompt
    # Arguments reach the template as a mapping, as Hugging Face templates expect.
    assert '<tool_call>get_weather:{"city": "Oslo"}</tool_call>' in prompt
    assert "<|im_start|>tool\nrain[call_9]<|im_end|>" in prompt


def test_response_format_builds_a_json_grammar() -> None:
    rig = make_rig(['{"a": 1}'] * 3)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rig.chat(
        response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema}}
    )
    rig.threads.run_until_idle()
    grammar = rig.engine.calls[-1][1].grammar
    assert grammar is not None and grammar.triggers == () and '"\\"a\\""' in grammar.gbnf
    rig.chat(response_format={"type": "json_object"})
    rig.threads.run_until_idle()
    assert rig.engine.calls[-1][1].grammar is not None
    rig.chat(response_format={"type": "text"})
    rig.threads.run_until_idle()
    assert rig.engine.calls[-1][1].grammar is None


def test_structured_output_beside_tools_is_calls_or_the_answer() -> None:
    rig = make_rig(['{"a": 1}'])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    ask(rig, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    grammar = rig.engine.calls[-1][1].grammar
    assert grammar is not None and grammar.triggers == ()  # from the first token
    root = next(line for line in grammar.gbnf.splitlines() if line.startswith("root ::="))
    assert root.startswith("root ::= calls |") and "answer" in root


@pytest.mark.parametrize("stream", [True, False])
def test_chat_logprobs(stream: bool) -> None:
    rig = make_rig([Reply.of("Hel", "lo", "STO", "P", " x")])
    kw = {"logprobs": True, "top_logprobs": 2, "stop": ["STOP"]}
    ex = rig.stream(**kw) if stream else rig.chat(**kw)
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].logprobs == 2
    if stream:
        entries = [
            e
            for c in chunks(ex)
            if c["choices"] and c["choices"][0]["logprobs"]
            for e in c["choices"][0]["logprobs"]["content"]
        ]
    else:
        body = ex.json()
        ChatCompletion.model_validate(body)
        entries = body["choices"][0]["logprobs"]["content"]
    # The tokens of the stop sequence are not reported, like their text.
    assert [e["token"] for e in entries] == ["Hel", "lo"]
    for e in entries:
        assert e["logprob"] == TOKEN_LOGPROB
        assert e["bytes"] == list(e["token"].encode())
        assert len(e["top_logprobs"]) == 2
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
            (t["logprob"] for t in e["top_logprobs"]), reverse=True
        )


def test_no_logprobs_unless_asked() -> None:
    rig = make_rig(["Hi there."])
    ex = rig.stream()
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].logprobs is None
    assert all(c["choices"][0]["logprobs"] is None for c in chunks(ex) if c["choices"])


def test_completion_logprobs() -> None:
    rig = make_rig([Reply.of("a", "bc")])
    ex = rig.http.post("/v1/completions", {"prompt": "x", "logprobs": 1, "max_tokens": 5})
    rig.threads.run_until_idle()
    lp = ex.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "bc"]
    assert lp["token_logprobs"] == [TOKEN_LOGPROB, TOKEN_LOGPROB]
    assert lp["top_logprobs"] == [{"a": TOKEN_LOGPROB}, {"bc": TOKEN_LOGPROB}]
    assert lp["text_offset"] == [0, 1]


BAD_TOOL_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
        "tools.0.function.parameters",
        "not a valid JSON Schema",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "no tool named 'nope'",
    ),
    ({"tool_choice": "required"}, "tool_choice", "no tools are defined"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function", "defined twice"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nah"}}}},
        "response_format.json_schema.schema",
        "not a valid JSON Schema",
    ),
    ({"response_format": {"type": "xml"}}, "response_format", "does not match any"),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_404", "content": "r"},
            ]
        },
        "messages.1.tool_call_id",
        "no earlier assistant turn called",
    ),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
]


@pytest.mark.parametrize(("extra", "param", "fragment"), BAD_TOOL_REQUESTS)
def test_bad_tool_input_is_a_400_naming_the_field(
    extra: dict[str, Any], param: str, fragment: str
) -> None:
    rig = make_rig()
    payload = {"messages": [{"role": "user", "content": "x"}], **extra}
    ex = rig.http.post("/v1/chat/completions", payload)
    assert ex.status == 400, ex.body
    error = ex.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert rig.engine.calls == [] and not rig.threads.busy


def test_a_schema_part_that_cannot_be_expressed_is_served_and_named_once_in_the_log() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    grep = {
        "type": "function",
        "function": {
            "name": "grep_files",
            "parameters": {
                "type": "object",
                "properties": {"pattern": {"type": "string", "not": {"const": ""}}},
            },
        },
    }
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        rig = make_rig(["ok", "ok"])
        for _ in range(2):  # agents send the same tools every turn
            ex = ask(rig, stream=False, tools=[WEATHER, grep])
            assert ex.status == 200, ex.body
    finally:
        globalLogPublisher.removeObserver(logged.append)
    said = [formatEvent(e) for e in logged if "grammar loosened" in formatEvent(e)]
    assert said == [
        "grammar loosened where a schema cannot be expressed: "
        "tool 'grep_files': /properties/pattern: 'not' is not enforced"
    ]
