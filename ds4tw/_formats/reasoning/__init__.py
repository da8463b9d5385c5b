"""
Reasoning parsers: split a model's raw text into reasoning and content,
one module per syntax, chosen by name (C{--reasoning-parser}) or, by
C{auto}, from the chat template. Each job gets its own splitter, made
from the rendered prompt (a template may open the reasoning block in its
generation prompt).

Covered by tests/unit/test_reasoning.py.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Delta, NoReasoningParser, PlainSplitter, ReasoningParser, ReasoningSplitter
from .harmony import HarmonyReasoningParser
from .tags import TagReasoningParser, TagSplitter

__all__ = [
    "REASONING_PARSERS",
    "Delta",
    "HarmonyReasoningParser",
    "PlainSplitter",
    "ReasoningParser",
    "ReasoningSplitter",
    "TagReasoningParser",
    "TagSplitter",
    "detect",
    "reasoning_parser",
]

REASONING_PARSERS: dict[str, Callable[[], ReasoningParser]] = {
    "think": lambda: TagReasoningParser("think"),
    "none": NoReasoningParser,
    "gpt_oss": HarmonyReasoningParser,
    # vLLM's name for it.
    "openai_gptoss": HarmonyReasoningParser,
}


def reasoning_parser(name: str, template: str = "") -> ReasoningParser:
    """
    A parser by name: a registered one, C{"auto"} for the one the chat
    template's markup names, or C{"START,END"} for custom tags (e.g.
    C{"<|begin_of_thought|>,<|end_of_thought|>"}).
    """
    if name == "auto":
        return detect(template)
    if name in REASONING_PARSERS:
        return REASONING_PARSERS[name]()
    start, sep, end = name.partition(",")
    if sep and start and end:
        return TagReasoningParser(name, start, end)
    known = ", ".join(["auto", *sorted(REASONING_PARSERS)])
    raise ValueError(f"unknown reasoning parser {name!r} (known: {known}; or START,END tags)")


def detect(template: str) -> ReasoningParser:
    """
    The syntax the template's markup names; C{<think>} tags when it names
    none, since models trained to think often carry a template that does
    not say so (and a model that never opens the tag loses nothing).
    """
    if HarmonyReasoningParser.claims(template):
        return HarmonyReasoningParser()
    return TagReasoningParser("think", thinks="<think>" in template)
