"""
DeepSeek tool calls, written in the model's special tokens: a section
C{<｜tool▁calls▁begin｜>} ... C{<｜tool▁calls▁end｜>} of calls, each
C{<｜tool▁call▁begin｜>HEADER<｜tool▁sep｜>...<｜tool▁call▁end｜>}, the
arguments a JSON object (the bars are full-width, the spaces U+2581).

  - V3.1 (C{deepseek_v31}; also V3.1-Terminus):
    C{<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>};
  - V3 and R1 (C{deepseek_v3}; V3-0324, R1-0528, the R1 distills):
    C{<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>}.

V3.2 (C{deepseek_v32}) writes calls in DSML instead, an XML-like block
of tagged parameters (L{DSMLSplitter}; vLLM's C{deepseekv32_tool_parser.py}
and llama.cpp's DeepSeek-V3.2 template).

The same frame (a section of calls, each a header then JSON arguments)
is Kimi-K2's (L{ds4tw._formats.tools.parsers.kimi_k2}); L{SectionSplitter}
reads both from a L{Markup}.

Wire formats from vLLM's C{deepseekv3_tool_parser.py} and
C{deepseekv31_tool_parser.py}, llama.cpp's C{common_chat_parse_deepseek_r1}
and C{common_chat_parse_deepseek_v3_1} (whose section openings include
the misspellings R1 distills are seen to write), and the templates in
tests/data/templates/.

Covered by tests/unit/test_parser_deepseek_kimi.py.
"""

# The full-width bars are DeepSeek's own tokens, not look-alikes of "|".
# ruff: noqa: RUF001, RUF002, RUF003

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...._engine.interface import Grammar
from ...._types import ToolCallArgs, ToolCallEnd, ToolCallStart
from ...grammar import RuleSet, literal
from ...text import held_suffix
from ..scan import WHITESPACE, Malformed, ValueScanner
from ..spec import Tooling, ToolSpec
from .base import (
    Event,
    ParserBase,
    Splitter,
    ToolCallSplitter,
    complete,
    free_form_input,
    log,
    repeat,
    trigger,
)

#: A header longer than this without its end is not a call (names are short).
_MAX_HEADER = 256


@dataclass(frozen=True)
class Markup:
    """The markers of one section-of-calls syntax; every marker starts with C{<}."""

    #: What opens the section of calls (the first is what the model is taught).
    section_starts: tuple[str, ...]
    section_end: str
    call_start: str
    #: Ends a call's header (the tool's name or id) and starts its arguments.
    header_end: str
    call_end: str
    #: The tool's name in a header, or None if the header names none.
    name: Callable[[str], str | None]
    #: What may stand between the arguments and C{call_end} (R1's code fence).
    closing: str = WHITESPACE

    @property
    def openings(self) -> tuple[str, ...]:
        # A call without its section is read too: Kimi-K2 is seen to
        # write one (llama.cpp's parser allows it), and it costs nothing.
        return (*self.section_starts, self.call_start)

    @property
    def not_in_header(self) -> tuple[str, ...]:
        # Markup that breaks a header off (the header's end aside).
        return (*self.openings, self.call_end, self.section_end)

    @property
    def after_call(self) -> tuple[str, ...]:
        return (self.call_end, self.call_start, self.section_end)


def _first(buf: str, markers: Sequence[str]) -> tuple[int, str] | None:
    """The earliest marker in C{buf} and where it is."""
    best: tuple[int, str] | None = None
    for marker in markers:
        at = buf.find(marker)
        if at != -1 and (best is None or at < best[0]):
            best = (at, marker)
    return best


def _hold(buf: str, markers: Sequence[str]) -> int:
    """How much of C{buf}'s end could still grow into a marker."""
    # Every marker starts with "<": text with none near its end holds nothing.
    if "<" not in buf[-max(len(m) for m in markers) :]:
        return 0
    return held_suffix(buf, markers)


class SectionSplitter(Splitter):
    """
    Content, then a section of calls: each call's header names a tool,
    its arguments (a JSON object) stream as the model writes them.
    Markup that turns out not to be a call (an unknown tool, a header
    without its end, arguments that are not an object) goes out as the
    text it was, with a logged warning.
    """

    def __init__(self, tooling: Tooling, markup: Markup) -> None:
        super().__init__(tooling)
        self._m = markup
        self._mode = "text"  # text, section, header, args, closing
        self._held = ""
        #: Markup read since the last call or content: text again if no call follows.
        self._pending: list[str] = []
        self._header: list[str] = []
        self._args: ValueScanner | None = None
        self._args_text: list[str] = []
        self._spec: ToolSpec | None = None
        self._committed = False

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            mode = self._mode
            if mode == "text":
                buf = self._text(out, buf)
            elif mode == "section":
                buf = self._section(out, buf)
            elif mode == "header":
                buf = self._header_text(out, buf)
            elif mode == "args":
                buf = self._args_feed(out, buf)
            else:
                buf = self._closing(out, buf)
        return out

    def _text(self, out: list[Event], buf: str) -> str:
        found = _first(buf, self._m.openings) if "<" in buf else None
        if found is None:
            keep = _hold(buf, self._m.openings)
            self._content(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return ""
        at, marker = found
        self._content(out, buf[:at])
        self._pending = [marker]
        self._mode = "header" if marker == self._m.call_start else "section"
        return buf[at + len(marker) :]

    def _section(self, out: list[Event], buf: str) -> str:
        """Between calls: another call, the section's end, or (not markup) content."""
        stripped = buf.lstrip(WHITESPACE)
        self._pending.append(buf[: len(buf) - len(stripped)])
        if not stripped:
            return ""
        if stripped.startswith(self._m.call_start):
            self._pending.append(self._m.call_start)
            self._mode = "header"
            return stripped[len(self._m.call_start) :]
        if stripped.startswith(self._m.section_end):
            self._pending = []
            self._mode = "text"
            return stripped[len(self._m.section_end) :]
        if any(m.startswith(stripped) for m in (self._m.call_start, self._m.section_end)):
            self._held = stripped
            return ""
        self._release(out)
        return stripped

    def _header_text(self, out: list[Event], buf: str) -> str:
        header = "".join(self._header) + buf
        # Decided by whatever completes first, as if read a character at
        # a time: the header's end; other markup (the header is broken:
        # the markup is read again, it may open the next call); or its
        # (_MAX_HEADER + 1)th character. Markers begin with their only
        # "<", so they cannot overlap: the first to begin completes first.
        window = header[: _MAX_HEADER + 1]
        at = window.find(self._m.header_end)
        fault = _first(window, self._m.not_in_header)
        if fault is not None and (at == -1 or fault[0] < at):
            return self._broken_header(out, header, fault[0])
        if at == -1:
            if len(header) > _MAX_HEADER:
                return self._broken_header(out, header, _MAX_HEADER + 1)
            self._header = [header]
            return ""
        self._header = []
        self._pending.append(header[: at + len(self._m.header_end)])
        name = self._m.name(header[:at])
        spec = self._tooling.spec(name) if name else None
        if spec is None or spec not in self._tooling.callable():
            self._malformed(out, f"the model called {name!r}, which is not an offered tool")
            return header[at + len(self._m.header_end) :]
        self._spec = spec
        self._args = ValueScanner()
        self._args_text = []
        self._committed = False
        self._mode = "args"
        return header[at + len(self._m.header_end) :]

    def _broken_header(self, out: list[Event], header: str, at: int) -> str:
        """The header up to C{at} goes out as text; the rest is read again."""
        self._header = []
        self._pending.append(header[:at])
        self._malformed(out, "no end to the call's header")
        return header[at:]

    def _args_feed(self, out: list[Event], buf: str) -> str:
        scanner, spec = self._args, self._spec
        assert scanner is not None and spec is not None
        start = len(self._args_text)
        at, rest = 0, ""
        try:
            for at, c in enumerate(buf):
                if not scanner.feed(c):
                    rest = buf[at:]
                    break
                if not scanner.started:
                    self._pending.append(c)  # whitespace before the object
                    continue
                if not self._args_text:
                    if c != "{":
                        raise Malformed("the arguments must be a JSON object")
                    if spec.kind == "function":
                        out.append(self._commit())
                self._args_text.append(c)
                if scanner.done:
                    rest = buf[at + 1 :]
                    break
        except Malformed as e:
            if self._committed:
                log.warn("ds4tw: a tool call broke off ({why}); ending it as written", why=e)
                self._send(out, start)
                out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
                self._end_call()
                return buf[at:]
            # Text up to the fault goes out as it was; from the fault on it
            # is read again, as it would be had it come a character at a
            # time (a free-form tool's arguments are held until complete).
            self._pending += self._args_text
            self._malformed(out, str(e))
            return buf[at:]
        self._send(out, start)
        if scanner.done:
            self._finish(out)
        return rest

    def _send(self, out: list[Event], start: int) -> None:
        """The arguments written since C{start}, live (a free-form tool's wait)."""
        if self._committed and len(self._args_text) > start:
            out.append(ToolCallArgs(self.calls, "".join(self._args_text[start:])))

    def _commit(self) -> ToolCallStart:
        assert self._spec is not None
        self._committed = True
        self._pending = []
        return ToolCallStart(self.calls, self._spec.name)

    def _finish(self, out: list[Event]) -> None:
        assert self._spec is not None
        text = "".join(self._args_text)
        if self._spec.kind == "custom":
            # A free-form tool's input is decoded when complete.
            given = free_form_input(text)
            if given is None:
                self._pending.append(text)
                self._malformed(out, "a free-form tool's input must be a string")
                return
            out.append(self._commit())
            out.append(ToolCallArgs(self.calls, given))
            text = given
        out.append(ToolCallEnd(self.calls, text))
        self._end_call()

    def _end_call(self) -> None:
        self._ended()
        self._pending = []
        self._args = None
        self._args_text = []
        self._spec = None
        self._committed = False
        self._mode = "closing"

    def _closing(self, out: list[Event], buf: str) -> str:
        """After the arguments: the call's end, or the next marker."""
        stripped = buf.lstrip(self._m.closing)
        if not stripped:
            return ""
        if stripped.startswith(self._m.call_end):
            self._mode = "section"
            return stripped[len(self._m.call_end) :]
        if stripped.startswith((self._m.call_start, self._m.section_end)):
            self._mode = "section"
            return stripped
        if any(m.startswith(stripped) for m in self._m.after_call):
            self._held = stripped
            return ""
        self._mode = "text"
        return stripped

    def _malformed(self, out: list[Event], why: str) -> None:
        log.warn("ds4tw: malformed tool call ({why}); returned as text", why=why)
        self._pending += self._header
        self._header = []
        self._args = None
        self._args_text = []
        self._spec = None
        self._release(out)

    def _release(self, out: list[Event]) -> None:
        """Markup that made no call goes out as the text it was."""
        self._content(out, "".join(self._pending))
        self._pending = []
        self._mode = "text"

    def flush(self) -> list[Event]:
        out: list[Event] = []
        held, self._held = self._held, ""
        if self._mode == "args" and self._committed:
            out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
        elif self._mode in ("section", "header", "args"):
            self._pending += self._header + self._args_text + [held]
            self._header, self._args_text = [], []
            self._release(out)
        elif self._mode == "text":
            self._content(out, held)
        self._mode = "text"
        return out


# -- DeepSeek --------------------------------------------------------------------

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

#: Section openings R1 models are seen to write besides the real token
#: (llama.cpp's C{common_chat_parse_deepseek_r1} accepts the same).
_MISSPELT_BEGINS = (
    "<｜tool_calls_begin｜>",
    "<｜tool calls begin｜>",
    "<｜tool\\_calls\\_begin｜>",
    "<｜tool▁calls｜>",
)

_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)


def _v31_name(header: str) -> str | None:
    name = header.strip()
    return name if name and "\n" not in name else None


def _v3_name(header: str) -> str | None:
    # "function<｜tool▁sep｜>NAME\n": the type, then the name on its own line.
    kind, sep, name = header.partition(SEP)
    name = name.strip()
    return name if sep and kind.strip() == "function" and name and "\n" not in name else None


V31_MARKUP = Markup(
    (CALLS_BEGIN, *_MISSPELT_BEGINS), CALLS_END, CALL_BEGIN, SEP, CALL_END, _v31_name
)
V3_MARKUP = Markup(
    (CALLS_BEGIN, *_MISSPELT_BEGINS),
    CALLS_END,
    CALL_BEGIN,
    "```json",
    CALL_END,
    _v3_name,
    closing=WHITESPACE + "`",
)


def _tool_lines(tools: Sequence[ToolSpec]) -> str:
    return "\n\n".join(
        f"### {t.name}\nDescription: {t.description}\n\n"
        f"Parameters: {json.dumps(dict(t.arguments_schema()), ensure_ascii=False)}"
        for t in tools
    )


def _grammar(
    tooling: Tooling,
    answer: Mapping[str, Any] | None,
    call: Callable[[str, str], str],
    between: str,
) -> Grammar:
    """Calls in DeepSeek's section: C{call(name literal, arguments rule)} writes each."""
    rules = RuleSet()
    each = []
    for i, tool in enumerate(tooling.callable()):
        args = rules.schema(tool.arguments_schema(), f"args-{i}", f"tool {tool.name!r}")
        each.append(call(literal(tool.name), args))
    one = rules.rule("call", " | ".join(each))
    calls = rules.rule(
        "calls", f"{literal(CALLS_BEGIN)} {repeat(tooling, one, between)} {literal(CALLS_END)}"
    )
    return complete(rules, tooling, calls, trigger(CALLS_BEGIN), answer)


class DeepSeekV31Parser(ParserBase):
    """DeepSeek V3.1: C{<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>}."""

    name = "deepseek_v31"
    preserved_tokens = _TOKENS

    @staticmethod
    def claims(template: str) -> bool:
        return CALL_BEGIN in template and SEP in template and "```json" not in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return SectionSplitter(tooling, V31_MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        def call(name: str, args: str) -> str:
            return f"{literal(CALL_BEGIN)} {name} {literal(SEP)} {args} {literal(CALL_END)}"

        return _grammar(tooling, answer, call, "")

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        # DeepSeek-V3.1's template takes no tools: its model card gives
        # this system text for them instead.
        return (
            f"## Tools\nYou have access to the following tools:\n\n{_tool_lines(tools)}\n\n"
            "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
            f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
            f"{{{{additional_tool_calls}}}}{CALLS_END}\n\n"
            "Where:\n"
            "- `tool_call_name` must be an exact match to one of the available tools\n"
            "- `tool_call_arguments` must be valid JSON that strictly follows the tool's "
            "Parameters Schema\n"
            "- For multiple tool calls, chain them directly without separators or spaces"
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        body = "".join(
            f"{CALL_BEGIN}{n}{SEP}{json.dumps(a, ensure_ascii=False)}{CALL_END}" for n, a in calls
        )
        return f"{CALLS_BEGIN}{body}{CALLS_END}"


class DeepSeekV3Parser(ParserBase):
    """
    DeepSeek V3 and R1: C{<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME}
    then the arguments in a C{json} code fence, calls a newline apart.
    """

    name = "deepseek_v3"
    preserved_tokens = _TOKENS

    @staticmethod
    def claims(template: str) -> bool:
        return CALL_BEGIN in template and "```json" in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return SectionSplitter(tooling, V3_MARKUP)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        def call(name: str, args: str) -> str:
            head = literal(f"{CALL_BEGIN}function{SEP}")
            return f'{head} {name} "\\n```json\\n" {args} "\\n```" {literal(CALL_END)}'

        return _grammar(tooling, answer, call, '"\\n"?')

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        return (
            f"## Tools\nYou have access to the following tools:\n\n{_tool_lines(tools)}\n\n"
            "To call tools, write exactly:\n"
            f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name\n```json\n"
            f"tool_call_arguments\n```{CALL_END}{CALLS_END}\n\n"
            "Where `tool_call_name` is one of the available tools and "
            "`tool_call_arguments` is a JSON object that follows its Parameters schema; "
            "put further calls on their own lines before the closing token."
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        body = "\n".join(
            f"{CALL_BEGIN}function{SEP}{n}\n```json\n{json.dumps(a, ensure_ascii=False)}\n```"
            f"{CALL_END}"
            for n, a in calls
        )
        return f"{CALLS_BEGIN}{body}{CALLS_END}"


# -- DeepSeek V3.2 (DSML) ----------------------------------------------------------

DSML = "｜DSML｜"
CALLS_OPEN = f"<{DSML}function_calls>"
CALLS_CLOSE = f"</{DSML}function_calls>"
INVOKE = f'<{DSML}invoke name="'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM = f'<{DSML}parameter name="'
PARAM_CLOSE = f"</{DSML}parameter>"


class DSMLSplitter(Splitter):
    """
    DeepSeek V3.2's DSML: C{<｜DSML｜invoke name="NAME">} holds one
    C{<｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>}
    per argument, a raw string (C{string="true"}) or JSON. The client gets
    the arguments as a JSON object, built and streamed as the values come.
    """

    def __init__(self, tooling: Tooling) -> None:
        super().__init__(tooling)
        self._mode = "text"  # text, block, invoke-head, invoke, param-head, value
        self._held = ""
        self._pending: list[str] = []
        self._head: list[str] = []
        self._args: list[str] = []
        self._string = False
        self._custom = False
        self._name = ""

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            mode = self._mode
            if mode == "text":
                at = buf.find(CALLS_OPEN)
                if at == -1:
                    keep = _hold(buf, (CALLS_OPEN,))
                    self._content(out, buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    return out
                self._content(out, buf[:at])
                self._pending = [CALLS_OPEN]
                self._mode = "block"
                buf = buf[at + len(CALLS_OPEN) :]
            elif mode in ("block", "invoke"):
                buf = self._between(out, buf)
            elif mode in ("invoke-head", "param-head"):
                buf = self._head_text(out, buf)
            else:
                buf = self._value(out, buf)
        return out

    def _between(self, out: list[Event], buf: str) -> str:
        """Between calls (C{block}) or between a call's parameters (C{invoke})."""
        stripped = buf.lstrip(WHITESPACE)
        if self._mode == "block":
            self._pending.append(buf[: len(buf) - len(stripped)])
            nexts = {INVOKE: "invoke-head", CALLS_CLOSE: "text"}
        else:
            nexts = {PARAM: "param-head", INVOKE_CLOSE: "block"}
        if not stripped:
            return ""
        for marker, mode in nexts.items():
            if stripped.startswith(marker):
                if marker == INVOKE:
                    self._pending.append(marker)
                elif marker == CALLS_CLOSE:
                    self._pending = []
                elif marker == INVOKE_CLOSE:
                    self._end(out)
                self._mode = mode
                return stripped[len(marker) :]
        if any(m.startswith(stripped) for m in nexts):
            self._held = stripped
            return ""
        if self._mode == "invoke":
            log.warn("ds4tw: a tool call broke off (text inside the invoke); ending it as written")
            self._end(out)
        else:
            self._release(out)
        self._mode = "text"
        return stripped

    def _head_text(self, out: list[Event], buf: str) -> str:
        head = "".join(self._head) + buf
        # Decided by what comes first, as if read a character at a time:
        # the tag's ">", or a newline or its (_MAX_HEADER + 1)th character
        # (no tag: broken).
        window = head[: _MAX_HEADER + 1]
        at, newline = window.find(">"), window.find("\n")
        if (newline != -1 and (at == -1 or newline < at)) or (at == -1 and len(head) > _MAX_HEADER):
            self._head = []
            return self._broken_head(out, head)
        if at == -1:
            self._head = [head]
            return ""
        self._head = []
        tag, rest = head[:at], head[at + 1 :]
        if self._mode == "invoke-head":
            self._pending.append(tag + ">")
            name = tag.removesuffix('"')
            spec = self._tooling.spec(name)
            if spec is None or spec not in self._tooling.callable():
                self._broken(out, f"the model called {name!r}, which is not an offered tool")
                return rest
            self._custom = spec.kind == "custom"
            self._pending = []
            self._args = []
            if not self._custom:
                out.append(ToolCallStart(self.calls, name))
            self._name = name
            self._send(out, "{")
            self._mode = "invoke"
            return rest
        key, _, attrs = tag.partition('"')
        self._string = 'string="false"' not in attrs
        piece = (", " if len(self._args) > 1 else "") + json.dumps(key, ensure_ascii=False) + ": "
        self._send(out, piece + ('"' if self._string else ""))
        self._mode = "value"
        return rest

    def _broken_head(self, out: list[Event], head: str) -> str:
        """
        A tag with no end: its markup goes out as text, and what followed
        its opening is read again as text (it may open the next block).
        """
        if self._mode == "invoke-head":
            self._broken(out, "no end to a DSML tag")
            return head
        # Inside a call (committed): the call ends as written.
        log.warn("ds4tw: a tool call broke off (no end to a DSML tag); ending it as written")
        self._end(out)
        self._mode = "text"
        return PARAM + head

    def _value(self, out: list[Event], buf: str) -> str:
        at = buf.find(PARAM_CLOSE)
        value = buf if at == -1 else buf[:at]
        keep = _hold(value, (PARAM_CLOSE,)) if at == -1 else 0
        self._held = value[len(value) - keep :] if keep else ""
        value = value[: len(value) - keep]
        # Escaping is per character, so the escaped pieces join up exactly.
        self._send(out, json.dumps(value, ensure_ascii=False)[1:-1] if self._string else value)
        if at == -1:
            return ""
        if self._string:
            self._send(out, '"')
        self._mode = "invoke"
        return buf[at + len(PARAM_CLOSE) :]

    def _send(self, out: list[Event], text: str) -> None:
        if text:
            self._args.append(text)
            if not self._custom:  # a free-form tool's input is decoded when complete
                out.append(ToolCallArgs(self.calls, text))

    def _end(self, out: list[Event]) -> None:
        if self._mode == "value" and self._string:
            self._send(out, '"')
        self._send(out, "}")
        text = "".join(self._args)
        if self._custom:
            given = free_form_input(text)
            text = given if given is not None else text
            out += [ToolCallStart(self.calls, self._name), ToolCallArgs(self.calls, text)]
        out.append(ToolCallEnd(self.calls, text))
        self._ended()
        self._args = []

    def _broken(self, out: list[Event], why: str) -> None:
        log.warn("ds4tw: malformed tool call ({why}); returned as text", why=why)
        self._release(out)

    def _release(self, out: list[Event]) -> None:
        self._content(out, "".join(self._pending))
        self._pending = []
        self._mode = "text"

    def flush(self) -> list[Event]:
        out: list[Event] = []
        held, self._held = self._held, ""
        if self._mode in ("invoke", "param-head", "value"):
            # Cut off inside a call: it ends as written, but does not count.
            if not self._custom:
                out.append(ToolCallEnd(self.calls, "".join(self._args)))
        elif self._mode in ("block", "invoke-head"):
            self._pending += [*self._head, held]
            self._head = []
            self._release(out)
        elif self._mode == "text":
            self._content(out, held)
        self._mode = "text"
        return out


def _is_string(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "string"


class DeepSeekV32Parser(ParserBase):
    """DeepSeek V3.2: calls in DSML, arguments as tagged parameters."""

    name = "deepseek_v32"
    preserved_tokens = (DSML,)

    @staticmethod
    def claims(template: str) -> bool:
        return "DSML" in template and "function_calls" in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return DSMLSplitter(tooling)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        # A raw string value: anything up to the closing tag (no "<" then "/").
        raw = rules.rule("dsml-raw", '([^<] | "<" [^/])*')
        each = []
        for i, tool in enumerate(tooling.callable()):
            schema = tool.arguments_schema()
            props: Mapping[str, Any] = schema.get("properties") or {}
            required = set(schema.get("required") or ())
            params = []
            for j, (key, sub) in enumerate(props.items()):
                string = _is_string(sub)
                value = raw if string else rules.schema(sub, f"arg-{i}-{j}", f"tool {tool.name!r}")
                tag = f'{PARAM}{key}" string="{"true" if string else "false"}">'
                param = f'"\\n" {literal(tag)} {value} {literal(PARAM_CLOSE)}'
                params.append(param if key in required else f"({param})?")
            body = " ".join(params)
            head = literal(f'{INVOKE}{tool.name}">')
            each.append(f'"\\n" {head} {body} "\\n" {literal(INVOKE_CLOSE)}')
        one = rules.rule("call", " | ".join(each))
        calls = rules.rule(
            "calls",
            f'{literal(CALLS_OPEN)} {repeat(tooling, one, "")} "\\n" {literal(CALLS_CLOSE)}',
        )
        return complete(rules, tooling, calls, trigger(CALLS_OPEN), answer)

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        listed = "\n".join(
            json.dumps(t.template_entry()["function"], ensure_ascii=False) for t in tools
        )
        return (
            "## Tools\n\nYou have access to a set of tools you can use to answer the user's "
            f'question.\nYou can invoke functions by writing a "<{DSML}function_calls>" block:\n'
            + self.format_calls([("$FUNCTION_NAME", {"$PARAMETER_NAME": "$PARAMETER_VALUE"})])
            + '\n\nString parameters are written as is, with string="true"; numbers, '
            'booleans, arrays and objects as JSON, with string="false".\n\n'
            f"Here are the functions available in JSONSchema format:\n<functions>\n{listed}\n"
            "</functions>"
        )

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        def param(key: str, value: Any) -> str:
            string = isinstance(value, str)
            text = value if string else json.dumps(value, ensure_ascii=False)
            flag = "true" if string else "false"
            return f'{PARAM}{key}" string="{flag}">{text}{PARAM_CLOSE}'

        invokes = "".join(
            f'\n{INVOKE}{n}">\n'
            + "\n".join(param(k, v) for k, v in (a or {}).items())
            + f"\n{INVOKE_CLOSE}"
            for n, a in calls
        )
        return f"{CALLS_OPEN}{invokes}\n{CALLS_CLOSE}"
