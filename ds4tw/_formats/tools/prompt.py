"""
How tools, earlier calls and their results reach the chat template.

Every dialect hands over its conversation as Hugging Face chat messages
(the shape chat templates are written for):

  - C{{"role": "assistant", "content": str, "tool_calls": [{"id", "type":
    "function", "function": {"name", "arguments"}}]}} with the arguments
    as JSON text (the OpenAI wire shape);
  - C{{"role": "tool", "tool_call_id", "name", "content": str}} for results.

A template that takes C{tools} gets them as its C{tools} variable, and
the calls and results as messages, arguments parsed into mappings (as
Hugging Face templates expect) or kept as JSON text for templates that
concatenate them (L{ChatTemplate.arguments_as_text}); call ids as the
model's own syntax writes them where it has ids (Kimi-K2's
C{functions.NAME:INDEX}, L{ToolCallParser.prompt_call_id}); and a turn
of several calls as one turn per call, each followed by its result, for
templates that write only a turn's first call
(L{ChatTemplate.renders_parallel_calls}: gpt-oss's).

An earlier assistant turn's reasoning, when the client sends it back
(C{reasoning_content}: chat's own field, Anthropic thinking blocks,
Responses reasoning items), reaches the template under both names
templates read: C{reasoning_content} (Qwen3, GLM, DeepSeek, Kimi,
MiniMax) and C{thinking} (gpt-oss). Templates decide what to keep:
most drop reasoning before the last user turn and keep it within a tool
loop, as interleaved-thinking models need. A template without tool support (the demo
model's) gets the documented fallback: the tool-call parser's own
instructions added to the system message, earlier calls written into the
assistant's text in the parser's syntax, and results as user turns in
C{<tool_response>} tags; so the one parser reads what the model writes
either way. See docs/tools.md.

Covered by tests/unit/test_openai_tools.py (through the chat route).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..._engine.template import ChatTemplate
from .parsers import ToolCallParser
from .spec import Tooling, arguments_value


def template_inputs(
    messages: Sequence[Mapping[str, Any]],
    tooling: Tooling | None,
    template: ChatTemplate,
    parser: ToolCallParser,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template variables for this conversation."""
    offered = tooling is not None and tooling.active
    kwargs: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    fallback_calls = not template.renders_tool_calls
    fallback_results = not template.renders_tool_results
    as_text = template.arguments_as_text
    ids: dict[str, str] = {}
    for m in messages:
        message = dict(m)
        calls = message.pop("tool_calls", None) or []
        if message.get("reasoning_content"):
            message.setdefault("thinking", message["reasoning_content"])
        if calls:
            pairs = [
                (c["function"]["name"], arguments_value(c["function"]["arguments"])) for c in calls
            ]
            if fallback_calls:
                text = message.get("content") or ""
                written = parser.format_calls(pairs)
                message["content"] = f"{text}\n{written}" if text else written
            else:
                message["content"] = message.get("content") or ""
                message["tool_calls"] = [
                    _call(c, n, a, as_text, parser, ids)
                    for c, (n, a) in zip(calls, pairs, strict=True)
                ]
        if message.get("role") == "tool" and message.get("tool_call_id") in ids:
            message["tool_call_id"] = ids[message["tool_call_id"]]
        if message.get("role") == "tool" and fallback_results:
            message = {
                "role": "user",
                "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>",
            }
        _append(out, message, merge=fallback_results)
    if not template.renders_parallel_calls:
        out = _one_call_a_turn(out)
    if offered:
        assert tooling is not None
        if template.takes_tools:
            kwargs["tools"] = [t.template_entry() for t in tooling.tools]
        else:
            _add_system(out, parser.instructions(tooling.tools))
    return out, kwargs


def _one_call_a_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Each of a turn's calls as its own assistant turn, followed by its
    result: for templates that write only a turn's first call (gpt-oss's,
    whose model makes one call a turn), so no call of a parallel turn
    from the client (or another model) is lost from the prompt.
    """
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        turn = messages[i]
        calls = turn.get("tool_calls") or []
        i += 1
        if turn.get("role") != "assistant" or len(calls) < 2:
            out.append(turn)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        answers = {r.get("tool_call_id"): r for r in results}
        for k, call in enumerate(calls):
            rest = {"role": "assistant", "content": ""}
            out.append({**(turn if k == 0 else rest), "tool_calls": [call]})
            if call.get("id") in answers:
                out.append(answers.pop(call["id"]))
        out += [r for r in results if r.get("tool_call_id") in answers]
    return out


def without_thinking_alias(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """
    C{messages} without the C{thinking} copy of the reasoning on turns that
    also have text, or None when there is none to drop: gpt-oss's template
    refuses a turn with both (its text then renders as the analysis).
    """
    if not any(m.get("thinking") and m.get("content") for m in messages):
        return None
    return [
        {k: v for k, v in m.items() if k != "thinking"} if m.get("content") else m for m in messages
    ]


def _call(
    call: Mapping[str, Any],
    name: str,
    arguments: Any,
    as_text: bool,
    parser: ToolCallParser,
    ids: dict[str, str],
) -> dict[str, Any]:
    if as_text:
        # The client's own text where it sent text: the model wrote it so.
        sent = call["function"]["arguments"]
        arguments = sent if isinstance(sent, str) else json.dumps(arguments, ensure_ascii=False)
    out = {**call, "function": {"name": name, "arguments": arguments}}
    if "id" in call:
        ids[call["id"]] = out["id"] = parser.prompt_call_id(call["id"], name, len(ids))
    return out


def _append(out: list[dict[str, Any]], message: dict[str, Any], merge: bool) -> None:
    # Results turned into user turns must not make two user turns in a row:
    # many templates insist that roles alternate.
    last = out[-1] if out else None
    if (
        merge
        and last is not None
        and last["role"] == message["role"] == "user"
        and isinstance(last.get("content"), str)
        and isinstance(message.get("content"), str)
    ):
        last["content"] = f"{last['content']}\n{message['content']}"
        return
    out.append(message)


def _add_system(out: list[dict[str, Any]], text: str) -> None:
    if out and out[0]["role"] == "system":
        first = out[0].get("content") or ""
        out[0] = {**out[0], "content": f"{first}\n\n{text}" if first else text}
    else:
        out.insert(0, {"role": "system", "content": text})
