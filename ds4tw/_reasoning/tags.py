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

from .._text import held_suffix
from .._types import ContentText, ReasoningText
from .base import Delta, DeltaKind, ReasoningSplitter


class TagSplitter:
    """
    Text between C{start} and C{end} is reasoning, the rest content. A
    C{start} after the first reasoning block is plain content (models do
    not reopen it; quoting the tag in an answer must not hide the answer).
    """

    def __init__(self, start: str, end: str, in_reasoning: bool = False) -> None:
        self._start, self._end = start, end
        self.in_reasoning = in_reasoning
        self._seen_block = in_reasoning
        self._held = ""
        self._at_content_start = False

    def _tag(self) -> str | None:
        if self.in_reasoning:
            return self._end
        return None if self._seen_block else self._start

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        buf = self._held + text
        self._held = ""
        while buf:
            tag = self._tag()
            kind: DeltaKind = "reasoning" if self.in_reasoning else "content"
            if tag is None:
                self._emit(out, kind, buf)
                return out
            at = buf.find(tag)
            if at == -1:
                keep = held_suffix(buf, (tag,))
                self._emit(out, kind, buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                return out
            self._emit(out, kind, buf[:at])
            buf = buf[at + len(tag) :]
            if self.in_reasoning:
                self.in_reasoning = False
                self._at_content_start = True
            else:
                self.in_reasoning = self._seen_block = True
        return out

    def _emit(self, out: list[Delta], kind: DeltaKind, text: str) -> None:
        if kind == "content" and self._at_content_start:
            # Templates put a newline or two after the closing tag.
            text = text.lstrip("\n")
            if not text:
                return
            self._at_content_start = False
        if text:
            out.append(ReasoningText(text) if kind == "reasoning" else ContentText(text))

    def flush(self) -> list[Delta]:
        held, self._held = self._held, ""
        out: list[Delta] = []
        self._emit(out, "reasoning" if self.in_reasoning else "content", held)
        return out


@dataclass(frozen=True)
class TagReasoningParser:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    preserved_tokens: tuple[str, ...] = ()

    @property
    def close(self) -> str:
        return self.end

    def splitter(self, prompt_text: str) -> ReasoningSplitter:
        # A template that opens the block in the generation prompt (R1,
        # Qwen3 with thinking forced on) starts the model inside it.
        opened = prompt_text.rstrip().endswith(self.start)
        return TagSplitter(self.start, self.end, in_reasoning=opened)
