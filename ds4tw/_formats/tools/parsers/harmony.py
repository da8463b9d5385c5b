"""
gpt-oss (harmony) tool calls: a message addressed to C{functions.NAME},
its body the JSON arguments, ended by C{<|call|>}. The recipient comes
after the channel or before it::

    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{...}<|call|>

The harmony reasoning splitter (L{ds4tw._formats.reasoning.harmony}) passes a
call message on as content from its channel or recipient; this splitter
also reads calls in the raw reply (under C{--reasoning-parser none}),
where every other header is content. C{<|call|>} ends generation, so a
turn holds one call: the grammar allows one, and earlier turns' calls are
written back one message each.

Covered by tests/unit/test_harmony.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from string import ascii_lowercase
from typing import Any

from ...._engine.interface import Grammar
from ...._types import ToolCallArgs, ToolCallEnd, ToolCallStart
from ...grammar import RuleSet, literal
from ...reasoning.harmony import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MAX_HEADER,
    MESSAGE,
    RETURN,
    SPECIAL_TOKENS,
    START,
    Header,
)
from ...text import held_suffix
from ..scan import WHITESPACE, Malformed, ValueScanner
from ..spec import Tooling, ToolSpec
from .base import Event, ParserBase, Splitter, ToolCallSplitter, free_form_input, log

RECIPIENT = " to=functions."
_OPENINGS = (CHANNEL, RECIPIENT)
_ENDS = (CALL, END, RETURN)

#: Where a lazy grammar starts: the recipient, at the start of the reply
#: (right after the prompt's C{<|start|>assistant}), after a later
#: message's C{<|start|>assistant}, or after the channel. Anchored to a
#: header so that prose naming C{to=functions.} does not trigger it.
TRIGGER = (
    r"(?:^|<\|start\|>assistant|<\|channel\|>(?:commentary|analysis))" + f"({re.escape(RECIPIENT)})"
)


def _opening(head: str) -> bool | None:
    """Whether C{head} opens a call header: yes, not yet known (None), or no."""
    rest = head
    if rest.startswith(CHANNEL):
        rest = rest[len(CHANNEL) :]
        rest = rest[len(rest) - len(rest.lstrip(ascii_lowercase)) :]
        if not rest:
            return None
    elif CHANNEL.startswith(rest):
        return None
    if rest.startswith(RECIPIENT):
        return True
    return None if RECIPIENT.startswith(rest) else False


class HarmonySplitter(Splitter):
    """Content out; call messages (header, JSON body, end marker) in."""

    def __init__(self, tooling: Tooling) -> None:
        super().__init__(tooling)
        self._mode = "text"  # text, header, args, closing
        self._held = ""
        self._head = ""
        self._args: ValueScanner | None = None
        self._args_text: list[str] = []
        self._spec: ToolSpec | None = None

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            if self._mode == "text":
                buf = self._text(out, buf)
            elif self._mode == "header":
                buf = self._header(out, buf)
            elif self._mode == "args":
                buf = self._args_feed(out, buf)
            else:
                buf = self._closing(buf)
        return out

    def _text(self, out: list[Event], buf: str) -> str:
        found = [(i, m) for m in _OPENINGS if (i := buf.find(m)) != -1]
        if not found:
            keep = held_suffix(buf, _OPENINGS)
            self._content(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return ""
        at = min(found)[0]
        self._content(out, buf[:at])
        self._mode = "header"
        return buf[at:]

    def _header(self, out: list[Event], buf: str) -> str:
        head, self._head = self._head + buf, ""
        at = head.find(MESSAGE)
        # Less the start of a <|message|> that may be arriving: judged as it
        # will be once the whole marker is there, however the text is split.
        part = head[: len(head) - held_suffix(head, (MESSAGE,))] if at == -1 else head[:at]
        opening = _opening(part)
        broken = "\n" in part or len(part) > MAX_HEADER
        broken = broken or any(m in part for m in (START, *_ENDS))
        if opening is False or (opening is None and at != -1) or (opening and broken):
            if opening:
                log.warn("ds4tw: malformed tool call (a broken header); returned as text")
            # Not a call (another channel's header, in a raw reply): text.
            # Only the opening marker goes out; the rest is read again.
            marker = RECIPIENT if head.startswith(RECIPIENT) else CHANNEL
            self._content(out, head[: len(marker)])
            self._mode = "text"
            return head[len(marker) :]
        if at == -1:
            self._head = head
            return ""
        header = head[: at + len(MESSAGE)]
        name = Header(part).recipient.removeprefix("functions.")
        spec = self._tooling.spec(name)
        if spec is None or spec not in self._tooling.callable():
            log.warn(
                "ds4tw: malformed tool call ({why}); returned as text",
                why=f"the model called {name!r}, which is not an offered tool",
            )
            self._content(out, header)
            self._mode = "text"
            return head[len(header) :]
        self._head = header  # kept until the call is committed, to go back as text
        self._spec = spec
        self._args = ValueScanner()
        self._args_text = []
        self._mode = "args"
        return head[len(header) :]

    def _args_feed(self, out: list[Event], buf: str) -> str:
        scanner = self._args
        assert scanner is not None
        # Where the value begins in buf (0 if it began in an earlier piece);
        # the whitespace before it goes back with the header if the call
        # turns out malformed.
        start = 0 if scanner.started else None
        end = len(buf)
        fault: Malformed | None = None
        for i, c in enumerate(buf):
            try:
                if not scanner.feed(c):
                    end = i
                    break
                if start is None and scanner.started:
                    start = i
                    if c != "{":
                        raise Malformed("the arguments must be a JSON object")
            except Malformed as e:
                # Decided at the character, as a reading a character at a
                # time decides it: the rest, from the fault on, is read again.
                end, fault = i, e
                break
            if scanner.done:
                end = i + 1
                break
        begin = end if start is None else start
        self._head += buf[:begin]
        if fault is not None:
            self._broken(out, buf[begin:end], str(fault))
        else:
            self._take(out, buf[begin:end])
            if scanner.done:
                self._finish(out)
        return buf[end:]

    def _take(self, out: list[Event], text: str) -> None:
        """
        Arguments read: a function call is committed at their opening
        brace, and streams them as they come.
        """
        assert self._spec is not None
        if not text:
            return
        function = self._spec.kind == "function"
        if not self._args_text and function:
            out.append(ToolCallStart(self.calls, self._spec.name))
        self._args_text.append(text)
        if function:
            out.append(ToolCallArgs(self.calls, text))

    def _broken(self, out: list[Event], taken: str, why: str) -> None:
        """
        The arguments went wrong after C{taken}: a call committed (at its
        opening brace, in this piece or before) ends as written, with all
        that was read before the fault; one not yet committed goes back
        as text, header and all.
        """
        assert self._spec is not None
        if self._spec.kind == "function" and (self._args_text or taken):
            self._take(out, taken)
            log.warn("ds4tw: a tool call broke off ({why}); ending it as written", why=why)
            out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
            self._end_call()
            return
        self._malformed(out, "".join([self._head, *self._args_text, taken]), why)

    def _finish(self, out: list[Event]) -> None:
        assert self._spec is not None
        text = "".join(self._args_text)
        if self._spec.kind == "custom":
            # A free-form tool's input is the decoded string, sent when complete.
            given = free_form_input(text)
            if given is None:
                self._malformed(out, self._head + text, "a free-form tool's input must be a string")
                return
            out.append(ToolCallStart(self.calls, self._spec.name))
            out.append(ToolCallArgs(self.calls, given))
            text = given
        out.append(ToolCallEnd(self.calls, text))
        self._end_call()

    def _end_call(self) -> None:
        self._ended()
        self._mode = "closing"
        self._head = ""
        self._args = None
        self._spec = None

    def _malformed(self, out: list[Event], raw: str, why: str) -> None:
        log.warn("ds4tw: malformed tool call ({why}); returned as text", why=why)
        self._mode = "text"
        self._head = ""
        self._args = None
        self._spec = None
        self._content(out, raw)

    def _closing(self, buf: str) -> str:
        """After the arguments: the message's end marker is dropped."""
        stripped = buf.lstrip(WHITESPACE)
        for marker in _ENDS:
            if stripped.startswith(marker):
                self._mode = "text"
                return stripped[len(marker) :]
        if any(m.startswith(stripped) for m in _ENDS):
            self._held = stripped
            return ""
        self._mode = "text"
        return stripped

    def flush(self) -> list[Event]:
        out: list[Event] = []
        held, self._held = self._held, ""
        if self._mode == "args" and self._spec is not None:
            if self._spec.kind == "function" and self._args_text:
                out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
            else:
                self._content(out, self._head + "".join(self._args_text))
        elif self._mode == "header":
            self._content(out, self._head)
        elif self._mode == "text":
            self._content(out, held)
        self._mode = "text"
        self._head = ""
        return out


def _typescript(schema: Mapping[str, Any]) -> str:
    """A JSON Schema as the TypeScript-like type gpt-oss's tool list is written in."""
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object" and isinstance(schema.get("properties"), Mapping):
        required = schema.get("required", [])
        fields = [
            f"{name}{'' if name in required else '?'}: {_typescript(value)}"
            for name, value in schema["properties"].items()
        ]
        return "{\n" + ",\n".join(fields) + ",\n}"
    if kind == "array":
        return f"{_typescript(schema.get('items', {}))}[]"
    if kind == "integer":
        return "number"
    return kind if isinstance(kind, str) else "any"


class HarmonyParser(ParserBase):
    """gpt-oss's harmony format (vLLM's C{openai}, llama.cpp's GPT-OSS)."""

    name = "gpt_oss"
    preserved_tokens = SPECIAL_TOKENS
    reasons_first = True

    @staticmethod
    def claims(template: str) -> bool:
        return CHANNEL in template and CALL in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return HarmonySplitter(tooling)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        channel = rules.rule("call-channel", f'{literal(CHANNEL)} ("commentary" | "analysis")')
        # A separator before the type, so that no tool's name runs into it.
        ctype = rules.rule(
            "content-type", f'(" " {literal(CONSTRAIN)}? | {literal(CONSTRAIN)}) "json"'
        )
        message = literal(MESSAGE)
        in_role, in_channel = [], []
        for i, tool in enumerate(tooling.callable()):
            args = rules.schema(tool.arguments_schema(), f"args-{i}", f"tool {tool.name!r}")
            name = literal(tool.name)
            in_role.append(
                rules.rule(f"call-{i}-role", f"{name} {channel} {ctype}? {message} {args}")
            )
            in_channel.append(rules.rule(f"call-{i}-channel", f"{name} {ctype}? {message} {args}"))
        recipient = literal(RECIPIENT)
        if not tooling.forced and answer is None:
            # From the trigger's capture: the recipient, in either position.
            tails = " | ".join(in_role + in_channel)
            return rules.grammar(f"{recipient} ( {tails} )", (TRIGGER,))
        call = rules.rule(
            "call",
            f"{recipient} ( {' | '.join(in_role)} ) | "
            f"{channel} {recipient} ( {' | '.join(in_channel)} )",
        )
        # gpt-oss reasons (and may say what it is about to do) before it
        # calls: those messages come first, as many as it writes.
        body = rules.rule("body", '( [^<] | "<"+ [^<|] )* "<"*')
        before = rules.rule(
            "before",
            f'{literal(CHANNEL)} ("analysis" | "commentary") {message} {body} {literal(END)} '
            f"{literal(START + 'assistant')}",
        )
        if tooling.forced:
            return rules.grammar(f"{before}* {call}")
        assert answer is not None
        value = rules.schema(answer, "answer")
        final = f"{literal(CHANNEL + 'final')} {ctype}? {message} {value}"
        return rules.grammar(f"{before}* ( {call} | {final} )")

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        entries = []
        for tool in tools:
            params = tool.arguments_schema()
            signature = f"(_: {_typescript(params)})" if params.get("properties") else "()"
            entries.append(f"// {tool.description}\ntype {tool.name} = {signature} => any;\n\n")
        return (
            "# Tools\n\n## functions\n\nnamespace functions {\n\n"
            + "".join(entries)
            + "} // namespace functions\n\n"
            "Calls to these tools must go to the commentary channel: 'functions'."
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        # As the model writes them after the prompt's <|start|>assistant.
        return f"{START}assistant".join(
            f"{CHANNEL}commentary{RECIPIENT}{n} {CONSTRAIN}json{MESSAGE}"
            f"{json.dumps(a, ensure_ascii=False)}{CALL}"
            for n, a in calls
        )
