"""
The model families agents run, each through its own chat template (test
data in tests/data/templates/, with provenance in each case file):

  - the template renders a tool conversation as ds4tw hands it over
    (tools, an assistant turn with reasoning and a call, the result);
  - C{auto} picks the family's tool-call and reasoning parsers;
  - each reply in the family's native syntax, served by the scripted
    engine with that template, gives the same calls, reasoning and
    content in all three dialects, whole (one body) and streamed split
    at every character.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ds4tw._engine.template import ChatTemplate
from ds4tw._formats.reasoning import reasoning_parser
from ds4tw._formats.tools.parsers import tool_call_parser
from ds4tw._formats.tools.prompt import template_inputs
from ds4tw._formats.tools.spec import Tooling, ToolSpec
from ds4tw.testing import Exchange, Reply

from .conftest import Rig, make_rig

TEMPLATES = Path(__file__).parent.parent / "data" / "templates"
CASES = sorted(TEMPLATES.glob("*.json"))

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "units": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
}
RUN = {
    "name": "run",
    "description": "Run a shell command.",
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "options": {
                "type": "object",
                "properties": {"timeout": {"type": "number"}, "env": {"type": "object"}},
            },
            "dry": {"type": "boolean"},
        },
        "required": ["command"],
    },
}
TOOLS = (WEATHER, RUN)


def case(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    data["source"] = (TEMPLATES / data["template"]).read_text(encoding="utf-8")
    return data


def ids(path: Path) -> str:
    return path.stem


# -- the template and auto --------------------------------------------------------


@pytest.mark.parametrize("path", CASES, ids=ids)
def test_auto_picks_the_family_parsers(path: Path) -> None:
    c = case(path)
    assert tool_call_parser("auto", c["source"]).name == c["tool_call_parser"]
    assert reasoning_parser("auto", c["source"]).name == c["reasoning_parser"]


#: Templates that never write an earlier turn's reasoning into the prompt
#: (read in each: no reasoning_content or thinking field is rendered).
NO_REASONING_IN_PROMPT = {
    "Qwen3-Coder",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V3.1",
    "moonshotai-Kimi-K2",
    "unsloth-mistral-Devstral-Small-2507",
}


def loop_turns(reasoning: str) -> list[dict[str, Any]]:
    """A tool loop in progress: the model reasoned, called, and has the result."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
    ]


@pytest.mark.parametrize("path", CASES, ids=ids)
def test_the_template_renders_a_tool_loop(path: Path) -> None:
    c = case(path)
    template = ChatTemplate(c["source"], bos_token=c["bos_token"], eos_token=c["eos_token"])
    parser = tool_call_parser("auto", c["source"])
    tooling = Tooling(tuple(ToolSpec(t["name"], t["description"], t["parameters"]) for t in TOOLS))
    thought = "Paris is in France; ask for two days."
    messages, extra = template_inputs(loop_turns(thought), tooling, template, parser)
    text = template.render(messages, **extra, **c["template_kwargs"]).text
    assert "The weather in a city." in text  # the tools
    assert "get_weather" in text and "Paris" in text  # the earlier call, with its arguments
    assert "18 C" in text  # its result
    # Within a tool loop, the thinking families keep the reasoning
    # (interleaved thinking); the others never render any.
    assert (thought in text) == (path.stem not in NO_REASONING_IN_PROMPT)


# -- replies through the three dialects ---------------------------------------------

#: What the client saw: reasoning, content, and the calls with parsed arguments.
Seen = tuple[str, str, list[tuple[str, Any]]]


def openai_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": t} for t in TOOLS]


def request(dialect: str, c: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    if dialect == "chat":
        return "/v1/chat/completions", {
            "model": "m",
            "messages": [{"role": "user", "content": "Go."}],
            "tools": openai_tools(),
            "reasoning_effort": "high",
            "chat_template_kwargs": c["template_kwargs"],
            "stream": stream,
        }
    if dialect == "anthropic":
        tools = [
            {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
            for t in TOOLS
        ]
        return "/v1/messages", {
            "model": "m",
            "max_tokens": 2048,
            "messages": [{"role": "user", "content": "Go."}],
            "tools": tools,
            "thinking": {"type": "enabled", "budget_tokens": 100000},
            "stream": stream,
        }
    tools = [{"type": "function", **t} for t in TOOLS]
    return "/v1/responses", {
        "model": "m",
        "input": "Go.",
        "tools": tools,
        "reasoning": {"effort": "high"},
        "stream": stream,
    }


def seen_body(dialect: str, body: dict[str, Any]) -> Seen:
    reasoning, content, calls = "", "", []
    if dialect == "chat":
        message = body["choices"][0]["message"]
        reasoning = message.get("reasoning_content") or ""
        content = message.get("content") or ""
        for call in message.get("tool_calls") or []:
            calls.append((call["function"]["name"], json.loads(call["function"]["arguments"])))
    elif dialect == "anthropic":
        for block in body["content"]:
            if block["type"] == "thinking":
                reasoning += block["thinking"]
            elif block["type"] == "text":
                content += block["text"]
            elif block["type"] == "tool_use":
                calls.append((block["name"], block["input"]))
    else:
        for item in body["output"]:
            if item["type"] == "reasoning":
                reasoning += "".join(p["text"] for p in item["content"])
            elif item["type"] == "message":
                content += "".join(p["text"] for p in item["content"])
            elif item["type"] == "function_call":
                calls.append((item["name"], json.loads(item["arguments"])))
    return reasoning, content, calls


def seen_stream(dialect: str, ex: Exchange) -> Seen:
    reasoning, content = "", ""
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for data in ex.data():
        if data == "[DONE]":
            continue
        if dialect == "chat":
            if not data["choices"]:
                continue
            delta = data["choices"][0]["delta"]
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if fn.get("name"):
                    names[call["index"]] = fn["name"]
                args[call["index"]] = args.get(call["index"], "") + (fn.get("arguments") or "")
        elif dialect == "anthropic":
            block = data.get("content_block") or {}
            if data["type"] == "content_block_start" and block["type"] == "tool_use":
                names[data["index"]] = block["name"]
            elif data["type"] == "content_block_delta":
                d = data["delta"]
                reasoning += d.get("thinking", "")
                content += d.get("text", "")
                if d["type"] == "input_json_delta":
                    args[data["index"]] = args.get(data["index"], "") + d["partial_json"]
        else:
            kind = data["type"]
            if kind == "response.output_item.added" and data["item"]["type"] == "function_call":
                names[data["output_index"]] = data["item"]["name"]
            elif kind == "response.function_call_arguments.delta":
                i = data["output_index"]
                args[i] = args.get(i, "") + data["delta"]
            elif kind == "response.reasoning_text.delta":
                reasoning += data["delta"]
            elif kind == "response.output_text.delta":
                content += data["delta"]
    calls = [(names[i], json.loads(args.get(i) or "{}")) for i in sorted(names)]
    return reasoning, content, calls


def serve(c: dict[str, Any], reply: Reply, dialect: str, stream: bool) -> tuple[Rig, Exchange]:
    rig = make_rig([reply], chat_template=c["source"], n_ctx=65536, n_batch=65536)
    path, payload = request(dialect, c, stream)
    ex = rig.http.post(path, payload)
    rig.threads.run_until_idle()
    assert ex.finished, ex.body[-400:]
    assert ex.status == 200, ex.body[-400:]
    return rig, ex


REPLIES = [
    pytest.param(path, i, id=f"{path.stem}-{i}")
    for path in CASES
    for i in range(len(json.loads(path.read_text(encoding="utf-8"))["replies"]))
]


@pytest.mark.parametrize("dialect", ["chat", "anthropic", "responses"])
@pytest.mark.parametrize(("path", "index"), REPLIES)
def test_the_reply_reads_the_same_in_every_dialect(path: Path, index: int, dialect: str) -> None:
    c = case(path)
    r = c["replies"][index]
    want: Seen = (
        r["reasoning"],
        r["content"],
        [(call["name"], call["arguments"]) for call in r["calls"]],
    )
    _, whole = serve(c, Reply.of(r["text"]), dialect, stream=False)
    assert seen_body(dialect, whole.json()) == want
    _, split = serve(c, Reply.of(*r["text"]), dialect, stream=True)
    assert seen_stream(dialect, split) == want


def test_gpt_oss_takes_claude_codes_turns_with_text_and_thinking() -> None:
    """Its template refuses a turn with both; the turn is rendered without the thinking."""
    c = case(TEMPLATES / "openai-gpt-oss-120b.json")
    rig = make_rig([Reply.of("<|channel|>final<|message|>Done.")], chat_template=c["source"])
    path, payload = request("anthropic", c, stream=False)
    payload["messages"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "s"},
                {"type": "text", "text": "Checking the weather."},
                {
                    "type": "tool_use",
                    "id": "t1",
                    "name": "get_weather",
                    "input": {"city": "P"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18 C"}],
        },
    ]
    ex = rig.http.post(path, payload)
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    assert seen_body("anthropic", ex.json()) == ("", "Done.", [])


def test_gpt_oss_gets_each_parallel_call_as_its_own_turn() -> None:
    """Its template writes only a turn's first call: each becomes a turn, with its result."""
    c = case(TEMPLATES / "openai-gpt-oss-120b.json")
    template = ChatTemplate(c["source"], bos_token=c["bos_token"], eos_token=c["eos_token"])
    parser = tool_call_parser("auto", c["source"])
    tooling = Tooling(tuple(ToolSpec(t["name"], t["description"], t["parameters"]) for t in TOOLS))

    def call(i: int, name: str, args: str) -> dict[str, Any]:
        return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}

    turns = [
        {"role": "user", "content": "Weather, then list files."},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Two tools.",
            "tool_calls": [
                call(1, "get_weather", '{"city": "Oslo"}'),
                call(2, "run", '{"command": "ls"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "c2", "name": "run", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "3 C"},
    ]
    messages, extra = template_inputs(turns, tooling, template, parser)
    assert [(m["role"], len(m.get("tool_calls") or [])) for m in messages] == [
        ("user", 0),
        ("assistant", 1),
        ("tool", 0),
        ("assistant", 1),
        ("tool", 0),
    ]
    text = template.render(messages, **extra).text
    assert '"city":"Oslo"' in text.replace(" ", "") and '"command":"ls"' in text.replace(" ", "")
    # Each result under its own call's name.
    assert text.index("functions.get_weather to=assistant") < text.index("3 C")
    assert text.index("functions.run to=assistant") < text.index("a.txt")
