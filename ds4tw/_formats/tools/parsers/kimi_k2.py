"""
Kimi-K2 tool calls (K2-Instruct, K2-0905, K2-Thinking): a section
C{<|tool_calls_section_begin|>} ... C{<|tool_calls_section_end|>} of
calls, each C{<|tool_call_begin|>functions.NAME:INDEX} then
C{<|tool_call_argument_begin|>{...}<|tool_call_end|>}.
The call id numbers calls across the whole conversation, so earlier
calls are given back to the template under ids of that shape
(L{KimiK2Parser.prompt_call_id}).

Wire format from vLLM's C{kimi_k2_tool_parser.py} (the name is what
stands between C{functions.} and the last C{:}) and llama.cpp's
C{common_chat_params_init_kimi_k2}; read by L{SectionSplitter}.

Covered by tests/unit/test_parser_deepseek_kimi.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ...._engine.interface import Grammar
from ...grammar import RuleSet, literal
from ..spec import Tooling, ToolSpec
from .base import ParserBase, ToolCallSplitter, complete, repeat, trigger
from .deepseek import Markup, SectionSplitter

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGS_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"


def call_name(header: str) -> str | None:
    """The tool's name in a call id: C{functions.NAME:INDEX} (prefix and index optional)."""
    name = header.strip()
    head, colon, index = name.rpartition(":")
    if colon and index.isdigit():
        name = head
    name = name.removeprefix("functions.")
    return name if name and "\n" not in name else None


MARKUP = Markup((SECTION_BEGIN,), SECTION_END, CALL_BEGIN, ARGS_BEGIN, CALL_END, call_name)


class KimiK2Parser(ParserBase):
    """Kimi-K2: C{functions.NAME:INDEX} ids, JSON arguments, in a section of calls."""

    name = "kimi_k2"
    preserved_tokens = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGS_BEGIN, CALL_END)

    @staticmethod
    def claims(template: str) -> bool:
        # The first K2-Instruct template declares tools but writes no
        # calls back; the model still calls in this syntax.
        return SECTION_BEGIN in template or "<|im_system|>tool_declare<|im_middle|>" in template

    def prompt_call_id(self, call_id: str, name: str, index: int) -> str:
        return f"functions.{name}:{index}"

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return SectionSplitter(tooling, MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        each = []
        for i, tool in enumerate(tooling.callable()):
            args = rules.schema(tool.arguments_schema(), f"args-{i}", f"tool {tool.name!r}")
            call_id = f"{literal(f'functions.{tool.name}:')} [0-9]+"
            each.append(
                f"{literal(CALL_BEGIN)} {call_id} {literal(ARGS_BEGIN)} {args} {literal(CALL_END)}"
            )
        one = rules.rule("call", " | ".join(each))
        calls = rules.rule(
            "calls",
            f"{literal(SECTION_BEGIN)} {repeat(tooling, one, '')} {literal(SECTION_END)}",
        )
        return complete(rules, tooling, calls, trigger(SECTION_BEGIN), answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        listed = json.dumps([t.template_entry() for t in tools], ensure_ascii=False)
        return (
            f"# Tools\n\nYou can call these tools:\n{listed}\n\n"
            "To call tools, write:\n"
            f"{SECTION_BEGIN}{CALL_BEGIN}functions.NAME:INDEX{ARGS_BEGIN}"
            f'{{"argument": "value"}}{CALL_END}{SECTION_END}\n'
            "with one call per tool, INDEX counting the calls of the conversation from 0."
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        body = "".join(
            f"{CALL_BEGIN}functions.{n}:{i}{ARGS_BEGIN}{json.dumps(a, ensure_ascii=False)}"
            f"{CALL_END}"
            for i, (n, a) in enumerate(calls)
        )
        return f"{SECTION_BEGIN}{body}{SECTION_END}"
