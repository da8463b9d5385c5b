"""
Tool-call parsers: how a model writes tool calls, one module per syntax,
registered by name (C{--tool-call-parser}, vLLM's names) and picked from
the chat template by C{auto}.

A parser knows one syntax three ways:

  - L{ToolCallParser.splitter}: per job, a streaming splitter that takes
    content text as the model writes it and returns content and tool-call
    events. Markup never reaches the client, even split across tokens
    (only bytes that could still be the start of a marker are held), and
    each call's arguments are forwarded as the model writes them.
  - L{ToolCallParser.grammar}: the GBNF that makes the model's calls
    parse: from the first token for a forced choice, lazily (from the
    moment the model opens a call) for C{auto}.
  - L{ToolCallParser.instructions} and L{ToolCallParser.format_calls}: for
    a chat template without tool support, the system text that describes
    the tools and the syntax, and an earlier turn's calls written back
    as the model would have written them.

Its class says which templates it reads (C{claims}, for C{auto}) and
which special tokens its markup is made of (C{preserved_tokens}: the
engine keeps their text, which it otherwise hides from the client).

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ...._engine.interface import Grammar
from ...grammar import json_grammar
from ..spec import Tooling
from .base import ToolCallParser, ToolCallSplitter
from .deepseek import DeepSeekV3Parser, DeepSeekV31Parser, DeepSeekV32Parser
from .glm45 import GLM45Parser
from .harmony import HarmonyParser
from .hermes import HermesParser
from .kimi_k2 import KimiK2Parser
from .llama3_json import Llama3JSONParser
from .minimax_m2 import MiniMaxM2Parser
from .mistral import MistralParser
from .qwen3_coder import Qwen3CoderParser

__all__ = [
    "TOOL_CALL_PARSERS",
    "DeepSeekV3Parser",
    "DeepSeekV31Parser",
    "DeepSeekV32Parser",
    "GLM45Parser",
    "GrammarCache",
    "HarmonyParser",
    "HermesParser",
    "KimiK2Parser",
    "Llama3JSONParser",
    "MiniMaxM2Parser",
    "MistralParser",
    "Qwen3CoderParser",
    "ToolCallParser",
    "ToolCallSplitter",
    "detect",
    "tool_call_parser",
]

#: Every syntax, in the order C{auto} asks them whether a template is
#: theirs: the most specific markup first, Hermes (the fallback) last.
_FORMATS: tuple[type[Any], ...] = (
    HarmonyParser,
    DeepSeekV32Parser,
    DeepSeekV31Parser,
    DeepSeekV3Parser,
    KimiK2Parser,
    MiniMaxM2Parser,
    GLM45Parser,
    Qwen3CoderParser,
    MistralParser,
    Llama3JSONParser,
    HermesParser,
)

#: Parsers by name, each made for a template (C{""} when there is none).
TOOL_CALL_PARSERS: dict[str, Callable[[str], ToolCallParser]] = {
    cls.name: cls.for_template for cls in _FORMATS
}
# vLLM's name for gpt-oss's, and the format's own.
TOOL_CALL_PARSERS["openai"] = TOOL_CALL_PARSERS["harmony"] = HarmonyParser.for_template


class GrammarCache:
    """
    Grammars by tool set and by structured-output schema: agents send the
    same tools every turn, and an agent's dozen tools take ~9 ms of pure
    Python to turn into a grammar (measured: 15 tools of 7 properties,
    8.8 ms to build, 0.13 ms to key). Used from the reactor's thread pool,
    hence the lock. Each lookup says whether the grammar was built by it,
    so that what a build loosened is logged once, not every turn.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._grammars: OrderedDict[tuple[str, ...], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        parser: ToolCallParser,
        tooling: Tooling,
        answer: Mapping[str, Any] | None = None,
    ) -> tuple[Grammar, bool]:
        """The tool-call grammar, and whether this call built it."""
        syntax = parser.key
        key = (syntax, tooling.key(), json.dumps(answer, sort_keys=True))
        return self._cached(key, lambda: parser.grammar(tooling, answer))

    def json(self, schema: Mapping[str, Any] | None) -> tuple[Grammar, bool]:
        """The structured-output grammar, and whether this call built it."""
        return self._cached(
            ("json", json.dumps(schema, sort_keys=True)), lambda: json_grammar(schema)
        )

    def _cached(self, key: tuple[str, ...], build: Callable[[], Grammar]) -> tuple[Grammar, bool]:
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key], False
        grammar = build()
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > self._size:
                self._grammars.popitem(last=False)
        return grammar, True


def tool_call_parser(name: str, template: str = "") -> ToolCallParser:
    """
    A parser by name, or for C{"auto"} the one the chat template's own
    markup names (Hermes, the fallback, when it names none).
    """
    if name == "auto":
        return detect(template)
    if name in TOOL_CALL_PARSERS:
        return TOOL_CALL_PARSERS[name](template)
    known = ", ".join(["auto", *sorted(TOOL_CALL_PARSERS)])
    raise ValueError(f"unknown tool-call parser {name!r} (known: {known})")


def detect(template: str) -> ToolCallParser:
    for cls in _FORMATS:
        if cls.claims(template):
            parser: ToolCallParser = cls.for_template(template)
            return parser
    return HermesParser()
