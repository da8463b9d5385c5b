"""
Every registered tool-call syntax under fuzzing: a valid reply in the
syntax (written by the parser's own C{format_calls}), then mangled (slices
cut, repeated or swapped, stray characters and the syntax's own markers
put in), fed whole and split at random points. Whatever the text:

  - the splitter raises nothing;
  - each call's streamed argument fragments add up to its arguments;
  - the split does not matter: the same content and the same calls.

And the unmangled reply reads back into exactly the calls written.

C{DS4TW_FUZZ_EXAMPLES} sets the examples (100 by default).
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds4tw._formats.pipeline import OutputPipeline
from ds4tw._formats.reasoning import ReasoningSplitter, reasoning_parser
from ds4tw._formats.tools.parsers import TOOL_CALL_PARSERS, ToolCallParser
from ds4tw._formats.tools.spec import Tooling

from .calls import seen, splits
from .tools import PATCH, RUN, WEATHER

EXAMPLES = int(os.environ.get("DS4TW_FUZZ_EXAMPLES", "100"))

TOOLS = Tooling((WEATHER, RUN, PATCH))
CALLS: list[tuple[str, Any]] = [
    ("get_weather", {"city": 'Par"is <b>\nnow', "days": 3}),
    ("run", {"command": "ls -la", "options": {"timeout": 5, "env": {"A": "1"}}, "dry": False}),
    ("apply_patch", {"input": "*** Begin Patch\n+ok <x>\n"}),
]


def parsers() -> dict[str, ToolCallParser]:
    """One parser per distinct syntax (aliases share one)."""
    out: dict[str, ToolCallParser] = {}
    for make in TOOL_CALL_PARSERS.values():
        parser = make("")
        out.setdefault(parser.key, parser)
    return out


PARSERS = parsers()
NAMES = sorted(PARSERS)

#: (reasoning, content, calls) as the client sees them.
Summary = tuple[str, str, list[tuple[str, str]]]


def run(parser: ToolCallParser, pieces: list[str]) -> Summary:
    splitter = parser.splitter(TOOLS)
    # gpt-oss's calls are messages: its reasoning splitter reads the
    # headers first, as the output pipeline chains them.
    pipeline = OutputPipeline(reasoning=reasoning(parser), tools=splitter)
    events: list[Any] = []
    for piece in pieces:
        events += pipeline._split(piece)
    events += pipeline.finish(stopped=True)
    got = seen(events)
    return got.reasoning, got.content, got.calls


def reasoning(parser: ToolCallParser) -> ReasoningSplitter | None:
    if parser.name == "gpt_oss":
        return reasoning_parser("gpt_oss").splitter("<|start|>assistant")
    return None


def lead(parser: ToolCallParser) -> str:
    # Llama 3's calls are the whole reply: no text before them.
    return "" if parser.name == "llama3_json" else "Checking."


def reply(parser: ToolCallParser) -> str:
    return f"{lead(parser)}\n{parser.format_calls(CALLS)}"


def test_each_syntax_reads_back_what_it_writes() -> None:
    for name, parser in PARSERS.items():
        reasoning, content, calls = run(parser, [reply(parser)])
        assert not reasoning, name
        assert content.strip() == lead(parser), name
        # A free-form tool's input comes back as its text, the others as JSON.
        read = [(n, a if n == PATCH.name else json.loads(a)) for n, a in calls]
        assert read == [(n, a["input"] if n == PATCH.name else a) for n, a in CALLS], name


def mangled(name: str) -> st.SearchStrategy[tuple[str, list[int]]]:
    parser = PARSERS[name]
    specials = [*parser.preserved_tokens, "<", ">", "{", "}", '"', "\n", "[", "]", ":", " "]

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, list[int]]:
        text = reply(parser)
        for _ in range(draw(st.integers(0, 4))):
            a = draw(st.integers(0, len(text)))
            b = draw(st.integers(a, min(len(text), a + 40)))
            op = draw(st.sampled_from(["cut", "repeat", "insert", "marker", "truncate"]))
            if op == "cut":
                text = text[:a] + text[b:]
            elif op == "repeat":
                text = text[:b] + text[a:b] + text[b:]
            elif op == "insert":
                text = text[:a] + draw(st.text(max_size=6)) + text[a:]
            elif op == "marker":
                text = text[:a] + draw(st.sampled_from(specials)) + text[a:]
            else:
                text = text[:a]
        cuts = draw(st.lists(st.integers(min_value=0, max_value=10_000), max_size=16))
        return text, cuts

    return build()


def fuzz(name: str) -> Any:
    """One test per syntax (hypothesis under pytest's parametrize trips pytest-twisted)."""

    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(mangled(name))
    def test(case: tuple[str, list[int]]) -> None:
        text, cuts = case
        parser = PARSERS[name]
        whole = run(parser, [text])
        assert run(parser, splits(text, cuts)) == whole, text
        assert run(parser, list(text)) == whole, text

    test.__name__ = f"test_mangled_{name}_replies_read_the_same_however_split"
    return test


for _name in NAMES:
    globals()[f"test_mangled_{_name}_replies_read_the_same_however_split"] = fuzz(_name)
