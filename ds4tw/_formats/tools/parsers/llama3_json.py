"""
Llama 3.x tool calls: the reply is the call, a JSON object.

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ...._engine.interface import Grammar
from ...grammar import RuleSet
from ..scan import WHITESPACE
from ..spec import Tooling, ToolSpec
from .base import Event, ParserBase, Splitter, ToolCallSplitter, call_rules, complete, repeat


class LeadingJSONSplitter(Splitter):
    """
    Llama 3.x: calls are the whole reply, JSON objects (after an optional
    C{<|python_tag|>}), separated by C{;} or whitespace. A reply that does
    not begin that way is all content.
    """

    TAG = "<|python_tag|>"

    def __init__(self, tooling: Tooling) -> None:
        super().__init__(tooling)
        self._mode = "start"  # start, calls, text
        self._held = ""

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            if self._mode == "text":
                self._content(out, buf)
                return out
            if self._call is not None:
                result = self._feed_call(out, buf)
                if result is None:
                    return out
                if result[0] == "text":
                    self._mode = "text"  # it was malformed: all text now
                buf = result[1]
                continue
            stripped = buf.lstrip(WHITESPACE + (";" if self.calls else ""))
            if not stripped:
                self._held = buf if self._mode == "start" else ""
                return out
            if stripped.startswith(self.TAG):
                self._start_call(buf[: len(buf) - len(stripped)] + self.TAG)
                buf = stripped[len(self.TAG) :]
            elif self.TAG.startswith(stripped):
                self._held = buf
                return out
            elif stripped.startswith("{"):
                self._start_call(buf[: len(buf) - len(stripped)])
                buf = stripped
            else:
                self._mode = "text"
                if not self.calls:
                    self._content(out, buf)
                    return out
                buf = stripped
        return out

    def flush(self) -> list[Event]:
        out: list[Event] = []
        self._flush_call(out)
        held, self._held = self._held, ""
        if self._mode == "start" and not self.calls:
            self._content(out, held)
        return out


class Llama3JSONParser(ParserBase):
    """Llama 3.x: the reply is C{{"name": ..., "parameters": {...}}}."""

    name = "llama3_json"
    preserved_tokens = (LeadingJSONSplitter.TAG,)

    @staticmethod
    def claims(template: str) -> bool:
        return "<|python_tag|>" in template or (
            "ipython" in template and '"parameters"' in template
        )

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return LeadingJSONSplitter(tooling)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        call = call_rules(rules, tooling, "parameters")
        calls = rules.rule("calls", repeat(tooling, call, '";" space'))
        # The call must open the reply (C{^} matches only at the start of
        # the text, whatever the search window): the grammar starts at its brace.
        trigger = '^\\s*(?:<\\|python_tag\\|>)?(\\{)\\s*"name"'
        return complete(rules, tooling, calls, trigger, answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        listed = "\n\n".join(json.dumps(t.template_entry(), ensure_ascii=False) for t in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of '
            "argument name and its value}. Do not use variables.\n\n" + listed
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "; ".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls
        )
