"""
What every tool-call syntax shares: the parser and splitter protocols,
one JSON call object in progress (L{CallObject}), the splitter machinery
(content out, calls in, a malformed call back to text), calls between
two markers (L{MarkedSplitter}) and the grammar helpers.

A call is committed (L{ToolCallStart} sent) only once its tool is known
and its arguments have begun as an object: anything malformed before that
(an unknown tool, text that is not JSON) is released as content with a
logged warning, never an error. After the commit the call can only end;
an unconstrained model that breaks its JSON there ends the call with the
text it wrote (a warning is logged). Under a grammar that cannot happen.

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Self

from twisted.logger import Logger

from ...._engine.interface import Grammar
from ...._types import ContentText, ToolCallArgs, ToolCallEnd, ToolCallEvent, ToolCallStart
from ...grammar import RuleSet
from ...text import held_suffix
from ..scan import WHITESPACE, Args, CallScanner, Malformed, Name, ObjectEnd, ScanEvent
from ..spec import Tooling, ToolSpec

log = Logger()

Event = ContentText | ToolCallEvent


class ToolCallSplitter(Protocol):
    """Per-job state of a tool-call parser."""

    #: Calls completed so far.
    calls: int

    def feed(self, text: str) -> list[Event]: ...

    def flush(self) -> list[Event]: ...


class ToolCallParser(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key(self) -> str:
        """The name and the variant read from the template (the grammar cache's key)."""

    @property
    def preserved_tokens(self) -> tuple[str, ...]:
        """Special tokens the syntax is written in: their text must reach the splitter."""

    @property
    def reasons_first(self) -> bool:
        """
        The forced grammar already lets the model reason before its calls
        (gpt-oss's analysis messages); else the reasoning parser makes room.
        """

    def splitter(self, tooling: Tooling) -> ToolCallSplitter: ...

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        """
        The grammar for this turn: forced calls from the first token when
        the choice is C{required}, else lazy from the call's opening; with
        C{answer} (structured output beside tools), the reply is either
        calls or JSON valid against that schema, from the first token.
        """

    def instructions(self, tools: Sequence[ToolSpec]) -> str: ...

    def prompt_call_id(self, call_id: str, name: str, index: int) -> str:
        """
        The id an earlier call (the C{index}th of the conversation) has in
        the prompt: the client's, unless the model's syntax numbers its calls.
        """

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str: ...


def free_form_input(arguments: str) -> str | None:
    """
    A free-form tool's input from the arguments object the model wrote
    for it (C{{"input": "..."}}), or None when it is not that.
    """
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    given = value.get("input") if isinstance(value, dict) else None
    return given if isinstance(given, str) else None


class ParserBase:
    """Defaults of the class-level side of a parser (see L{ds4tw._formats.tools.parsers})."""

    name = ""
    preserved_tokens: tuple[str, ...] = ()
    reasons_first = False

    @property
    def key(self) -> str:
        return self.name

    @classmethod
    def for_template(cls, template: str) -> Self:
        """The parser for a model whose chat template is C{template}."""
        return cls()

    @staticmethod
    def claims(template: str) -> bool:
        """Whether C{template}'s own markup is this syntax (for C{auto})."""
        return False

    def prompt_call_id(self, call_id: str, name: str, index: int) -> str:
        return call_id


# -- one call in progress -------------------------------------------------------


class CallObject:
    """
    One call object being written: L{CallScanner} events turned into
    tool-call events, with the commit rule of the module docstring.
    """

    def __init__(self, tooling: Tooling, index: int, marker: str = "") -> None:
        self._tooling = tooling
        self.index = index
        self.scanner = CallScanner()
        self.spec: ToolSpec | None = None
        self.committed = False
        #: The marker that opened the call, and everything fed since.
        self.marker = marker
        self.raw: list[str] = []
        #: Characters of the arguments sent as L{ToolCallArgs} so far.
        self.sent = 0
        self._undelivered: list[Event] = []

    def feed(self, text: str) -> tuple[list[Event], str | None]:
        """Events, and the text after the object once it has ended."""
        self.raw.append(text)
        out: list[Event] = []
        fault: Malformed | None = None
        try:
            scanned: Sequence[ScanEvent]
            try:
                scanned = self.scanner.feed(text)
            except Malformed as e:
                # What came before the fault counts, as if fed apart.
                scanned, fault = e.events, e
            for event in scanned:
                if isinstance(event, Name):
                    self.spec = self._known(event.name)
                elif isinstance(event, Args):
                    assert self.spec is not None
                    if self.spec.kind == "custom":
                        continue  # its input is decoded when complete
                    if not self.committed:
                        if not event.text.lstrip().startswith("{"):
                            raise Malformed("the arguments must be a JSON object")
                        out.append(self._commit())
                    out.append(ToolCallArgs(self.index, event.text))
                    self.sent += len(event.text)
                elif isinstance(event, ObjectEnd):
                    out += self._end()
                    return out, event.rest
            if fault is not None:
                raise fault
        except Malformed:
            self._undelivered = out  # made before the fault: L{abandon} sends them
            raise
        return out, None

    def _known(self, name: str) -> ToolSpec:
        spec = self._tooling.spec(name)
        if spec is None or spec not in self._tooling.callable():
            raise Malformed(f"the model called {name!r}, which is not an offered tool")
        return spec

    def _commit(self) -> ToolCallStart:
        assert self.spec is not None
        self.committed = True
        return ToolCallStart(self.index, self.spec.name)

    def _end(self) -> list[Event]:
        assert self.spec is not None
        text = self.scanner.arguments()
        try:
            value = json.loads(text)
        except ValueError as e:
            raise Malformed(f"the arguments are not JSON: {e}") from e
        if not isinstance(value, dict):
            raise Malformed("the arguments must be a JSON object")
        out: list[Event] = []
        if self.spec.kind == "custom":
            given = value.get("input")
            if not isinstance(given, str):
                raise Malformed("a free-form tool's input must be a string")
            text = given
        if not self.committed:
            out.append(self._commit())
        if self.spec.kind == "custom" or self.scanner.args_is_string or not self.sent:
            # Held until complete (it had to be decoded first; or there
            # were none, and they are {}); the decode keepalive covered
            # the silence.
            out.append(ToolCallArgs(self.index, text))
            self.sent = len(text)
        out.append(ToolCallEnd(self.index, text))
        return out

    def abandon(self) -> list[Event]:
        """
        The text ended or broke after the commit: end the call as it
        stands, with what of its arguments a broken feed did not send.
        """
        text = "".join(self.scanner.args)
        unsent = [ToolCallArgs(self.index, text[self.sent :])] if text[self.sent :] else []
        return [*self._undelivered, *unsent, ToolCallEnd(self.index, text)]

    def written(self) -> str:
        """The text fed since the marker."""
        return "".join(self.raw)

    def failure_point(self) -> int:
        """
        Where in L{written} the call went wrong: the text fed again a
        character at a time, so that the answer does not depend on how
        the text was split into tokens. (Only a malformed call pays this.)
        """
        probe = CallObject(self._tooling, self.index)
        for i, c in enumerate(self.written()):
            try:
                _, rest = probe.feed(c)
            except Malformed:
                return i
            if rest is not None:
                return i + 1
        return len(self.written())


class Splitter:
    """
    What every syntax's splitter shares: content out, calls in progress,
    and the fallback of a malformed call to text.
    """

    def __init__(self, tooling: Tooling) -> None:
        self._tooling = tooling
        self.calls = 0
        self._call: CallObject | None = None
        self._after_call = False

    def _content(self, out: list[Event], text: str) -> None:
        if self._after_call:
            # Models put newlines between and after calls; that is not an answer.
            text = text.lstrip(WHITESPACE)
            if not text:
                return
            self._after_call = False
        if text:
            out.append(ContentText(text))

    def _start_call(self, marker: str) -> CallObject:
        call = CallObject(self._tooling, self.calls, marker)
        self._call = call
        return call

    def _feed_call(self, out: list[Event], text: str) -> tuple[str, str] | None:
        """
        Feed the open call. None while it goes on; when it is over,
        C{("call", rest)} for a call that ended (well or broken off after
        its commit) with the text after it, or C{("text", rest)} when it
        was malformed: the marker and the text up to the fault went out as
        text, and the rest (from the fault on: it may open the next call)
        is to be read again.
        """
        call = self._call
        assert call is not None
        try:
            events, rest = call.feed(text)
        except Malformed as e:
            self._call = None
            written = call.written()
            at = call.failure_point()
            if call.committed:
                log.warn("ds4tw: a tool call broke off ({why}); ending it as written", why=e)
                out += call.abandon()
                self._ended()
                return "call", written[at:]
            log.warn("ds4tw: malformed tool call ({why}); returned as text", why=e)
            self._content(out, call.marker + written[:at])
            return "text", written[at:]
        out += events
        if rest is None:
            return None
        self._call = None
        self._ended()
        return "call", rest

    def _ended(self) -> None:
        self.calls += 1
        self._after_call = True

    def _flush_call(self, out: list[Event]) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        if call.committed:
            out += call.abandon()
        else:
            self._content(out, call.marker + call.written())


class MarkedSplitter(Splitter):
    """Calls between C{start} and C{end} markers; text outside them is content."""

    def __init__(self, tooling: Tooling, start: str, end: str) -> None:
        super().__init__(tooling)
        self._start, self._end = start, end
        self._held = ""
        self._closing = False  # the object ended; waiting for the end marker

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            if self._closing:
                at = buf.find(self._end)
                if at == -1:
                    keep = held_suffix(buf, (self._end,))
                    self._held = buf[len(buf) - keep :] if keep else ""
                    return out
                self._closing = False
                buf = buf[at + len(self._end) :]
            elif self._call is not None:
                result = self._feed_call(out, buf)
                if result is None:
                    return out
                self._closing = result[0] == "call"
                buf = result[1]
            else:
                at = buf.find(self._start)
                if at == -1:
                    keep = held_suffix(buf, (self._start,))
                    self._content(out, buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    return out
                self._content(out, buf[:at])
                self._start_call(self._start)
                buf = buf[at + len(self._start) :]
        return out

    def flush(self) -> list[Event]:
        out: list[Event] = []
        self._flush_call(out)
        held, self._held = self._held, ""
        if not self._closing:
            self._content(out, held)
        self._closing = False
        return out


# -- grammars ---------------------------------------------------------------------


def trigger(marker: str) -> str:
    """
    A lazy-grammar trigger: the marker itself (the engine searches only
    near the end of the text; see L{Grammar}); the grammar starts at it.
    A marker inside a reasoning block does not count: L{ds4tw._api.lifecycle}
    disarms the trigger there (L{Grammar.armed}).
    """
    return re.escape(marker)


def call_rules(rules: RuleSet, tooling: Tooling, args_key: str = "arguments") -> str:
    names = [
        rules.call(tool.name, tool.arguments_schema(), f"call-{i}", args_key)
        for i, tool in enumerate(tooling.callable())
    ]
    return rules.rule("call", " | ".join(names))


def repeat(tooling: Tooling, one: str, sep: str) -> str:
    return f"{one} ({sep} {one})*" if tooling.parallel else one


def complete(
    rules: RuleSet,
    tooling: Tooling,
    calls: str,
    trigger: str,
    answer: Mapping[str, Any] | None,
) -> Grammar:
    """
    The root: the calls alone when forced; calls or the structured answer
    when there is one (a grammar from the first token: the reply cannot be
    free text); else the calls, lazily from the C{trigger}.
    """
    if tooling.forced:
        return rules.grammar(calls)
    if answer is not None:
        value = rules.schema(answer, "answer")
        return rules.grammar(f"{calls} | [ \\t\\n]* {value}")
    return rules.grammar(calls, (trigger,))
