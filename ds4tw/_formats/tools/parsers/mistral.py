"""
Mistral tool calls: C{[TOOL_CALLS]} then a JSON array, or C{name[ARGS]{...}}.

Covered by tests/unit/test_tool_parsers.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
    call_rules,
    complete,
    log,
    repeat,
    trigger,
)


class MistralSplitter(Splitter):
    """
    Mistral: C{[TOOL_CALLS]} then either a JSON array of call objects
    (v3 templates) or C{name[ARGS]{...}} (v11 and later: Mistral Small
    3.2, Devstral, Magistral). Text before the marker is content.
    """

    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def __init__(self, tooling: Tooling) -> None:
        super().__init__(tooling)
        self._mode = "text"  # text, after-marker, array, array-sep, name, args
        self._held = ""
        self._name: list[str] = []
        self._args: ValueScanner | None = None
        self._args_text: list[str] = []
        self._spec: ToolSpec | None = None

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf, self._held = self._held + text, ""
        while buf:
            mode = self._mode
            if mode == "text":
                at = buf.find(self.MARKER)
                if at == -1:
                    keep = held_suffix(buf, (self.MARKER,))
                    self._content(out, buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    return out
                self._content(out, buf[:at])
                buf = buf[at + len(self.MARKER) :]
                self._mode = "after-marker"
            elif mode == "after-marker":
                stripped = buf.lstrip(WHITESPACE)
                if not stripped:
                    return out
                if stripped.startswith("["):
                    self._mode = "array"
                    buf = stripped[1:]
                else:
                    self._mode = "name"
                    buf = stripped
            elif mode == "array":
                if self._call is None:
                    stripped = buf.lstrip(WHITESPACE)
                    if not stripped:
                        return out
                    if stripped.startswith("]"):
                        self._mode = "text"
                        buf = stripped[1:]
                        continue
                    self._start_call(self.MARKER)
                    buf = stripped
                result = self._feed_call(out, buf)
                if result is None:
                    return out
                self._mode = "array-sep" if result[0] == "call" else "text"
                buf = result[1]
            elif mode == "array-sep":
                stripped = buf.lstrip(WHITESPACE)
                if not stripped:
                    return out
                self._mode = "array" if stripped[0] == "," else "text"
                buf = stripped[1:] if stripped[0] in ",]" else stripped
            elif mode == "name":
                buf = self._name_text(out, buf)
            else:
                buf = self._args_feed(out, buf)
        return out

    def _name_text(self, out: list[Event], buf: str) -> str:
        joined = "".join(self._name) + buf
        at = joined.find(self.ARGS)
        name = joined if at == -1 else joined[:at]
        # Where a name can no longer be one: the first newline or brace,
        # or past 256 characters. Only that much goes back as text (the
        # rest is read again), however the text was split.
        faults = [i for i in (name.find("\n"), name.find("{")) if i != -1]
        if len(name) > 256:
            faults.append(256)
        if faults:
            k = min(faults) + 1
            self._malformed(out, f"{self.MARKER}{joined[:k]}", "no [ARGS] after the tool name")
            return joined[k:]
        if at == -1:
            self._name = [joined]
            return ""
        name = joined[:at].strip()
        self._name = []
        spec = self._tooling.spec(name)
        if spec is None or spec not in self._tooling.callable():
            self._malformed(out, f"{self.MARKER}{joined}", f"{name!r} is not an offered tool")
            return ""
        self._spec = spec
        self._args = ValueScanner()
        self._args_text = []
        self._mode = "args"
        return joined[at + len(self.ARGS) :]

    def _args_feed(self, out: list[Event], buf: str) -> str:
        scanner, spec = self._args, self._spec
        assert scanner is not None and spec is not None
        taken: list[str] = []
        rest = ""
        try:
            for i, c in enumerate(buf):
                if not scanner.feed(c):
                    rest = buf[i:]
                    break
                if scanner.started:
                    taken.append(c)
                if scanner.done:
                    rest = buf[i + 1 :]
                    break
        except Malformed as e:
            raw = f"{self.MARKER}{spec.name}{self.ARGS}{''.join(self._args_text)}{buf}"
            if self._args_text:
                log.warn("ds4tw: a tool call broke off ({why}); ending it as written", why=e)
                out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
                self._end_call()
            else:
                self._malformed(out, raw, str(e))
            return ""
        text = "".join(taken)
        if text:
            if not self._args_text:
                if not text.startswith("{"):
                    self._malformed(out, f"{self.MARKER}{spec.name}{self.ARGS}{buf}", "not JSON")
                    return ""
                out.append(ToolCallStart(self.calls, spec.name))
            self._args_text.append(text)
            out.append(ToolCallArgs(self.calls, text))
        if scanner.done:
            out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
            self._end_call()
        return rest

    def _end_call(self) -> None:
        self._ended()
        self._mode = "text"
        self._args = None
        self._spec = None

    def _malformed(self, out: list[Event], raw: str, why: str) -> None:
        log.warn("ds4tw: malformed tool call ({why}); returned as text", why=why)
        self._mode = "text"
        self._name = []
        self._content(out, raw)

    def flush(self) -> list[Event]:
        out: list[Event] = []
        self._flush_call(out)
        if self._mode == "args" and self._args_text:
            out.append(ToolCallEnd(self.calls, "".join(self._args_text)))
        elif self._mode == "name" and self._name:
            self._content(out, self.MARKER + "".join(self._name))
        if self._mode == "text":
            held, self._held = self._held, ""
            self._content(out, held)
        return out


class MistralParser(ParserBase):
    """
    Mistral: C{[TOOL_CALLS]} then a JSON array of calls, or, with
    C{args_marker} (v11+ templates), C{[TOOL_CALLS]name[ARGS]{...}}.
    """

    name = "mistral"

    preserved_tokens = (MistralSplitter.MARKER, MistralSplitter.ARGS)

    def __init__(self, args_marker: bool = False) -> None:
        self.args_marker = args_marker

    @property
    def key(self) -> str:
        return f"{self.name}:args" if self.args_marker else self.name

    @classmethod
    def for_template(cls, template: str) -> MistralParser:
        return cls(args_marker=MistralSplitter.ARGS in template)

    @staticmethod
    def claims(template: str) -> bool:
        return MistralSplitter.MARKER in template

    def splitter(self, tooling: Tooling) -> ToolCallSplitter:
        return MistralSplitter(tooling)

    def grammar(self, tooling: Tooling, answer: Mapping[str, Any] | None = None) -> Grammar:
        rules = RuleSet()
        marker = literal(MistralSplitter.MARKER)
        if self.args_marker:
            each = []
            for i, tool in enumerate(tooling.callable()):
                args = rules.schema(tool.arguments_schema(), f"args-{i}", f"tool {tool.name!r}")
                each.append(f"{marker} {literal(tool.name)} {literal('[ARGS]')} {args}")
            call = rules.rule("call", " | ".join(each))
            root = repeat(tooling, call, "")
        else:
            call = call_rules(rules, tooling)
            listed = repeat(tooling, call, '"," space')
            root = f'{marker} "[" {listed} "]"'
        return complete(
            rules, tooling, rules.rule("calls", root), trigger(MistralSplitter.MARKER), answer
        )

    def instructions(self, tools: Sequence[ToolSpec]) -> str:
        listed = json.dumps([t.template_entry() for t in tools], ensure_ascii=False)
        return f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS]"

    def format_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        if self.args_marker:
            return "".join(
                f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a, ensure_ascii=False)}" for n, a in calls
            )
        body = [{"name": n, "arguments": a} for n, a in calls]
        return "[TOOL_CALLS]" + json.dumps(body, ensure_ascii=False)
