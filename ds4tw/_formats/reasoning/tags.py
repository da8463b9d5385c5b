"""
Reasoning between two tags: C{<think>}...C{</think>} (DeepSeek R1 and
V3.1, Qwen3, GLM-4.5, MiniMax-M2, Kimi-K2-Thinking, SmolLM3 and most
others), or any pair given as C{START,END}. A template that opens the
tag in its generation prompt starts the model inside it, with no opening
tag in the reply.

The splitter is streaming: a tag split across tokens is recognised, and
only the bytes that could still be the start of a tag are held back.

Covered by tests/unit/test_reasoning.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..._engine.interface import Grammar
from ..._types import ContentText, ReasoningText
from ..grammar import Prefix, literal
from ..text import held_suffix
from .base import Delta, DeltaKind, ReasoningSplitter

_WHITESPACE = " \t\r\n"


class TagSplitter:
    """
    Text between C{start} and C{end} is reasoning, the rest content.

    The block counts only where models write it: at the start of the
    reply (after whitespace, as GLM writes it), or from the first token
    when the prompt opened it. A C{start} anywhere else is plain content
    (quoting the tag in an answer must not hide the answer). Whitespace
    before the block and between it and the answer is the template's
    layout, not text: it is dropped.
    """

    def __init__(self, start: str, end: str, in_reasoning: bool = False) -> None:
        self._start, self._end = start, end
        self._state = "reasoning" if in_reasoning else "start"  # start, reasoning, content
        self._held = ""
        self._trim = False

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        buf, self._held = self._held + text, ""
        while buf:
            if self._state == "start":
                stripped = buf.lstrip(_WHITESPACE)
                if stripped.startswith(self._start):
                    self._state = "reasoning"
                    buf = stripped[len(self._start) :]
                elif not stripped or self._start.startswith(stripped):
                    self._held = buf  # still whitespace, or still maybe the tag
                    return out
                else:
                    self._state = "content"
            elif self._state == "content":
                self._emit(out, "content", buf)
                return out
            else:
                at = buf.find(self._end)
                if at != -1:
                    self._emit(out, "reasoning", buf[:at])
                    self._state, self._trim = "content", True
                    buf = buf[at + len(self._end) :]
                    continue
                keep = held_suffix(buf, (self._end,))
                self._emit(out, "reasoning", buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                return out
        return out

    def _emit(self, out: list[Delta], kind: DeltaKind, text: str) -> None:
        if self._trim:
            # Templates put a newline or two after the closing tag.
            text = text.lstrip("\n")
            if not text:
                return
            self._trim = False
        if text:
            out.append(ReasoningText(text) if kind == "reasoning" else ContentText(text))

    def flush(self) -> list[Delta]:
        held, self._held = self._held, ""
        out: list[Delta] = []
        self._emit(out, "reasoning" if self._state == "reasoning" else "content", held)
        return out


@dataclass(frozen=True)
class TagReasoningParser:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    #: The model is known to think in these tags (named, or its template
    #: writes them). The fallback for a template that names none is not:
    #: a forced grammar makes room for a block only if the prompt opened it.
    thinks: bool = True

    @property
    def preserved_tokens(self) -> tuple[str, ...]:
        # Some models write their tags as special tokens (<|begin_of_thought|>).
        return (self.start, self.end)

    @property
    def close(self) -> str:
        return self.end

    def before(self, grammar: Grammar, prompt_text: str) -> Grammar:
        # The block, then the grammar: from inside it when the prompt
        # opened it, else optionally from its opening tag.
        room = Prefix()
        try:
            text = room.text_until(self.end)
        except ValueError:
            return grammar  # a closing tag text_until cannot express: no room made
        block = f"{text} {literal(self.end)} [ \\t\\n]*"
        if not self._opened(prompt_text):
            if not self.thinks:
                return grammar
            block = f"([ \\t\\n]* {literal(self.start)} {block})?"
        return room.before(grammar, block)

    def _opened(self, prompt_text: str) -> bool:
        return prompt_text.rstrip().endswith(self.start)

    def splitter(self, prompt_text: str) -> ReasoningSplitter:
        # A template that opens the block in the generation prompt (R1,
        # Qwen3 with thinking forced on) starts the model inside it.
        return TagSplitter(self.start, self.end, in_reasoning=self._opened(prompt_text))
