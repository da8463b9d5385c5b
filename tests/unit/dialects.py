"""
The chat dialects as a table, for the behaviour every dialect shares
(tests/unit/test_dialects.py): where each is served, how its request
says what the neutral tests ask for (a dotted field is nested: Ollama's
C{options.num_predict}), which of its words means which ending or error,
how a client reads a reply, streamed or not, into one neutral L{Said},
how it tells a keepalive from the stream's frames (an SSE comment, or
Ollama's empty chunk), and what it cannot say (L{Dialect.lacks}).

Keyed by the dialect's name, so that the table can later come from the
server's own dialect registry (the route and the error shape) with only
the readers staying here. Each reader checks every event or body it
reads against that dialect's SDK types (through the dialect's own test
module, or for Ollama the C{ollama} library's C{ChatResponse} and
C{GenerateResponse}, keepalives included), as the per-dialect tests do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ollama._types import ChatResponse, GenerateResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ds4tw._formats.tools.spec import ToolSpec
from ds4tw.testing import Exchange

from . import test_anthropic as anthropic
from . import test_responses as responses
from .tools import anthropic_tool, chat_tool, responses_tool


@dataclass
class Said:
    """What a client read of one reply, whatever the dialect."""

    reasoning: str = ""
    content: str = ""
    #: [name, arguments so far] of each call, in the order they opened.
    calls: list[list[str]] = field(default_factory=list)
    #: The dialect's own word for why the reply ended; None while it runs.
    finish: str | None = None
    reasoning_tokens: int | None = None
    #: Every token of the answer, thinking included (Ollama's C{eval_count}).
    output_tokens: int | None = None


def _comments(ex: Exchange) -> list[str | None]:
    return list(ex.comments())


def _sse_frames(ex: Exchange) -> list[Any]:
    return [f for f in ex.events() if f[0] != "comment"]


def _sse_message(ex: Exchange) -> str:
    return str(ex.json()["error"]["message"])


@dataclass(frozen=True)
class Dialect:
    name: str
    route: str
    #: A request for C{text}, with this dialect's required fields.
    ask: Callable[[str], dict[str, Any]]
    #: The field for the token limit, a dotted path if nested (Ollama's C{options}).
    max_tokens: str
    tool: Callable[[ToolSpec], dict[str, Any]]
    #: Fields that allow one tool call only.
    one_call: dict[str, Any]
    #: Fields that show the model's thinking to the client.
    thinking: dict[str, Any]
    #: Fields that keep the model's thinking on and hidden from the client.
    hidden: dict[str, Any]
    #: C{tool_choice} by neutral name: "auto", "required", "named" (get_time), "none".
    choices: dict[str, Any]
    #: The field for stop sequences, if the dialect has them (a dotted path if nested).
    stop: str | None
    #: Neutral ending ("stop", "length", "tools", "stop_sequence") to this dialect's word.
    finish: dict[str, str]
    #: The error object's field that names the error, and its values by neutral name.
    error_field: str
    errors: dict[str, str]
    streamed: Callable[[Exchange], Said]
    body: Callable[[Exchange], Said]
    #: The stream with each run of deltas joined and random ids dropped:
    #: what must not depend on how the model's text was cut into tokens.
    folded: Callable[[Exchange], Any]
    #: The stream's keepalives so far, each as the stage it names (None
    #: for a keepalive that names none: Ollama's empty chunk).
    keepalives: Callable[[Exchange], list[str | None]] = _comments
    #: The stream's frames so far, keepalives left out.
    frames: Callable[[Exchange], list[Any]] = _sse_frames
    #: A keepalive's frame names the stage (an SSE comment does).
    names_stages: bool = True
    #: A tool call goes out whole once complete (Ollama), not as it is written.
    whole_calls: bool = False
    #: The message of a non-streamed error.
    message: Callable[[Exchange], str] = _sse_message
    #: What the neutral suite asks that this dialect cannot say, and why:
    #: "tools", "one_call" (a switch for one call only), "tool_choice",
    #: "reasoning_tokens" (a count of the thinking apart from the answer).
    lacks: dict[str, str] = field(default_factory=dict)

    def request(
        self, text: str = "hi", *, stream: bool = True, max_tokens: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        payload = {**self.ask(text), "stream": stream}
        if max_tokens is not None:
            kw[self.max_tokens] = max_tokens
        for name, value in kw.items():
            *outer, last = name.split(".")
            at = payload
            for part in outer:
                at = at.setdefault(part, {})
            at[last] = value
        return payload

    def said(self, ex: Exchange, stream: bool = True) -> Said:
        return self.streamed(ex) if stream else self.body(ex)

    def keepalive(self, stage: str) -> str | None:
        """How one of L{keepalives} reads for C{stage}."""
        return stage if self.names_stages else None

    def error(self, ex: Exchange) -> str:
        """The name of a non-streamed error, after checking the dialect's error shape."""
        got = ex.json()
        if self.name == "anthropic":
            assert got["type"] == "error" and set(got) == {"type", "error"}, got
        elif self.name.startswith("ollama"):
            # Ollama's error is its message alone: the message names it.
            assert set(got) == {"error"} and isinstance(got["error"], str), got
            return str(got["error"])
        else:
            assert set(got["error"]) == {"message", "type", "param", "code"}, got
        return str(got["error"][self.error_field])


def _call(said: Said, name: str) -> list[str]:
    said.calls.append([name, ""])
    return said.calls[-1]


# -- OpenAI chat completions ----------------------------------------------------


def chunks(ex: Exchange) -> list[dict[str, Any]]:
    """The chat stream's chunks so far, each checked against the SDK's type."""
    out = []
    for c in ex.data():
        if c == "[DONE]":
            continue
        ChatCompletionChunk.model_validate(c)
        out.append(c)
    return out


def _chat_streamed(ex: Exchange) -> Said:
    out = Said()
    for c in chunks(ex):
        if c.get("usage"):
            out.reasoning_tokens = c["usage"]["completion_tokens_details"]["reasoning_tokens"]
        if not c["choices"]:
            continue
        choice = c["choices"][0]
        delta = choice["delta"]
        out.reasoning += delta.get("reasoning_content") or ""
        out.content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            function = tc.get("function") or {}
            if tc["index"] == len(out.calls):
                _call(out, function["name"])
            out.calls[tc["index"]][1] += function.get("arguments") or ""
        out.finish = choice["finish_reason"] or out.finish
    return out


def _chat_body(ex: Exchange) -> Said:
    got = ChatCompletion.model_validate(ex.json())
    message = got.choices[0].message
    out = Said(
        reasoning=getattr(message, "reasoning_content", None) or "",
        content=message.content or "",
        finish=got.choices[0].finish_reason,
    )
    out.calls = [[c.function.name, c.function.arguments] for c in message.tool_calls or []]  # type: ignore[union-attr]
    if got.usage is not None and got.usage.completion_tokens_details is not None:
        out.reasoning_tokens = got.usage.completion_tokens_details.reasoning_tokens
    return out


def chat_folded(ex: Exchange) -> list[list[Any]]:
    """[kind, index, text] runs, the call ids dropped."""
    out: list[list[Any]] = []
    for c in chunks(ex):
        for choice in c["choices"]:
            delta = choice["delta"]
            runs = [[k, None, delta[k]] for k in ("reasoning_content", "content") if delta.get(k)]
            for tc in delta.get("tool_calls") or []:
                function = tc.get("function") or {}
                if "name" in function:
                    runs.append(["call", tc["index"], function["name"]])
                runs.append(["arguments", tc["index"], function.get("arguments") or ""])
            if choice["finish_reason"]:
                runs.append(["finish", None, choice["finish_reason"]])
            for run in runs:
                if out and out[-1][:2] == run[:2] and run[0] in ("content", "arguments"):
                    out[-1][2] += run[2]
                elif run[2] or run[0] != "arguments":
                    out.append(run)
    return out


# -- Anthropic messages ---------------------------------------------------------


def _anthropic_streamed(ex: Exchange) -> Said:
    out = Said()
    by_block: dict[int, list[str]] = {}
    for e in anthropic.events(ex):
        if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use":
            by_block[e["index"]] = _call(out, e["content_block"]["name"])
        elif e["type"] == "content_block_delta":
            delta = e["delta"]
            if delta["type"] == "text_delta":
                out.content += delta["text"]
            elif delta["type"] == "thinking_delta":
                out.reasoning += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                by_block[e["index"]][1] += delta["partial_json"]
        elif e["type"] == "message_delta":
            out.finish = e["delta"]["stop_reason"]
            details = e["usage"].get("output_tokens_details") or {}
            out.reasoning_tokens = details.get("thinking_tokens")
    return out


def _anthropic_body(ex: Exchange) -> Said:
    got = anthropic.body(ex)
    out = Said(finish=got["stop_reason"])
    for block in got["content"]:
        if block["type"] == "text":
            out.content += block["text"]
        elif block["type"] == "thinking":
            out.reasoning += block["thinking"]
        elif block["type"] == "tool_use":
            out.calls.append([block["name"], json.dumps(block["input"], ensure_ascii=False)])
    details = got["usage"].get("output_tokens_details") or {}
    out.reasoning_tokens = details.get("thinking_tokens")
    return out


def blocks(ex: Exchange) -> list[dict[str, Any]]:
    """Whole blocks: each start with its deltas joined, the ids dropped."""
    out: list[dict[str, Any]] = []
    for e in anthropic.events(ex):
        if e["type"] == "content_block_start":
            block = {k: v for k, v in e["content_block"].items() if k != "id"}
            out.append({"index": e["index"], "block": block, "deltas": {}, "stopped": False})
        elif e["type"] == "content_block_delta":
            assert out[-1]["index"] == e["index"] and not out[-1]["stopped"]
            delta = dict(e["delta"])
            kind = delta.pop("type")
            (value,) = delta.values()
            deltas = out[-1]["deltas"]
            deltas[kind] = deltas.get(kind, "") + value
        elif e["type"] == "content_block_stop":
            assert out[-1]["index"] == e["index"]
            out[-1]["stopped"] = True
        elif e["type"] == "message_delta":
            out.append({"stop_reason": e["delta"]["stop_reason"]})
    return out


# -- OpenAI Responses -----------------------------------------------------------

_RESPONSES_DELTAS = {
    "response.output_text.delta": "content",
    "response.reasoning_text.delta": "reasoning",
}
_RESPONSES_ENDS = ("response.completed", "response.incomplete", "response.failed")


def _responses_streamed(ex: Exchange) -> Said:
    out = Said()
    by_item: dict[int, list[str]] = {}
    for e in responses.events(ex):
        kind = e["type"]
        if kind == "response.output_item.added" and e["item"]["type"].endswith("call"):
            by_item[e["output_index"]] = _call(out, e["item"]["name"])
        elif kind in _RESPONSES_DELTAS:
            attr = _RESPONSES_DELTAS[kind]
            setattr(out, attr, getattr(out, attr) + e["delta"])
        elif kind.endswith(("arguments.delta", "input.delta")):
            by_item[e["output_index"]][1] += e["delta"]
        elif kind in _RESPONSES_ENDS:
            out.finish = e["response"]["status"]
            usage = e["response"]["usage"]
            out.reasoning_tokens = usage["output_tokens_details"]["reasoning_tokens"]
    return out


def _responses_body(ex: Exchange) -> Said:
    got = responses.body(ex)
    out = Said(content=got.output_text, finish=got.status)
    for item in got.output:
        if item.type == "reasoning":
            out.reasoning += "".join(c.text for c in item.content or [])
        elif item.type == "function_call":
            out.calls.append([item.name, item.arguments])
        elif item.type == "custom_tool_call":
            out.calls.append([item.name, item.input])
    assert got.usage is not None
    out.reasoning_tokens = got.usage.output_tokens_details.reasoning_tokens
    return out


def collapsed(ex: Exchange) -> list[dict[str, Any]]:
    """
    The events with each run of deltas of one item joined, and the
    sequence numbers, the random ids, the times and the token counts
    (which depend on the split) left out.
    """
    out: list[dict[str, Any]] = []
    for e in responses.events(ex):
        e = {k: v for k, v in e.items() if k != "sequence_number"}
        if "response" in e:
            e["response"] = {**e["response"], "usage": None}
        last = out[-1] if out else None
        if (
            last is not None
            and e["type"].endswith(".delta")
            and last["type"] == e["type"]
            and last["item_id"] == e["item_id"]
        ):
            last["delta"] += e["delta"]
            continue
        out.append(e)
    text = re.sub(r"resp_[0-9a-f]{32}", "resp_X", json.dumps(out))
    text = re.sub(r'"(created_at|completed_at)": \d+', r'"\1": 0', text)
    return list(
        json.loads(re.sub(r"_[0-9a-f]{32}_", "_X_", re.sub(r"_[0-9a-f]{20}_", "_X_", text)))
    )


# -- Ollama ---------------------------------------------------------------------


def ollama_lines(ex: Exchange, kind: str) -> list[dict[str, Any]]:
    """
    Every line of an Ollama stream so far, each checked against the
    C{ollama} library's type for its endpoint (C{kind} "chat" or
    "generate"), as that library reads it; an error line is left as it is.
    """
    out = []
    for line in ex.lines():
        if set(line) != {"error"}:
            (ChatResponse if kind == "chat" else GenerateResponse).model_validate(line)
            assert line["model"] == "scripted" and line["created_at"].endswith("Z"), line
        out.append(line)
    return out


def _is_keepalive(line: dict[str, Any], kind: str) -> bool:
    """An empty chunk that is not the last: no text, no thinking, no call."""
    empty = (
        {"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}
    )
    return line == {
        "model": line.get("model"),
        "created_at": line.get("created_at"),
        **empty,
        "done": False,
    }


def _ollama_keepalives(kind: str) -> Callable[[Exchange], list[str | None]]:
    return lambda ex: [None for line in ollama_lines(ex, kind) if _is_keepalive(line, kind)]


def _ollama_frames(kind: str) -> Callable[[Exchange], list[Any]]:
    return lambda ex: [line for line in ollama_lines(ex, kind) if not _is_keepalive(line, kind)]


def _ollama_said(line: dict[str, Any], kind: str, out: Said) -> None:
    """Add what one chunk (or the one body) says to C{out}."""
    said = line["message"] if kind == "chat" else line
    out.content += said.get("content" if kind == "chat" else "response") or ""
    out.reasoning += said.get("thinking") or ""
    for call in said.get("tool_calls") or []:
        function = call["function"]
        out.calls.append([function["name"], json.dumps(function["arguments"], ensure_ascii=False)])
    if line["done"]:
        out.finish = line["done_reason"]
        out.output_tokens = line["eval_count"]


def _ollama_streamed(kind: str) -> Callable[[Exchange], Said]:
    def streamed(ex: Exchange) -> Said:
        assert ex.header("content-type") == "application/x-ndjson"
        out = Said()
        lines = ollama_lines(ex, kind)
        for i, line in enumerate(lines):
            assert not line.get("error"), line
            # Nothing follows the last chunk.
            assert not line["done"] or i == len(lines) - 1, lines
            _ollama_said(line, kind, out)
        return out

    return streamed


def _ollama_body(kind: str) -> Callable[[Exchange], Said]:
    def body(ex: Exchange) -> Said:
        assert ex.header("content-type") == "application/json"
        line = ex.json()
        (ChatResponse if kind == "chat" else GenerateResponse).model_validate(line)
        assert line["done"] is True, line
        out = Said()
        _ollama_said(line, kind, out)
        return out

    return body


def _ollama_folded(kind: str) -> Callable[[Exchange], list[list[Any]]]:
    def folded(ex: Exchange) -> list[list[Any]]:
        """[kind, text] runs and whole calls, the ids, times and counters dropped."""
        out: list[list[Any]] = []
        for line in ollama_lines(ex, kind):
            said = line["message"] if kind == "chat" else line
            runs: list[list[Any]] = [
                [k, said.get(k)] for k in ("thinking", "content", "response") if said.get(k)
            ]
            for call in said.get("tool_calls") or []:
                runs.append(["call", {k: v for k, v in call.items() if k != "id"}])
            if line["done"]:
                runs.append(["done", line["done_reason"]])
            for run in runs:
                if out and out[-1][0] == run[0] and run[0] in ("thinking", "content", "response"):
                    out[-1][1] += run[1]
                else:
                    out.append(run)
        return out

    return folded


# -- the table ------------------------------------------------------------------

DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        Dialect(
            name="openai-chat",
            route="/v1/chat/completions",
            ask=lambda text: {
                "model": "scripted",
                "messages": [{"role": "user", "content": text}],
                "stream_options": {"include_usage": True},
            },
            max_tokens="max_tokens",
            tool=chat_tool,
            one_call={"parallel_tool_calls": False},
            thinking={},
            hidden={"reasoning_effort": "none"},
            choices={
                "auto": "auto",
                "required": "required",
                "named": {"type": "function", "function": {"name": "get_time"}},
                "none": "none",
            },
            stop="stop",
            finish={
                "stop": "stop",
                "length": "length",
                "tools": "tool_calls",
                "stop_sequence": "stop",
            },
            error_field="code",
            errors={"loading": "model_not_ready", "busy": "server_busy"},
            streamed=_chat_streamed,
            body=_chat_body,
            folded=chat_folded,
        ),
        Dialect(
            name="anthropic",
            route="/v1/messages",
            ask=lambda text: {**anthropic.BASE, "messages": [{"role": "user", "content": text}]},
            max_tokens="max_tokens",
            tool=anthropic_tool,
            one_call={"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
            thinking={"thinking": anthropic.ENABLED},
            hidden={"thinking": {"type": "disabled"}},
            choices={
                "auto": {"type": "auto"},
                "required": {"type": "any"},
                "named": {"type": "tool", "name": "get_time"},
                "none": {"type": "none"},
            },
            stop="stop_sequences",
            finish={
                "stop": "end_turn",
                "length": "max_tokens",
                "tools": "tool_use",
                "stop_sequence": "stop_sequence",
            },
            error_field="type",
            errors={"loading": "overloaded_error", "busy": "overloaded_error"},
            streamed=_anthropic_streamed,
            body=_anthropic_body,
            folded=blocks,
        ),
        Dialect(
            name="responses",
            route="/v1/responses",
            ask=lambda text: {"model": "scripted", "input": text},
            max_tokens="max_output_tokens",
            tool=responses_tool,
            one_call={"parallel_tool_calls": False},
            thinking={},
            hidden={"reasoning": {"effort": "none"}},
            choices={
                "auto": "auto",
                "required": "required",
                "named": {"type": "function", "name": "get_time"},
                "none": "none",
            },
            stop=None,
            finish={"stop": "completed", "length": "incomplete", "tools": "completed"},
            error_field="code",
            errors={"loading": "model_not_ready", "busy": "server_busy"},
            streamed=_responses_streamed,
            body=_responses_body,
            folded=collapsed,
        ),
        Dialect(
            name="ollama",
            route="/api/chat",
            ask=lambda text: {"model": "scripted", "messages": [{"role": "user", "content": text}]},
            max_tokens="options.num_predict",
            tool=chat_tool,  # Ollama's tools are OpenAI's
            one_call={},
            thinking={},
            hidden={"think": False},
            choices={},
            stop="options.stop",
            finish={"stop": "stop", "length": "length", "tools": "stop", "stop_sequence": "stop"},
            error_field="error",
            errors={
                "loading": "the model is still loading; retry shortly",
                "busy": "server is busy: 1 requests are already waiting",
            },
            streamed=_ollama_streamed("chat"),
            body=_ollama_body("chat"),
            folded=_ollama_folded("chat"),
            keepalives=_ollama_keepalives("chat"),
            frames=_ollama_frames("chat"),
            names_stages=False,
            whole_calls=True,
            message=lambda ex: str(ex.json()["error"]),
            lacks={
                "one_call": "Ollama has no parallel-tool-calls switch: the model may call many",
                "tool_choice": "Ollama has no tool_choice: the model decides (auto)",
                "reasoning_tokens": "Ollama counts the thinking among the eval_count tokens",
            },
        ),
        Dialect(
            name="ollama-generate",
            route="/api/generate",
            ask=lambda text: {"model": "scripted", "prompt": text},
            max_tokens="options.num_predict",
            tool=chat_tool,  # Ollama's tools are OpenAI's
            one_call={},
            thinking={},
            hidden={"think": False},
            choices={},
            stop="options.stop",
            finish={"stop": "stop", "length": "length", "stop_sequence": "stop"},
            error_field="error",
            errors={
                "loading": "the model is still loading; retry shortly",
                "busy": "server is busy: 1 requests are already waiting",
            },
            streamed=_ollama_streamed("generate"),
            body=_ollama_body("generate"),
            folded=_ollama_folded("generate"),
            keepalives=_ollama_keepalives("generate"),
            frames=_ollama_frames("generate"),
            names_stages=False,
            message=lambda ex: str(ex.json()["error"]),
            lacks={
                "tools": "/api/generate takes a single prompt and no tools",
                "reasoning_tokens": "Ollama counts the thinking among the eval_count tokens",
            },
        ),
    )
}
