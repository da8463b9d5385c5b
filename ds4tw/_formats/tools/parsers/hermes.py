"""
Hermes / Qwen 2.5 / Qwen3 tool calls: a JSON object in C{<tool_call>} tags.

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ...._engine.interface import Grammar
from ...grammar import RuleSet, literal
from ..spec import Tooling, ToolSpec
from .base import (
    MarkedSplitter,
    ParserBase,
    ToolCallSplitter,
    call_rules,
    complete,
    repeat,
    trigger,
)


class HermesParser(ParserBase):
    """
    Hermes / Qwen: C{<tool_call>{"name": ..., "arguments": {...}}</tool_call>},
    one tag per call. Also the fallback for templates without tool support.
    """

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    @staticmethod
    def claims(template: str) -> bool:
        return HermesParser.START in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return MarkedSplitter(tooling, self.START, self.END)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        call = call_rules(rules, tooling)
        one = rules.rule(
            "tool-call", f'{literal(self.START)} "\\n"? {call} "\\n"? {literal(self.END)}'
        )
        calls = rules.rule("calls", repeat(tooling, one, '"\\n"*'))
        return complete(rules, tooling, calls, trigger(self.START), answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        listed = "\n".join(json.dumps(t.template_entry(), ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "\n".join(
            f"{self.START}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n"
            f"{self.END}"
            for n, a in calls
        )
