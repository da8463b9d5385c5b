"""
What every reasoning parser shares: the splitter and parser protocols,
and the splitter for a model with no reasoning syntax.

Covered by tests/unit/test_reasoning.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from ..._engine.interface import Grammar
from ..._types import ContentText, ReasoningText

DeltaKind = Literal["reasoning", "content"]
Delta = ReasoningText | ContentText


class ReasoningSplitter(Protocol):
    """Per-job state of a reasoning parser."""

    @property
    def in_reasoning(self) -> bool: ...

    def feed(self, text: str) -> list[Delta]: ...

    def flush(self) -> list[Delta]: ...


class ReasoningParser(Protocol):
    """Makes a splitter for one generation, given the rendered prompt."""

    @property
    def name(self) -> str: ...

    @property
    def preserved_tokens(self) -> tuple[str, ...]:
        """Special tokens the syntax is written in: their text must reach the splitter."""

    @property
    def close(self) -> str:
        """
        The text that ends a reasoning block and opens the answer: what the
        engine writes in the model's place when a reasoning budget runs out.
        """

    def splitter(self, prompt_text: str) -> ReasoningSplitter: ...

    def before(self, grammar: Grammar, prompt_text: str) -> Grammar:
        """
        C{grammar} (one that applies from the first token: a forced call,
        structured output) with room for the reasoning before it, so that
        a thinking model still thinks, and its reasoning is still reasoning.
        """


class PlainSplitter:
    """No reasoning syntax: everything is content."""

    in_reasoning = False

    def feed(self, text: str) -> list[Delta]:
        return [ContentText(text)] if text else []

    def flush(self) -> list[Delta]:
        return []


@dataclass(frozen=True)
class NoReasoningParser:
    name: str = "none"
    preserved_tokens: tuple[str, ...] = ()
    close: str = ""

    def splitter(self, prompt_text: str) -> ReasoningSplitter:
        return PlainSplitter()

    def before(self, grammar: Grammar, prompt_text: str) -> Grammar:
        return grammar
