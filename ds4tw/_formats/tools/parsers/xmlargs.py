"""
What the XML-parameter tool-call syntaxes share (Qwen3-Coder, GLM-4.5/4.6,
MiniMax-M2): a call names its tool, then writes each argument as raw text
between tags, and only the tool's JSON Schema says which JSON value that
text stands for.

This module owns three things:

  - the conversion of one argument's text to JSON by its property's
    schema (L{types_of}, L{convert});
  - L{XmlCallSplitter}, the streaming splitter of every such syntax,
    told its tags by a L{Markup}: the arguments go out as a JSON text
    that only grows (C{{"city": "} as soon as the parameter opens, then
    the string's characters as they come; a value of another type when
    its closing tag is seen; C{}} at the end of the call);
  - the grammar pieces: L{until} (text that never contains a closing tag)
    and L{params_rule} (each tool's parameters in its schema's order,
    the required ones present, each value per its property's schema).

Arguments the schema does not type are strings: a parameter the tool does
not declare is kept as a string argument (vLLM's qwen3_coder and
glm4_moe parsers do the same), since the schema cannot say otherwise.
Qwen3-Coder writes a newline on each side of a value: exactly one each
side is the format's (as vLLM strips). GLM and MiniMax write none, so a
string is everything between its tags (vLLM's glm45 strips all of the
whitespace; a string's own spaces are kept here); other types ignore the
whitespace around them. A value cannot contain its own closing tag: the
first one ends it, and the grammar keeps it out of strings.

The grammar lists each tool's parameters in its schema's property order,
the order templates write arguments back in, so a forced call's
arguments come out in the order the client declared them.

Covered by tests/unit/test_parser_xml.py.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...._types import ToolCallArgs, ToolCallEnd, ToolCallStart
from ...grammar import RuleSet, literal, text_until
from ...text import held_suffix
from ..scan import WHITESPACE
from ..spec import Tooling, ToolSpec
from .base import Event, Splitter, log

# -- typing one argument ------------------------------------------------------------

_PY_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int in Python
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (dict, "object"),
    (list, "array"),
)
_INTEGER = re.compile(r"[-+]?\d+")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for py, name in _PY_TYPES:
        if isinstance(value, py):
            return name
    return "string"


def _resolve(schema: Any, root: Mapping[str, Any]) -> Any:
    """A local C{$ref} (C{#/...}) followed once; anything else as is."""
    ref = schema.get("$ref") if isinstance(schema, Mapping) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return schema
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        if not isinstance(node, Mapping):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
    return node


def types_of(schema: Any, root: Mapping[str, Any], depth: int = 0) -> frozenset[str]:
    """
    The JSON types a property's schema allows (C{type}, C{enum},
    C{const}, C{anyOf}/C{oneOf}/C{allOf} members, local C{$ref}s); empty
    when it does not say, which reads as a string.
    """
    schema = _resolve(schema, root)
    if not isinstance(schema, Mapping) or depth > 8:
        return frozenset()
    declared = schema.get("type")
    if isinstance(declared, str):
        return frozenset({declared})
    if isinstance(declared, list):
        return frozenset(t for t in declared if isinstance(t, str))
    if "const" in schema:
        return frozenset({_json_type(schema["const"])})
    if isinstance(schema.get("enum"), list):
        return frozenset(_json_type(v) for v in schema["enum"])
    found: set[str] = set()
    for key in ("anyOf", "oneOf", "allOf"):
        for member in schema.get(key) or ():
            # A member that says nothing could be anything: text stays text.
            found |= types_of(member, root, depth + 1) or {"string"}
    return frozenset(found)


def streams_as_text(types: frozenset[str]) -> bool:
    """Whether the value is a string whatever it says (so it can go out as it comes)."""
    return types <= {"string"}


def _number(text: str) -> int | float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(text) if _INTEGER.fullmatch(text) else value


def _structured(text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        # Older Qwen3-Coder templates wrote arguments back with Python's
        # str(), so the model may answer in kind ({'a': True}).
        try:
            with warnings.catch_warnings():
                # A model's "\m" in a string is its text, not a mistake to log.
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                value = ast.literal_eval(text)
            json.dumps(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, kind) else None


def convert(text: str, types: frozenset[str]) -> Any:
    """
    The JSON value of an argument's raw text: the first of the allowed
    types (null, boolean, integer, number, object, array) that the text
    reads as, else the text itself as a string (a string-typed property
    that looks like a number stays a string).
    """
    if streams_as_text(types):
        return text
    bare = text.strip()
    if "null" in types and bare in ("null", "None"):
        # Qwen3-Coder's template writes Python's None back, as its True.
        return None
    if "boolean" in types and bare.lower() in ("true", "false"):
        # Qwen3-Coder's template writes Python's True/False back.
        return bare.lower() == "true"
    if "integer" in types:
        number = _number(bare)
        if number is not None and float(number).is_integer():
            return int(number)
    if "number" in types:
        number = _number(bare)
        if number is not None:
            return number
    for name, kind in (("object", dict), ("array", list)):
        if name in types:
            value = _structured(bare, kind)
            if value is not None:
                return value
    return text


def _escaped(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


# -- the splitter -----------------------------------------------------------------


@dataclass(frozen=True)
class Markup:
    """The tags of one XML-parameter syntax (see each parser for its values)."""

    #: Opens a block of calls (and triggers the lazy grammar).
    block_open: str
    #: Closes the block; C{""} when the call's own closing tag ends it (GLM).
    block_close: str
    #: Opens each call inside the block; C{""} when the block's tag is the call's (GLM).
    call_open: str
    #: Ends the tool's name; C{""}: the name ends at the first of C{name_stops} (GLM).
    name_close: str
    #: Characters a tool's name cannot contain.
    name_stops: str
    call_close: str
    param_open: str
    #: Ends a parameter's name.
    param_close: str
    #: Opens the value after optional whitespace, C{""} when the value follows at once.
    value_open: str
    value_close: str
    #: The format writes one newline on each side of a value (not part of it).
    newlines: bool


_NAME_LIMIT = 256


class XmlCallSplitter(Splitter):
    """
    Content text with calls in XML-parameter markup taken out. A call is
    committed once its tool is known; markup that breaks before that is
    content (with a logged warning), and markup that breaks after it ends
    the call with its arguments closed (they stay valid JSON), the rest
    going on as content.
    """

    def __init__(self, tooling: Tooling, markup: Markup) -> None:
        super().__init__(tooling)
        self._m = markup
        self._state = "text"  # text, block, name, call, pname, vopen, value
        self._held = ""
        #: The markup of a call not yet committed: content again if it breaks.
        self._raw: list[str] = []
        #: A tool or parameter name read so far.
        self._partial = ""
        self._pname = ""
        self._spec: ToolSpec | None = None
        self._committed = False
        self._block_calls = 0
        self._args: list[str] = []
        self._params: dict[str, str] = {}
        self._types: frozenset[str] = frozenset()
        self._streaming = False
        self._lead = False  # the value's leading newline may still come
        self._value: list[str] = []

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf: str | None = self._held + text
        self._held = ""
        while buf:
            buf = getattr(self, "_in_" + self._state)(out, buf)
        return out

    def _take(self, text: str) -> None:
        if not self._committed:
            self._raw.append(text)

    def _expect(self, buf: str, *markers: str) -> tuple[str, str] | str | None:
        """
        After optional whitespace: C{(marker, rest)} for the marker that
        opens C{buf}; None when C{buf} could still become one (it is held);
        C{buf} itself when it cannot.
        """
        stripped = buf.lstrip(WHITESPACE)
        for marker in markers:
            if marker and stripped.startswith(marker):
                self._take(buf[: len(buf) - len(stripped) + len(marker)])
                return marker, stripped[len(marker) :]
        if not stripped or any(m and m.startswith(stripped) for m in markers):
            self._held = buf
            return None
        return buf

    def _in_text(self, out: list[Event], buf: str) -> str | None:
        opener = self._m.block_open
        at = buf.find(opener)
        if at == -1:
            keep = held_suffix(buf, (opener,))
            self._content(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return None
        self._content(out, buf[:at])
        self._raw = [opener]
        self._block_calls = 0
        self._state = "block" if self._m.call_open else "name"
        return buf[at + len(opener) :]

    def _in_block(self, out: list[Event], buf: str) -> str | None:
        found = self._expect(buf, self._m.call_open, self._m.block_close)
        if found is None:
            return None
        if isinstance(found, str):
            return self._malformed(out, found, "no call in the tool-call block")
        marker, rest = found
        if marker == self._m.call_open:
            self._state = "name"
        else:
            self._raw = []
            self._state = "text"
        return rest

    def _in_name(self, out: list[Event], buf: str) -> str | None:
        joined = self._partial + buf
        close, stops = self._m.name_close, self._m.name_stops
        if close:
            at = joined.find(close)
            head = (
                joined[:at] if at != -1 else joined[: len(joined) - held_suffix(joined, (close,))]
            )
        else:
            at = next((i for i, c in enumerate(joined) if c in stops), -1)
            head = joined[:at] if at != -1 else joined
        if any(c in stops for c in head) or len(head) > _NAME_LIMIT:
            self._partial = ""
            return self._malformed(out, joined, "no tool name")
        if at == -1:
            self._partial = joined
            return None
        self._partial = ""
        self._take(joined[: at + len(close)])
        name = head.strip()
        spec = self._tooling.spec(name)
        if spec is None or spec not in self._tooling.callable():
            why = f"the model called {name!r}, which is not an offered tool"
            return self._malformed(out, joined[at + len(close) :], why)
        self._spec = spec
        if spec.kind != "custom":
            # A free-form tool's input is decoded when complete, as for JSON calls.
            self._committed = True
            self._raw = []
            out.append(ToolCallStart(self.calls, spec.name))
            self._send(out, "{")
        self._state = "call"
        return joined[at + len(close) :]

    def _send(self, out: list[Event], text: str) -> None:
        self._args.append(text)
        out.append(ToolCallArgs(self.calls, text))

    def _in_call(self, out: list[Event], buf: str) -> str | None:
        found = self._expect(buf, self._m.param_open, self._m.call_close)
        if found is None:
            return None
        if isinstance(found, str):
            return self._broken(out, found, "neither a parameter nor the end of the call")
        marker, rest = found
        if marker == self._m.call_close:
            self._end_call(out)
        else:
            self._state = "pname"
        return rest

    def _in_pname(self, out: list[Event], buf: str) -> str | None:
        joined = self._partial + buf
        close = self._m.param_close
        at = joined.find(close)
        head = joined[:at] if at != -1 else joined
        if "\n" in head or len(head) > _NAME_LIMIT:
            self._partial = ""
            return self._broken(out, joined, "no parameter name")
        if at == -1:
            self._partial = joined
            return None
        self._partial = ""
        self._take(joined[: at + len(close)])
        self._pname = head.strip()
        if self._m.value_open:
            self._state = "vopen"
        else:
            self._open_value(out)
        return joined[at + len(close) :]

    def _in_vopen(self, out: list[Event], buf: str) -> str | None:
        found = self._expect(buf, self._m.value_open)
        if found is None:
            return None
        if isinstance(found, str):
            return self._broken(out, found, "no value after the parameter's name")
        self._open_value(out)
        return found[1]

    def _open_value(self, out: list[Event]) -> None:
        assert self._spec is not None
        schema = self._spec.arguments_schema()
        props = schema.get("properties")
        prop = props.get(self._pname) if isinstance(props, Mapping) else None
        self._types = types_of(prop, schema) if prop is not None else frozenset()
        self._streaming = self._committed and streams_as_text(self._types)
        self._lead = self._m.newlines
        self._value = []
        self._state = "value"
        if self._streaming:
            self._send(out, f'{self._key()}{json.dumps(self._pname, ensure_ascii=False)}: "')

    def _key(self) -> str:
        """What goes before the next key: nothing after C{{}, else a comma."""
        return "" if len(self._args) == 1 else ", "

    def _in_value(self, out: list[Event], buf: str) -> str | None:
        if self._lead:
            if buf.startswith("\n"):
                self._take("\n")
                buf = buf[1:]
                if not buf:
                    self._lead = False
                    return None
            self._lead = False
        close = self._m.value_close
        at = buf.find(close)
        if at == -1:
            keep = held_suffix(buf, (close,))
            if self._m.newlines and buf[: len(buf) - keep].endswith("\n"):
                keep += 1  # the format's own newline, if the closing tag follows
            self._more(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            return None
        text = buf[:at]
        if self._m.newlines and text.endswith("\n"):
            text = text[:-1]
            self._more(out, text)
            self._take("\n")
        else:
            self._more(out, text)
        self._take(close)
        self._close_value(out)
        self._state = "call"
        return buf[at + len(close) :]

    def _more(self, out: list[Event], text: str) -> None:
        if not text:
            return
        self._take(text)
        self._value.append(text)
        if self._streaming:
            self._send(out, _escaped(text))

    def _close_value(self, out: list[Event]) -> None:
        text = "".join(self._value)
        self._params[self._pname] = text
        if self._streaming:
            self._send(out, '"')
        elif self._committed:
            value = json.dumps(convert(text, self._types), ensure_ascii=False)
            name = json.dumps(self._pname, ensure_ascii=False)
            self._send(out, f"{self._key()}{name}: {value}")
        self._streaming = False

    def _end_call(self, out: list[Event]) -> None:
        spec = self._spec
        assert spec is not None
        if spec.kind == "custom":
            given = self._params.get("input")
            if given is None:
                self._malformed(out, "", "a free-form tool's call has no input")
                return
            out.append(ToolCallStart(self.calls, spec.name))
            out.append(ToolCallArgs(self.calls, given))
            out.append(ToolCallEnd(self.calls, given))
        else:
            self._send(out, "}")
            out.append(ToolCallEnd(self.calls, "".join(self._args)))
        self._reset_call()
        self._ended()
        self._block_calls += 1
        self._state = "block" if self._m.block_close else "text"

    def _reset_call(self) -> None:
        self._spec = None
        self._committed = False
        self._raw = []
        self._args = []
        self._params = {}
        self._streaming = False

    def _malformed(self, out: list[Event], rest: str, why: str) -> str:
        """
        Markup that is no call: content, markup included, and C{rest} is
        read as text again (so that any split gives the same events). Only
        the whitespace is dropped after a block's calls.
        """
        if self._state != "block" or self._block_calls == 0:
            log.warn("ds4tw: malformed tool call ({why}); returned as text", why=why)
            self._content(out, "".join(self._raw))
        self._reset_call()
        self._state = "text"
        return rest

    def _broken(self, out: list[Event], rest: str, why: str) -> str:
        if not self._committed:
            return self._malformed(out, rest, why)
        log.warn("ds4tw: a tool call broke off ({why}); ending it as written", why=why)
        self._finish(out)
        self._reset_call()
        self._ended()
        self._state = "text"
        return rest

    def _finish(self, out: list[Event]) -> None:
        """A committed call cut short: its arguments are closed as they stand."""
        if self._state == "value":
            self._close_value(out)
        self._send(out, "}")
        out.append(ToolCallEnd(self.calls, "".join(self._args)))

    def flush(self) -> list[Event]:
        out: list[Event] = []
        held, self._held = self._held, ""
        if self._state == "text":
            self._content(out, held)
        elif self._committed:
            if self._state == "value":
                self._more(out, held)
            self._finish(out)
        elif self._state != "block" or self._block_calls == 0:
            self._content(out, "".join(self._raw) + self._partial + held)
        self._partial = ""
        self._reset_call()
        self._state = "text"
        return out


# -- grammars ---------------------------------------------------------------------


def until(rules: RuleSet, name: str, end: str) -> str:
    """A rule for any text that does not contain C{end} (L{ds4tw._formats.grammar.text_until})."""
    return text_until(rules.rule, name, end)


def value_rule(
    rules: RuleSet,
    prop: Mapping[str, Any],
    root: Mapping[str, Any],
    name: str,
    label: str,
    text: str,
) -> str:
    """
    One parameter's value: the raw text rule C{text} for a string (its
    C{enum}, when it has one), else the JSON value its schema allows.
    """
    types = types_of(prop, root)
    if streams_as_text(types):
        choices = _resolve(prop, root).get("enum") if isinstance(prop, Mapping) else None
        if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
            return rules.rule(name, " | ".join(literal(c) for c in choices))
        return text
    # Its $refs point into the tool's schema: the definitions come along.
    defs = {k: root[k] for k in ("$defs", "definitions") if k in root}
    return rules.schema({**prop, **defs}, name, label)


def params_rule(
    rules: RuleSet,
    tool: ToolSpec,
    name: str,
    param: Callable[[str, str], str],
    any_name: str,
    text: str,
) -> str:
    """
    A tool's parameters: C{param(name, value)} for each property in the
    schema's order, the required ones present and the others optional;
    any names (C{any_name}) with text values when the schema lists none.
    """
    schema = tool.arguments_schema()
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not props:
        return rules.rule(name, f"({param(any_name, text)})*")
    required = set(schema.get("required") or ())
    parts = []
    for j, (pname, prop) in enumerate(props.items()):
        value = value_rule(rules, prop, schema, f"{name}-{j}", f"tool {tool.name!r}", text)
        one = param(literal(pname), value)
        parts.append(one if pname in required else f"({one})?")
    return rules.rule(name, " ".join(parts) or '""')


def written(value: Any) -> str:
    """An argument as these formats write it: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def arguments_items(arguments: Any) -> list[tuple[str, Any]]:
    """An earlier call's arguments as (name, value) pairs (text that is no object: one value)."""
    if isinstance(arguments, Mapping):
        return [(str(k), v) for k, v in arguments.items()]
    return [("arguments", arguments)] if arguments not in (None, "") else []


def tool_list(tools: Sequence[ToolSpec]) -> str:
    return "\n".join(json.dumps(t.template_entry(), ensure_ascii=False) for t in tools)
