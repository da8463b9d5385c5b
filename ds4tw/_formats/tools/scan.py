"""
Incremental scanning of a tool call's JSON as the model writes it.

A call is an object such as C{{"name": "get_weather", "arguments": {...}}}
arriving a few characters per token. L{CallScanner} finds the tool's name
and the raw text of the arguments value without parsing them: the
arguments are forwarded to the client exactly as the model writes them
(re-serialising a "healed" partial parse on every token is not
prefix-stable; see llama.cpp#15713). L{ValueScanner} finds where one JSON
value ends, tracking strings, escapes and nesting, and rejects text that
cannot be JSON as early as it can.

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

WHITESPACE = " \t\r\n"
_CLOSERS = {"{": "}", "[": "]"}
_SCALAR_CHARS = set("0123456789+-.eEtruefalsn")


class Malformed(ValueError):
    """The text cannot be the JSON this scanner expects."""

    #: What L{CallScanner.feed} found before the fault, so that a call
    #: reads the same whether its text came in one piece or in many.
    events: Sequence[ScanEvent] = ()


class ValueScanner:
    """
    Where one JSON value ends. Feed characters; L{done} turns true on the
    last character of the value. A scalar (number, true, false, null) ends
    only at the character after it, which L{feed} does not consume.
    """

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self._scalar = False
        self.started = False
        self.done = False
        #: The value is a string (a top-level one).
        self.is_string = False

    def feed(self, c: str) -> bool:
        """Take C{c}; false if C{c} is not part of the value (it ended before)."""
        if self.done:
            return False
        if not self.started:
            if c in WHITESPACE:
                return True
            self.started = True
            if c == '"':
                self.is_string = True
            return self._open(c)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if not self._stack:
                    self.done = True
            elif c in "\n\r":
                raise Malformed("a raw newline inside a JSON string")
            return True
        if self._scalar:
            if c in _SCALAR_CHARS:
                return True
            self._scalar = False
            if not self._stack:
                self.done = True
                return False
        if c in WHITESPACE or c in ",:":
            if not self._stack:
                raise Malformed(f"unexpected {c!r}")
            return True
        if c in "}]":
            if not self._stack or _CLOSERS[self._stack[-1]] != c:
                raise Malformed(f"unexpected {c!r}")
            self._stack.pop()
            if not self._stack:
                self.done = True
            return True
        return self._open(c)

    def _open(self, c: str) -> bool:
        if c in "{[":
            self._stack.append(c)
        elif c == '"':
            self._in_string = True
        elif c in _SCALAR_CHARS:
            self._scalar = True
        else:
            raise Malformed(f"unexpected {c!r}")
        return True


def _decode(text: str) -> Any:
    """
    A JSON value the scanner delimited; what it does not check (a raw
    control character, a bad escape) is L{Malformed}.
    """
    try:
        return json.loads(text)
    except ValueError as e:  # a raw control character, a bad escape
        raise Malformed(f"not JSON: {e}") from e


#: Keys a call object may name its arguments by (Llama 3 says "parameters").
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Args:
    text: str


@dataclass(frozen=True)
class ObjectEnd:
    #: Characters of the fed text after the object's closing brace.
    rest: str


ScanEvent = Name | Args | ObjectEnd


class CallScanner:
    """
    One call object, key by key, in any key order. Events: L{Name} once
    the name string is complete, L{Args} fragments of the arguments
    value's raw text (held until the name is known, then live), and
    L{ObjectEnd}. Keys other than the name and the arguments are skipped.
    """

    def __init__(self) -> None:
        self._state = "open"  # open, key, colon, value, comma, done
        self._key: list[str] = []
        self._key_value = ValueScanner()
        self._value: ValueScanner | None = None
        self._value_key = ""
        self._value_text: list[str] = []
        self.name: str | None = None
        self._held_args: list[str] = []
        self.args_seen = False
        self.args_complete = False
        #: The arguments were written as a JSON string (to be decoded).
        self.args_is_string = False
        self.args: list[str] = []

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, text: str) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        for i, c in enumerate(text):
            if self._state == "done":
                events.append(ObjectEnd(text[i:]))
                return events
            try:
                events.extend(self._char(c))
            except Malformed as e:
                self._flush_args(events)
                e.events = events
                raise
            if self._state == "done":
                self._flush_args(events)
                events.append(ObjectEnd(text[i + 1 :]))
                return events
        self._flush_args(events)
        return events

    def _flush_args(self, events: list[ScanEvent]) -> None:
        if self.name is not None and self._held_args:
            text = "".join(self._held_args)
            self._held_args.clear()
            events.append(Args(text))

    def _char(self, c: str) -> Iterator[ScanEvent]:
        state = self._state
        if state == "open":
            if c in WHITESPACE:
                return
            if c != "{":
                raise Malformed("a tool call must be a JSON object")
            self._state = "key"
        elif state == "key":
            yield from self._key_char(c)
        elif state == "colon":
            if c in WHITESPACE:
                return
            if c != ":":
                raise Malformed("expected ':' after a key")
            self._value = ValueScanner()
            self._value_text = []
            self._state = "value"
        elif state == "value":
            yield from self._value_char(c)
        elif state == "comma":
            if c in WHITESPACE:
                return
            if c == ",":
                self._state = "key"
            elif c == "}":
                self._close()
            else:
                raise Malformed("expected ',' or '}' after a value")

    def _key_char(self, c: str) -> Iterator[ScanEvent]:
        if not self._key_value.started and c in WHITESPACE:
            return
        if not self._key_value.started and c == "}" and not self._key:
            self._close()
            return
        if not self._key_value.started and c != '"':
            raise Malformed("expected a key")
        self._key_value.feed(c)
        self._key.append(c)
        if self._key_value.done:
            self._value_key = _decode("".join(self._key))
            self._key = []
            self._key_value = ValueScanner()
            self._state = "colon"
        return
        yield

    def _value_char(self, c: str) -> Iterator[ScanEvent]:
        value = self._value
        assert value is not None
        is_args = self._value_key in ARGUMENT_KEYS and not self.args_seen
        taken = value.feed(c)
        if taken and (value.started or c not in WHITESPACE):
            if is_args:
                if value.is_string:
                    self.args_is_string = True
                self.args.append(c)
                if not self.args_is_string:
                    self._held_args.append(c)
            else:
                self._value_text.append(c)
        if not value.done:
            return
        if is_args:
            self.args_seen = self.args_complete = True
        elif self._value_key == "name":
            name = _decode("".join(self._value_text))
            if not isinstance(name, str) or not name:
                raise Malformed("the tool name must be a non-empty string")
            self.name = name
            yield Name(name)
        self._value = None
        self._state = "comma"
        if not taken:  # a scalar ended at this delimiter
            yield from self._char(c)

    def _close(self) -> None:
        if self.name is None:
            raise Malformed("the call names no tool")
        if not self.args_seen:
            self.args_seen = self.args_complete = True  # no arguments: an empty object
        self._state = "done"

    def arguments(self) -> str:
        """The whole arguments text; a string-encoded object decoded."""
        text = "".join(self.args)
        if self.args_is_string:
            decoded = _decode(text)
            return decoded if isinstance(decoded, str) else text
        return text or "{}"
