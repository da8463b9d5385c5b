"""
Tools, structured output and logprobs in the OpenAI Responses dialect on
the scripted engine: golden event sequences for function and custom
(free-form) tool calls, every event and body validated against the
installed C{openai} SDK's models; a custom call's input held until it is
decoded while the keepalive covers the silence; a custom call split at
every character; the grammars of custom and allowed-tools choices;
logprobs; a Codex-shaped multi-turn conversation reaching the prompt in
order; and the 400s, before anything is queued. What every dialect does
alike with calls (splits, malformed calls, one call only, a disconnect
mid-call, the common choices' grammars) is in tests/unit/test_dialects.py.

The scripted engine's ChatML template has no tool support, so the tools
reach the prompt by the Hermes fallback and the model writes
C{<tool_call>{"name": ..., "arguments": {...}}</tool_call>}.

Caveat: the scripted engine ignores the grammar it is given (the tests
assert which grammar was built); the real sampler is covered by
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from openai.types.responses import Response
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw._engine.scripted import TOKEN_LOGPROB
from ds4tw._formats.tools import spec
from ds4tw.testing import Exchange, Reply

from . import tools
from .conftest import Rig, make_rig
from .dialects import collapsed
from .test_responses import (
    MESSAGE_DONE,
    MESSAGE_OPEN,
    OPEN,
    body,
    events,
    final,
    post,
    prompt_text,
    types,
)
from .tools import CALL, chars, responses_tool

SHELL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command and returns its output.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string"},
            "timeout_ms": {"type": "number"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
WEATHER = responses_tool(tools.WEATHER)
LARK = 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\n'
#: Codex's apply_patch as it sends it to GPT-5-family models: a custom tool.
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files",
    "format": {"type": "grammar", "syntax": "lark", "definition": LARK},
}
TOOLS = [WEATHER, SHELL, APPLY_PATCH]

PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+Hello\n*** End Patch\n"
PATCH_CALL = (
    "<tool_call>\n"
    + json.dumps({"name": "apply_patch", "arguments": {"input": PATCH}})
    + "\n</tool_call>"
)

FUNCTION_CALL = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


def ask(rig: Rig, stream: bool = True, **kw: Any) -> Exchange:
    kw.setdefault("tools", TOOLS)
    kw.setdefault("input", "weather in Paris?")
    ex = post(rig, stream=stream, **kw)
    rig.threads.run_until_idle()
    return ex


def call_items(response: Response) -> list[tuple[str, str, str]]:
    out = []
    for item in response.output:
        if item.type == "function_call":
            out.append(("function_call", item.name, item.arguments))
        elif item.type == "custom_tool_call":
            out.append(("custom_tool_call", item.name, item.input))
    return out


# -- golden sequences ------------------------------------------------------------


def test_golden_one_function_call() -> None:
    rig = make_rig([Reply.of("<tool_call>", '\n{"name": "get_weather", "arguments": ',
                             '{"city"', ': "Par', 'is"}', "}\n", "</tool_call>")])  # fmt: skip
    ex = ask(rig)
    assert types(ex) == [
        *OPEN,
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    evs = events(ex)
    added = evs[2]["item"]
    assert added["type"] == "function_call" and added["id"].startswith("fc_")
    assert added["call_id"].startswith("call_") and added["name"] == "get_weather"
    assert added["arguments"] == "" and added["status"] == "in_progress"
    # Fragments as the model wrote them: never re-serialised.
    assert [e["delta"] for e in evs[3:6]] == ['{"city"', ': "Par', 'is"}']
    assert all(e["item_id"] == added["id"] and e["output_index"] == 0 for e in evs[3:7])
    assert evs[6]["arguments"] == '{"city": "Paris"}'
    done = evs[7]["item"]
    assert done["status"] == "completed" and done["arguments"] == '{"city": "Paris"}'
    assert done["call_id"] == added["call_id"]
    response = final(ex)
    assert response.status == "completed"
    assert call_items(response) == [("function_call", "get_weather", '{"city": "Paris"}')]
    assert "<tool_call>" not in ex.body.decode()


def test_golden_two_parallel_calls() -> None:
    second = CALL.replace("Paris", "Rome")
    ex = ask(make_rig([Reply.of(CALL, "\n", second)]))
    assert types(ex) == [*OPEN, *FUNCTION_CALL, *FUNCTION_CALL, "response.completed"]
    response = final(ex)
    assert call_items(response) == [
        ("function_call", "get_weather", '{"city": "Paris"}'),
        ("function_call", "get_weather", '{"city": "Rome"}'),
    ]
    first, other = response.output
    assert first.type == other.type == "function_call"
    assert first.id != other.id and first.call_id != other.call_id


def test_golden_text_then_a_call() -> None:
    ex = ask(make_rig([Reply.of("Let me", " look.\n", CALL)]))
    assert types(ex) == [
        *OPEN,
        *MESSAGE_OPEN,
        *["response.output_text.delta"] * 2,
        *MESSAGE_DONE,  # the message is closed before the call opens
        *FUNCTION_CALL,
        "response.completed",
    ]
    response = final(ex)
    assert [i.type for i in response.output] == ["message", "function_call"]
    assert response.output_text == "Let me look.\n"
    assert events(ex)[-2]["output_index"] == 1


def test_golden_a_call_after_reasoning() -> None:
    ex = ask(make_rig([Reply.of("<think>", "Need the", " weather.", "</think>", "\n", CALL)]))
    assert types(ex) == [
        *OPEN,
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * 2,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *FUNCTION_CALL,
        "response.completed",
    ]
    response = final(ex)
    assert [i.type for i in response.output] == ["reasoning", "function_call"]


def test_golden_custom_tool_call_is_held_until_decoded_under_the_keepalive() -> None:
    """
    Codex's apply_patch: the model writes the patch as a JSON string, which
    must be decoded before any of it can go out; the decode keepalive
    covers the silence, and the whole input arrives at the end.
    """
    head = '<tool_call>\n{"name": "apply_patch", "arguments": {"input": "'
    encoded = json.dumps(PATCH)[1:-1]
    pieces = [head, encoded[:20], encoded[20:], '"}}\n', "</tool_call>"]
    rig = make_rig([Reply.of(*pieces)], keepalive=5, n_batch=100_000)
    ex = post(rig, stream=True, input="add hello.txt", tools=TOOLS)
    rig.threads.step(1)  # prefill, in one batch, which samples the head
    rig.threads.step(2)  # the encoded patch
    assert types(ex) == OPEN  # nothing of the call yet
    before = len(ex.comments())
    rig.clock.advance(5)
    assert ex.comments()[before:] == ["decode"]
    assert types(ex) == OPEN
    rig.threads.run_until_idle()
    assert types(ex) == [
        *OPEN,
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.completed",
    ]
    evs = events(ex)
    added = evs[2]["item"]
    assert added["type"] == "custom_tool_call" and added["name"] == "apply_patch"
    assert added["input"] == "" and added["call_id"].startswith("call_")
    assert evs[3]["delta"] == PATCH and evs[4]["input"] == PATCH
    assert evs[5]["item"]["input"] == PATCH
    assert call_items(final(ex)) == [("custom_tool_call", "apply_patch", PATCH)]


def test_non_streaming_body_has_the_call_items() -> None:
    ex = ask(make_rig([Reply.of("Checking.\n", CALL, PATCH_CALL)]), stream=False)
    response = body(ex)
    assert [i.type for i in response.output] == ["message", "function_call", "custom_tool_call"]
    assert response.output_text == "Checking.\n"
    assert call_items(response)[1:] == [("custom_tool_call", "apply_patch", PATCH)]
    assert response.output[1].status == "completed"  # type: ignore[union-attr]


def test_streamed_and_non_streamed_responses_agree() -> None:
    reply = Reply.of("<think>", "Hm.", "</think>", "Checking.\n", CALL, PATCH_CALL)
    streamed = final(ask(make_rig([reply])))
    plain = body(ask(make_rig([reply]), stream=False))
    strip = lambda r: re.sub(  # noqa: E731
        r"[0-9a-f]{32}|[0-9a-f]{20}|\"(created|completed)_at\": ?\d+(\.\d+)?",
        "",
        r.model_dump_json(),
    )
    assert strip(streamed) == strip(plain)


# -- a custom call split -------------------------------------------------------


TWO = f"Let me look.\n{CALL}\n{PATCH_CALL}"


def test_a_custom_call_split_at_every_character_gives_the_same_events() -> None:
    # Function calls split anywhere, in every dialect: tests/unit/test_dialects.py.
    whole = collapsed(ask(make_rig([Reply.of(TWO)])))
    split = collapsed(ask(make_rig([chars(TWO)])))
    assert split == whole
    assert [e["type"] for e in whole].count("response.output_item.done") == 3


# -- grammars ---------------------------------------------------------------------


def test_custom_and_allowed_tools_choices_build_their_grammars() -> None:
    # "auto", "required", a named function and "none": tests/unit/test_dialects.py.
    rig = make_rig([Reply.of(CALL)] * 3)
    ask(rig, tool_choice="required")
    forced = rig.engine.calls[-1][1].grammar
    assert forced is not None and forced.triggers == ()
    assert all(n in forced.gbnf for n in ("get_weather", "shell", "apply_patch"))

    ask(rig, tool_choice={"type": "custom", "name": "apply_patch"})
    custom = rig.engine.calls[-1][1].grammar
    assert custom is not None and custom.triggers == () and "apply_patch" in custom.gbnf

    ask(
        rig,
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "get_weather"}],
        },
    )
    allowed = rig.engine.calls[-1][1].grammar
    assert allowed is not None and allowed.triggers == ()
    assert "get_weather" in allowed.gbnf and "shell" not in allowed.gbnf


def test_text_format_json_schema_builds_a_grammar() -> None:
    rig = make_rig(['{"a": 1}'] * 3)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
    ex = post(rig, text={"format": fmt})
    rig.threads.run_until_idle()
    grammar = rig.engine.calls[-1][1].grammar
    assert grammar is not None and grammar.triggers == () and '"\\"a\\""' in grammar.gbnf
    response = body(ex)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.model_dump(by_alias=True, exclude_none=True) == fmt
    post(rig, text={"format": {"type": "json_object"}})
    rig.threads.run_until_idle()
    assert rig.engine.calls[-1][1].grammar is not None
    post(rig, text={"format": {"type": "text"}})
    rig.threads.run_until_idle()
    assert rig.engine.calls[-1][1].grammar is None


def test_tools_and_choice_are_echoed() -> None:
    choice = {"type": "function", "name": "get_weather"}
    response = body(ask(make_rig([Reply.of(CALL)]), stream=False, tool_choice=choice))
    assert [t.model_dump(exclude_none=True) for t in response.tools] == [
        {k: v for k, v in t.items() if v is not None} for t in TOOLS
    ]
    assert response.tool_choice.model_dump() == choice  # type: ignore[union-attr]
    assert response.top_logprobs is None


def test_custom_tool_grammar_reaches_the_prompt() -> None:
    rig = make_rig(["ok"])
    ask(rig, tools=[APPLY_PATCH])
    prompt = prompt_text(rig)
    assert "apply_patch" in prompt and "lark grammar" in prompt
    assert "begin_patch hunk+ end_patch" in prompt


# -- logprobs ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_logprobs_when_included(stream: bool) -> None:
    rig = make_rig([Reply.of("Hel", "lo")])
    ex = post(rig, stream=stream, include=["message.output_text.logprobs"], top_logprobs=2)
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].logprobs == 2
    if stream:
        deltas = [e for e in events(ex) if e["type"] == "response.output_text.delta"]
        streamed = [lp for e in deltas for lp in e["logprobs"]]
        assert [lp["token"] for lp in streamed] == ["Hel", "lo"]
        assert all(len(lp["top_logprobs"]) == 2 for lp in streamed)
        done = next(e for e in events(ex) if e["type"] == "response.output_text.done")
        assert [lp["token"] for lp in done["logprobs"]] == ["Hel", "lo"]
        response = final(ex)
    else:
        response = body(ex)
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert [lp.token for lp in part.logprobs] == ["Hel", "lo"]
    for lp in part.logprobs:
        assert lp.logprob == TOKEN_LOGPROB and lp.bytes == list(lp.token.encode())
        tops = [t.logprob for t in lp.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True)
    assert response.top_logprobs == 2


def test_no_logprobs_unless_included() -> None:
    rig = make_rig(["Hi there."])
    ex = post(rig, stream=True, top_logprobs=0)
    rig.threads.run_until_idle()
    assert rig.engine.calls[0][1].logprobs is None
    assert all(
        e["logprobs"] == [] for e in events(ex) if e["type"].startswith("response.output_text")
    )
    part = final(ex).output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs == []


# -- the conversation -----------------------------------------------------------------


def test_codex_shaped_conversation_renders_into_the_prompt_in_order() -> None:
    """
    The items Codex sends back each turn (codex-rs/protocol/src/models.rs,
    ResponseItem): messages with input_text / output_text parts, reasoning,
    function_call + function_call_output, custom_tool_call +
    custom_tool_call_output.
    """
    rig = make_rig(["Done."])
    items = [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "<permissions>ask</permissions>"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Add hello.txt, then list files."}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                          "text": "SECRET THOUGHT"}],
         "encrypted_content": None},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Adding it."}]},
        {"type": "custom_tool_call", "status": "completed", "call_id": "call_p",
         "name": "apply_patch", "input": PATCH},
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Success. A hello.txt"},
        {"type": "function_call", "name": "shell", "call_id": "call_s",
         "arguments": '{"command": ["ls"]}'},
        {"type": "function_call", "name": "shell", "call_id": "call_t",
         "arguments": '{"command": ["pwd"]}'},
        {"type": "function_call_output", "call_id": "call_s", "output": "hello.txt"},
        {"type": "function_call_output", "call_id": "call_t",
         "output": [{"type": "input_text", "text": "/work"}]},
    ]  # fmt: skip
    ex = post(rig, instructions="You are Codex.", input=items, tools=TOOLS)
    rig.threads.run_until_idle()
    assert body(ex).output_text == "Done."
    prompt = prompt_text(rig)
    assert "SECRET THOUGHT" not in prompt
    order = [
        "<|im_start|>system\nYou are Codex.",
        "# Tools",  # the fallback's tool instructions join the first system message
        "<|im_start|>system\n<permissions>ask</permissions>",
        "<|im_start|>user\nAdd hello.txt",
        "<|im_start|>assistant\nAdding it.\n<tool_call>\n"
        + json.dumps({"name": "apply_patch", "arguments": {"input": PATCH}}),
        "<|im_start|>user\n<tool_response>\nSuccess. A hello.txt\n</tool_response>",
        # Two consecutive calls: one assistant turn.
        '<|im_start|>assistant\n<tool_call>\n{"name": "shell", "arguments": {"command": ["ls"]}}'
        '\n</tool_call>\n<tool_call>\n{"name": "shell", "arguments": {"command": ["pwd"]}}',
        "<tool_response>\nhello.txt\n</tool_response>\n<tool_response>\n/work\n</tool_response>",
    ]
    at = [prompt.find(s) for s in order]
    assert -1 not in at, [s for s, i in zip(order, at, strict=True) if i == -1]
    assert at == sorted(at), prompt
    assert prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_conversation_reaches_the_template_as_hugging_face_messages() -> None:
    rig = make_rig(["ok"])
    items = [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "name": "shell", "call_id": "c1", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "out"},
    ]
    post(rig, input=items, tools=TOOLS, tool_choice="none")
    rig.threads.run_until_idle()
    messages = rig.engine.template_messages[-1]
    assert messages[1]["role"] == "assistant"
    assert "<tool_call>" in messages[1]["content"]  # the fallback writes calls as text
    assert messages[2]["role"] == "user" and "<tool_response>" in messages[2]["content"]


# -- 400s -----------------------------------------------------------------------------

HOSTED = (
    "web_search",
    "web_search_preview",
    "file_search",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
)

BAD: list[tuple[dict[str, Any], str, str]] = [
    *(
        (
            {"tools": [WEATHER, {"type": kind}], "tool_choice": {"type": kind}},
            "tool_choice.type",
            f"{kind!r} is a tool OpenAI hosts",
        )
        for kind in HOSTED
    ),
    (
        {"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "web_search"}]}]},
        "tools.0.tools.0.type",
        "a namespace holds only 'function' and 'custom' tools",
    ),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": []}]}, "tools.0.tools", "at least 1"),
    ({"tools": [WEATHER, {"type": "banana"}]}, "tools.1.type", "'banana' are not supported"),
    ({"tools": ["shell"]}, "tools.0", "expected a tool object"),
    ({"tools": [{"type": "function"}]}, "tools.0.name", "Field required"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools.0.name", "should match pattern"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1", "defined twice"),
    (
        {"tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]},
        "tools.0.parameters",
        "not a valid JSON Schema",
    ),
    (
        {
            "tools": [
                {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "ebnf", "definition": "x"}}
            ]
        },
        "tools.0.format.syntax",
        "Input should be",
    ),
    ({"tool_choice": "required"}, "tool_choice", "no tools are defined"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "expected 'auto'"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
        "tool_choice",
        "no tool named 'nope'",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "custom", "name": "get_weather"}},
        "tool_choice",
        "is a function tool, not a custom tool",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "banana"}},
        "tool_choice.type",
        "not supported",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function"}},
        "tool_choice.name",
        "Field required",
    ),
    (
        {
            "tools": [WEATHER],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "zzz"}],
            },
        },
        "tool_choice.tools.0",
        "no tool named 'zzz'",
    ),
    (
        {"text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "nah"}}}},
        "text.format.schema",
        "not a valid JSON Schema",
    ),
    ({"text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema", "required"),
    (
        {"include": ["message.output_text.logprobs"], "top_logprobs": 21},
        "top_logprobs",
        "less than or equal to 20",
    ),
    ({"top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
    (
        {"input": [{"type": "function_call_output", "call_id": "c404", "output": "4"}]},
        "input.0.call_id",
        "no earlier assistant turn called",
    ),
    (
        {
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "custom_tool_call_output", "call_id": "c2", "output": "x"},
            ]
        },
        "input.1.call_id",
        "'c2', which no earlier",
    ),
    (
        {"input": [{"type": "function_call", "call_id": "c1", "arguments": "{}"}]},
        "input.0.name",
        "Field required",
    ),
    (
        {"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": {}}]},
        "input.0.arguments",
        "valid string",
    ),
    (
        {"input": [{"type": "custom_tool_call", "call_id": "c1", "name": "f"}]},
        "input.0.input",
        "Field required",
    ),
    (
        {
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_image", "image_url": "data:,"}],
                },
            ]
        },
        "input.1.output.0.type",
        "'input_image' is not supported",
    ),
    *(
        ({"input": [{"type": kind}]}, "input.0.type", f"{kind!r} are not supported")
        for kind in ("local_shell_call", "web_search_call", "item_reference", "mcp_call")
    ),
]


@pytest.mark.parametrize(("extra", "param", "fragment"), BAD)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_tool_requests_get_openai_400s_and_queue_nothing(
    extra: dict[str, Any], param: str, fragment: str, stream: bool
) -> None:
    rig = make_rig()
    payload = {"model": "scripted", "input": "x", **extra}
    if stream:
        payload["stream"] = True
    ex = rig.http.post("/v1/responses", payload)
    assert ex.status == 400, ex.body
    error = ex.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fragment in error["message"], error["message"]
    assert rig.engine.calls == [] and not rig.threads.busy
    assert rig.server.worker.queue_depth == 0


# -- Codex's namespace tools and the hosted tools it sends -------------------------

#: Codex's default tool list carries these two beside its function tools
#: (captured from codex exec 0.17x; tests/agents/fixtures has the whole
#: request): a namespace of plain functions and a hosted web search.
SPAWN = {
    "type": "function",
    "name": "spawn_agent",
    "description": "Start a sub-agent.",
    "parameters": {
        "type": "object",
        "properties": {"message": {"type": "string"}},
        "required": ["message"],
    },
}
MULTI_AGENT = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Sub-agents.",
    "tools": [SPAWN, {**SPAWN, "name": "wait_agent", "description": "Wait."}],
}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
SPAWN_CALL = (
    '<tool_call>\n{"name": "multi_agent_v1.spawn_agent", '
    '"arguments": {"message": "look"}}\n</tool_call>'
)


@pytest.mark.parametrize("stream", [True, False])
def test_namespace_members_are_offered_and_calls_name_their_namespace(stream: bool) -> None:
    rig = make_rig([Reply.of(SPAWN_CALL)])
    ex = ask(rig, stream=stream, tools=[SHELL, MULTI_AGENT, WEB_SEARCH])
    assert ex.status == 200, ex.body
    tools = prompt_text(rig)
    # Members by their qualified name, with the namespace's description;
    # the hosted tool is not in the prompt at all.
    assert '"name": "multi_agent_v1.spawn_agent"' in tools
    assert '"name": "multi_agent_v1.wait_agent"' in tools
    assert "(Part of multi_agent_v1: Sub-agents.)" in tools
    assert "web_search" not in tools
    response = final(ex) if stream else body(ex)
    (item,) = [i for i in response.output if i.type == "function_call"]
    # As OpenAI sends it and Codex routes it: the name and namespace apart.
    assert (item.name, item.namespace) == ("spawn_agent", "multi_agent_v1")
    assert json.loads(item.arguments) == {"message": "look"}
    if stream:
        added = [e for e in events(ex) if e["type"] == "response.output_item.added"]
        assert added[0]["item"]["namespace"] == "multi_agent_v1"
    # The response repeats the tools as sent, hosted one included.
    assert [t.type for t in response.tools] == ["function", "namespace", "web_search"]


def test_a_namespaced_call_sent_back_reaches_the_prompt_by_its_qualified_name() -> None:
    rig = make_rig(["done"])
    items = [
        {"role": "user", "content": "spawn one"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "spawn_agent",
            "namespace": "multi_agent_v1",
            "arguments": '{"message": "look"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "agent 7 started"},
    ]
    ex = ask(rig, input=items, tools=[MULTI_AGENT, WEB_SEARCH])
    assert ex.status == 200, ex.body
    messages = rig.engine.template_messages[-1]
    # The ChatML template has no tool support: the fallback writes the call
    # as the model would, under the name the model was offered.
    (turn,) = [m for m in messages if m["role"] == "assistant"]
    assert '"name": "multi_agent_v1.spawn_agent"' in turn["content"]
    assert "agent 7 started" in messages[-1]["content"]


def test_a_namespace_member_can_be_required_by_name_and_namespace() -> None:
    rig = make_rig([Reply.of(SPAWN_CALL)])
    choice = {"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"}
    ex = ask(rig, stream=False, tools=[MULTI_AGENT], tool_choice=choice)
    assert ex.status == 200, ex.body
    grammar = rig.engine.calls[0][1].grammar
    assert grammar is not None and not grammar.triggers  # forced: from the first token
    assert "multi_agent_v1.spawn_agent" in grammar.gbnf
    assert "multi_agent_v1.wait_agent" not in grammar.gbnf


@pytest.mark.parametrize("kind", HOSTED)
def test_hosted_tools_are_left_out_with_one_warning(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spec, "_LEFT_OUT", set())
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        rig = make_rig(["ok", "ok"])
        for _ in range(2):
            ex = ask(rig, stream=False, tools=[WEATHER, {"type": kind}])
            assert ex.status == 200, ex.body
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert "get_weather" in prompt_text(rig) and f'"{kind}"' not in prompt_text(rig)
    said = [formatEvent(e) for e in logged if e.get("kind") == kind]
    # Once per kind and process, not every turn; it says what and why.
    assert len(said) == 1, said
    assert "left out of the prompt" in said[0] and "responses" in said[0]


def test_a_namespace_key_on_a_plain_tool_is_not_a_namespace() -> None:
    # Only a namespace tool puts its members in a namespace; OpenAI's
    # function tools have no such field.
    rig = make_rig([Reply.of(CALL)])
    ex = ask(rig, stream=False, tools=[{**WEATHER, "namespace": "x"}])
    assert ex.status == 200, ex.body
    assert '"name": "get_weather"' in prompt_text(rig) and "x.get_weather" not in prompt_text(rig)
    (item,) = [i for i in body(ex).output if i.type == "function_call"]
    assert (item.name, item.namespace) == ("get_weather", None)
