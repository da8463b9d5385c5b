"""
gpt-oss's harmony format: the channel lexer and the reasoning parser.

A harmony reply is a run of messages, each a header and a body::

    <|channel|>analysis<|message|>...reasoning...<|end|>
    <|start|>assistant<|channel|>final<|message|>...answer...<|return|>

The generation prompt ends with C{<|start|>assistant}, so the first
message has no C{<|start|>} of its own. A message with a recipient
(C{to=functions.NAME}, before or after the channel) is a tool call, ended
by C{<|call|>}; C{<|return|>} and C{<|call|>} end generation, so a reply
may simply stop after a body.

L{HarmonySplitter} turns the analysis channel into L{ReasoningText} and
the final channel, recipient-less commentary (a preamble the user sees)
and any other channel into L{ContentText}, holding every header back. A
call message is passed on as content for the tool-call splitter
(L{ds4tw._formats.tools.parsers.harmony}): its header from the channel or
recipient on (the C{<|start|>} and role dropped), its body, and the
marker that ended it. With no tools offered there is no tool-call
splitter, so a stray call reaches the client as that text, as any other
syntax's stray call markup does.

Text that cannot be a header (a model writing plain text, or raw JSON
under a structured-output grammar) is content.

Covered by tests/unit/test_harmony.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..._engine.interface import Grammar
from ..._types import ContentText, ReasoningText
from ..grammar import Prefix, literal
from ..text import held_suffix
from .base import Delta, ReasoningSplitter

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
END = "<|end|>"
CALL = "<|call|>"
RETURN = "<|return|>"
CONSTRAIN = "<|constrain|>"

#: Every special token harmony is written in.
SPECIAL_TOKENS = (START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN)

#: What ends a body: its end markers, or a new header begun without one
#: (models sometimes drop C{<|end|><|start|>assistant} between messages).
_BODY_ENDS = (END, CALL, RETURN, START, CHANNEL)

#: The role the model writes after C{<|start|>}.
ROLE = "assistant"

#: What a header may open with once the C{<|start|>} and role are read.
_OPENINGS = (CHANNEL, " to=")

#: Longer than any header a model writes: past it, the text is not one.
MAX_HEADER = 256

_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"([A-Za-z0-9_-]*)")

Kind = Literal["reasoning", "content", "call"]


@dataclass(frozen=True)
class Header:
    """One message's header, as written, without its C{<|start|>} and role."""

    text: str

    @property
    def channel(self) -> str:
        m = _CHANNEL_NAME.search(self.text)
        return m.group(1) if m else ""

    @property
    def recipient(self) -> str:
        m = _RECIPIENT.search(self.text)
        return m.group(1) if m else ""

    @property
    def kind(self) -> Kind:
        if self.recipient:
            return "call"
        return "reasoning" if self.channel == "analysis" else "content"


def strip_role(text: str) -> tuple[str, bool]:
    """
    C{text} without a leading C{<|start|>} and role, and whether what is
    left could still be (or begin) a header.
    """
    rest = text
    for part in (START, ROLE):
        if rest.startswith(part):
            rest = rest[len(part) :]
        elif part.startswith(rest):
            return rest, True
    return rest, any(rest.startswith(m) or m.startswith(rest) for m in _OPENINGS)


class HarmonySplitter:
    """
    The channel lexer: headers held back, bodies released as they come,
    by channel (see the module docstring).

    @param header: the start of the first header, already in the prompt.
    @param kind: the first body's kind, when the prompt opened a body.
    """

    def __init__(self, header: str = "", kind: Kind | None = None) -> None:
        self._prefix = header  # read as part of the first header, never sent
        self._held = ""
        self._kind: Kind | None = kind  # None while reading a header

    @property
    def in_reasoning(self) -> bool:
        return self._kind == "reasoning"

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        buf, self._held = self._held + text, ""
        while buf:
            buf = self._header(out, buf) if self._kind is None else self._body(out, buf)
        return out

    def _header(self, out: list[Delta], buf: str) -> str:
        whole = self._prefix + buf
        at = whole.find(MESSAGE)
        # The header so far, less the start of a C{<|message|>} that may be
        # arriving: judged as it will be once the whole marker is there.
        head = whole[: len(whole) - held_suffix(whole, (MESSAGE,))] if at == -1 else whole[:at]
        rest, plausible = strip_role(head)
        # What a header never holds: a body's end, a second start, a line break.
        broken = "\n" in rest or any(m in rest for m in (START, END, CALL, RETURN))
        if not plausible or broken or len(head) > MAX_HEADER:
            if self._prefix:
                # The reply does not go on with the prompt's header: it is
                # read as from a header of its own (it may write its own
                # <|start|>assistant). A reading a character at a time
                # must get here before it can tell what the text starts
                # with, so this cannot depend on that.
                self._prefix = ""
                return buf
            return self._not_header(out, buf)
        if at == -1:
            self._held = buf
            return ""
        self._prefix = ""
        self._kind = Header(rest).kind
        if self._kind == "call":
            out.append(ContentText(rest + MESSAGE))
        return whole[at + len(MESSAGE) :]

    def _not_header(self, out: list[Delta], buf: str) -> str:
        for marker in (END, CALL, RETURN):
            if buf.startswith(marker):
                return buf[len(marker) :]  # a stray end between messages: markup only
        self._kind = "content"
        for marker in (START, CHANNEL):
            if buf.startswith(marker):
                # An unknown role or channel: shown as written, markup and all.
                out.append(ContentText(marker))
                return buf[len(marker) :]
        return buf

    def _body(self, out: list[Delta], buf: str) -> str:
        if "<" not in buf:  # the common case: no marker, nor the start of one
            self._emit(out, buf)
            return ""
        found = [(i, m) for m in _BODY_ENDS if (i := buf.find(m)) != -1]
        if not found:
            keep = held_suffix(buf, _BODY_ENDS)
            self._emit(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return ""
        at, marker = min(found)
        ends_body = marker in (END, CALL, RETURN)
        self._emit(out, buf[: at + len(marker)] if ends_body and self._kind == "call" else buf[:at])
        self._kind = None
        return buf[at + len(marker) :] if ends_body else buf[at:]

    def _emit(self, out: list[Delta], text: str) -> None:
        if text:
            out.append(ReasoningText(text) if self._kind == "reasoning" else ContentText(text))

    def flush(self) -> list[Delta]:
        held, self._held = self._held, ""
        out: list[Delta] = []
        if self._kind is not None:
            self._emit(out, held)
        elif "<|" not in held and "to=" not in held:
            # A short reply that only looked like the start of a header.
            self._kind = "content"
            self._emit(out, held)
        # Else the text stopped inside a header: none of it is the model's answer.
        return out


def prompt_state(prompt_text: str) -> tuple[str, Kind | None]:
    """
    Where the reply starts: the header begun in the generation prompt
    (normally just the role, C{assistant}), or the kind of the body it
    opened (a template that writes C{<|channel|>final<|message|>} itself).
    """
    at = prompt_text.rfind(START)
    if at == -1:
        return "", None
    tail = prompt_text[at + len(START) :]
    if any(m in tail for m in (END, CALL, RETURN)):
        return "", None  # the last message is closed: a new one starts
    at = tail.find(MESSAGE)
    if at == -1:
        return tail, None
    rest, _ = strip_role(tail[:at])
    return "", Header(rest).kind


@dataclass(frozen=True)
class HarmonyReasoningParser:
    """gpt-oss: the analysis channel is reasoning (vLLM's C{openai_gptoss})."""

    name: str = "gpt_oss"
    preserved_tokens: tuple[str, ...] = SPECIAL_TOKENS
    #: The analysis message ends; the final answer begins.
    close: str = f"{END}{START}{ROLE}{CHANNEL}final{MESSAGE}"

    @staticmethod
    def claims(template: str) -> bool:
        return CHANNEL in template and MESSAGE in template

    def before(self, grammar: Grammar, prompt_text: str) -> Grammar:
        # gpt-oss answers in the final channel, after its analysis: a
        # grammar from the first token would make it write the answer as
        # raw text outside any channel, which it was never trained to do.
        header, kind = prompt_state(prompt_text)
        if kind in ("content", "call"):
            return grammar
        room = Prefix()
        text = room.text_until(END)
        analysis = f"{text} {literal(END + START + ROLE)}"
        if kind is None:
            if header.strip() != ROLE:
                return grammar  # not a reply's start that this knows
            analysis = f"({literal(CHANNEL + 'analysis' + MESSAGE)} {analysis})?"
        typed = f'(" " {literal(CONSTRAIN)} [a-z]+)?'
        final = f"{literal(CHANNEL + 'final')} {typed} {literal(MESSAGE)}"
        return room.before(grammar, f"{analysis} {final}")

    def splitter(self, prompt_text: str) -> ReasoningSplitter:
        header, kind = prompt_state(prompt_text)
        return HarmonySplitter(header, kind)
