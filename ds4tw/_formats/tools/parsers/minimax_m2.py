"""
MiniMax-M2 tool calls: one C{<minimax:tool_call>} block of C{<invoke
name="...">} calls, each argument as raw text in C{<parameter
name="...">} tags; reasoning is C{<think>} tags, which its template
opens in the generation prompt. The wire format of vLLM's C{minimax_m2}
parser and llama.cpp's MiniMax-M2 handling; the arguments' typing is
L{xmlargs}'s.

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
    block_open="<minimax:tool_call>",
    block_close="</minimax:tool_call>",
    call_open='<invoke name="',
    name_close='">',
    name_stops='\n<"',
    call_close="</invoke>",
    param_open='<parameter name="',
    param_close='">',
    value_open="",
    value_close="</parameter>",
    newlines=False,
)


class MiniMaxM2Parser(ParserBase):
    """
    C{<minimax:tool_call>\\n<invoke name="get_weather">\\n<parameter name="city">Paris}
    C{</parameter>\\n</invoke>\\n</minimax:tool_call>}: several invokes per
    block are several calls. A value is everything between its tags.
    """

    name = "minimax_m2"
    preserved_tokens = (MARKUP.block_open, MARKUP.block_close)

    @staticmethod
    def claims(template: str) -> bool:
        return MARKUP.block_open in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return XmlCallSplitter(tooling, MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        text = until(rules, "param-text", MARKUP.value_close)

        def param(name: str, value: str) -> str:
            return f'{literal(MARKUP.param_open)} {name} "\\">" {value} "</parameter>\\n"'

        invokes = []
        for i, tool in enumerate(tooling.callable()):
            params = params_rule(rules, tool, f"params-{i}", param, '[^"\\n<]+', text)
            head = literal(f'{MARKUP.call_open}{tool.name}">\n')
            invokes.append(f'{head} {params} "</invoke>\\n"')
        invoke = rules.rule("invoke", " | ".join(invokes))
        listed = repeat(tooling, invoke, "")
        block = f'{literal(MARKUP.block_open)} "\\n" {listed} {literal(MARKUP.block_close)}'
        return complete(
            rules, tooling, rules.rule("calls", block), trigger(MARKUP.block_open), answer
        )

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        return (
            "# Tools\nYou may call one or more tools to assist with the user query.\n"
            "Here are the tools available in JSONSchema format:\n\n"
            f"<tools>\n{tool_list(tools)}\n</tools>\n\n"
            "When making tool calls, use XML format to invoke tools and pass parameters:\n\n"
            '<minimax:tool_call>\n<invoke name="tool-name-1">\n'
            '<parameter name="param-key-1">param-value-1</parameter>\n'
            '<parameter name="param-key-2">param-value-2</parameter>\n'
            "...\n</invoke>\n</minimax:tool_call>"
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        invokes = "".join(
            f'<invoke name="{name}">\n'
            + "".join(
                f'<parameter name="{k}">{written(v)}</parameter>\n'
                for k, v in arguments_items(args)
            )
            + "</invoke>\n"
            for name, args in calls
        )
        return f"{MARKUP.block_open}\n{invokes}{MARKUP.block_close}"
