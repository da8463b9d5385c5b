"""
GLM-4.5 / GLM-4.6 tool calls: C{<tool_call>name}, then each argument as
an C{<arg_key>}/C{<arg_value>} pair, then C{</tool_call>}; reasoning is
C{<think>} tags (L{ds4tw._formats.reasoning.tags}). The wire format of vLLM's
C{glm45} parser (glm4_moe_tool_parser.py) and llama.cpp's GLM-4.5
handling; GLM-4.5's template writes no newline between the name and the
first key, GLM-4.6's does, and both are read. The arguments' typing is
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
    block_open="<tool_call>",
    block_close="",
    call_open="",
    name_close="",
    name_stops="\n<",
    call_close="</tool_call>",
    param_open="<arg_key>",
    param_close="</arg_key>",
    value_open="<arg_value>",
    value_close="</arg_value>",
    newlines=False,
)


class GLM45Parser(ParserBase):
    """
    C{<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Paris</arg_value>\\n}
    C{</tool_call>}, one call per tag. A value is everything between its
    tags (the format puts no newlines around it).
    """

    name = "glm45"
    preserved_tokens = (
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    )

    @staticmethod
    def claims(template: str) -> bool:
        return MARKUP.param_open in template and MARKUP.value_open in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return XmlCallSplitter(tooling, MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        text = until(rules, "arg-text", MARKUP.value_close)

        def param(name: str, value: str) -> str:
            key = f'"<arg_key>" {name} "</arg_key>" "\\n"?'
            return f'{key} "<arg_value>" {value} "</arg_value>" "\\n"?'

        calls = []
        for i, tool in enumerate(tooling.callable()):
            params = params_rule(rules, tool, f"params-{i}", param, "[^<\\n]+", text)
            calls.append(f'"<tool_call>" {literal(tool.name)} "\\n"? {params} "</tool_call>"')
        call = rules.rule("call", " | ".join(calls))
        root = repeat(tooling, call, '"\\n"*')
        return complete(rules, tooling, rules.rule("calls", root), trigger("<tool_call>"), answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{tool_list(tools)}\n</tools>\n\n"
            "For each function call, output the function name and arguments in this XML "
            "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
            "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
            "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "\n".join(
            f"<tool_call>{name}\n"
            + "".join(
                f"<arg_key>{k}</arg_key>\n<arg_value>{written(v)}</arg_value>\n"
                for k, v in arguments_items(args)
            )
            + "</tool_call>"
            for name, args in calls
        )
