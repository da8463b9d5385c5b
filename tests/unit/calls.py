"""
What a client sees of a reply, from the events of the reasoning and
tool-call splitters, for the parser tests; and the splits they feed.

L{seen} checks what every splitter must keep to, whatever its syntax: a
call starts once, its argument fragments add up to the arguments it ends
with, and every call that starts ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ds4tw._types import ContentText, ReasoningText, ToolCallArgs, ToolCallEnd, ToolCallStart


@dataclass
class Seen:
    reasoning: str = ""
    content: str = ""
    #: (name, arguments text) of each call, in the order they ended.
    calls: list[tuple[str, str]] = field(default_factory=list)


def seen(events: Iterable[Any]) -> Seen:
    out = Seen()
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, ReasoningText):
            out.reasoning += e.text
        elif isinstance(e, ContentText):
            out.content += e.text
        elif isinstance(e, ToolCallStart):
            assert e.index not in names, "a call starts once"
            names[e.index], args[e.index] = e.name, ""
        elif isinstance(e, ToolCallArgs):
            args[e.index] += e.text
        elif isinstance(e, ToolCallEnd):
            assert e.index in names, "a call ends after it starts"
            assert e.arguments == args[e.index], "the fragments add up to the arguments"
            out.calls.append((names[e.index], e.arguments))
    assert len(out.calls) == len(names), "every call that starts ends"
    return out


def splits(text: str, cuts: list[int]) -> list[str]:
    """C{text} cut at C{cuts} (taken modulo its length, so any list of numbers will do)."""
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=False)]
