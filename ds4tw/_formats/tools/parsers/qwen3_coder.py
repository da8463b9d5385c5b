"""
Qwen3-Coder tool calls: a C{<function=name>} in C{<tool_call>} tags, each
argument as raw text in C{<parameter=key>} tags, on lines of its own.
The wire format of vLLM's C{qwen3_coder} parser and llama.cpp's
Qwen3-Coder handling; the arguments' typing is L{xmlargs}'s.

Covered by tests/unit/test_parser_xml.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...._engine.interface import Grammar
from ...grammar import RuleSet, literal
from ..spec import Tooling, ToolSpec
from .base import ParserBase, ToolCallSplitter, complete, repeat, trigger
from .xmlargs import (
    Markup,
    XmlCallSplitter,
    arguments_items,
    params_rule,
    tool_list,
    until,
    written,
)

MARKUP = Markup(
    block_open="<tool_call>",
    block_close="</tool_call>",
    call_open="<function=",
    name_close=">",
    name_stops="\n<",
    call_close="</function>",
    param_open="<parameter=",
    param_close=">",
    value_open="",
    value_close="</parameter>",
    newlines=True,
)


class Qwen3CoderParser(ParserBase):
    """
    C{<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n}
    C{</function>\\n</tool_call>}: one newline each side of a value is the
    format's (vLLM strips exactly one). Several C{<function=>} in one
    block are read as several calls.
    """

    name = "qwen3_coder"
    preserved_tokens = ("<tool_call>", "</tool_call>")

    @staticmethod
    def claims(template: str) -> bool:
        # Its template also says <tool_call>: this must be asked before Hermes.
        return MARKUP.call_open in template and MARKUP.param_open in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return XmlCallSplitter(tooling, MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        text = until(rules, "param-text", MARKUP.value_close)

        def param(name: str, value: str) -> str:
            return f'"<parameter=" {name} ">\\n" {value} "\\n</parameter>\\n"'

        calls = []
        for i, tool in enumerate(tooling.callable()):
            params = params_rule(rules, tool, f"params-{i}", param, "[^>\\n]+", text)
            calls.append(f'"<function=" {literal(tool.name)} ">\\n" {params} "</function>"')
        call = rules.rule("call", " | ".join(calls))
        block = rules.rule("block", f'"<tool_call>\\n" {call} "\\n</tool_call>"')
        root = repeat(tooling, block, '"\\n"*')
        return complete(rules, tooling, rules.rule("calls", root), trigger("<tool_call>"), answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        return (
            "# Tools\n\nYou have access to the following tools:\n\n"
            f"<tools>\n{tool_list(tools)}\n</tools>\n\n"
            "To call a tool, reply in the following format, with nothing after it:\n\n"
            "<tool_call>\n<function=example_function_name>\n"
            "<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
            "<parameter=example_parameter_2>\nA value that can span\nseveral lines\n"
            "</parameter>\n</function>\n</tool_call>\n\n"
            "Required parameters must be given. Any reasoning goes before the call, not after it."
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "\n".join(
            f"<tool_call>\n<function={name}>\n"
            + "".join(
                f"<parameter={k}>\n{written(v)}\n</parameter>\n" for k, v in arguments_items(args)
            )
            + "</function>\n</tool_call>"
            for name, args in calls
        )
