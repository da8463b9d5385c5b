"""
The tool-call parsers on their own: each syntax's streaming splitter
(markup never leaks, any split gives the same events, several calls,
malformed calls to text), the scanner's early rejection of non-JSON, the
grammars each parser builds (accepted by llama.cpp's GBNF parser), the
fallback instructions, and the choice of parser from a chat template.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds4tw._formats.tools.parsers import (
    HermesParser,
    Llama3JSONParser,
    MistralParser,
    ToolCallParser,
    tool_call_parser,
)
from ds4tw._formats.tools.scan import Malformed, ValueScanner
from ds4tw._formats.tools.spec import ToolChoice, Tooling
from ds4tw._types import ContentText, ToolCallArgs, ToolCallStart

from .calls import seen, splits
from .tools import PATCH, WEATHER

TOOLS = Tooling((WEATHER, PATCH))

Summary = tuple[str, list[tuple[str, str]]]


def run(parser: ToolCallParser, pieces: list[str], tooling: Tooling = TOOLS) -> Summary:
    """(content, [(name, arguments)]), checked as L{seen} checks it."""
    splitter = parser.splitter(tooling)
    events = []
    for piece in pieces:
        events += splitter.feed(piece)
    got = seen(events + splitter.flush())
    # A call cut off unfinished ends, but does not count as made.
    assert splitter.calls <= len(got.calls)
    return got.content, got.calls


HERMES = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\\"is", "n": [1, {"x": 2}]}}'
    "\n</tool_call>\n"
    '<tool_call>{"arguments": {"input": "*** Begin Patch\\n+ok\\n"}, "name": "apply_patch"}'
    "</tool_call>"
)
HERMES_CALLS = [
    ("get_weather", '{"city": "Par\\"is", "n": [1, {"x": 2}]}'),
    ("apply_patch", "*** Begin Patch\n+ok\n"),
]
LLAMA = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
    '{"name": "get_weather", "parameters": {"city": "Rome"}}'
)
MISTRAL_V3 = (
    'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "A"}}, '
    '{"name": "get_weather", "arguments": {"city": "B"}}]'
)
MISTRAL_V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "A"}[TOOL_CALLS]get_weather[ARGS]{"city": "B"}'

CASES: list[tuple[ToolCallParser, str, Summary]] = [
    (HermesParser(), HERMES, ("Let me check.\n", HERMES_CALLS)),
    (
        Llama3JSONParser(),
        LLAMA,
        ("", [("get_weather", '{"city": "Oslo"}'), ("get_weather", '{"city": "Rome"}')]),
    ),
    (
        MistralParser(),
        MISTRAL_V3,
        ("Sure. ", [("get_weather", '{"city": "A"}'), ("get_weather", '{"city": "B"}')]),
    ),
    (
        MistralParser(args_marker=True),
        MISTRAL_V11,
        ("", [("get_weather", '{"city": "A"}'), ("get_weather", '{"city": "B"}')]),
    ),
]


@pytest.mark.parametrize(("parser", "text", "expected"), CASES, ids=lambda c: str(c)[:12])
def test_whole_and_char_by_char(parser: ToolCallParser, text: str, expected: Summary) -> None:
    assert run(parser, [text]) == expected
    assert run(parser, list(text)) == expected


# One test over every case: hypothesis and parametrize together trip
# pytest-twisted's greenlet ("blockon cannot be called from the twisted greenlet").
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    for parser, text, expected in CASES:
        assert run(parser, splits(text, cuts)) == expected


def test_arguments_stream_as_written_while_the_call_is_open() -> None:
    splitter = HermesParser().splitter(TOOLS)
    out = splitter.feed('<tool_call>{"name": "get_weather", "arguments": {"ci')
    assert out == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, '{"ci')]
    assert splitter.feed('ty": "X"') == [ToolCallArgs(0, 'ty": "X"')]


def test_only_a_possible_marker_is_held() -> None:
    splitter = HermesParser().splitter(TOOLS)
    assert splitter.feed("a <b> <tool_") == [ContentText("a <b> ")]
    assert splitter.feed("x") == [ContentText("<tool_x")]


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered tool
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
    ],
)
def test_malformed_calls_are_text(bad: str) -> None:
    assert run(HermesParser(), list(bad)) == (bad, [])


def test_a_named_choice_makes_other_tools_malformed() -> None:
    named = Tooling(TOOLS.tools, ToolChoice("required", "apply_patch"))
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert run(HermesParser(), [text], named) == (text, [])


def test_a_call_cut_off_after_its_commit_still_ends() -> None:
    content, calls = run(HermesParser(), ['<tool_call>{"name": "get_weather", "arguments": {"c'])
    assert (content, calls) == ("", [("get_weather", '{"c')])
    splitter = HermesParser().splitter(TOOLS)
    splitter.feed('<tool_call>{"name": "get_weather", "arguments": {"c')
    splitter.flush()
    assert splitter.calls == 0  # so the turn does not finish as "tool_calls"


def test_a_call_cut_off_before_its_commit_is_text() -> None:
    text = '<tool_call>{"name": "get_wea'
    assert run(HermesParser(), [text]) == (text, [])


def test_llama3_text_reply_is_content() -> None:
    assert run(Llama3JSONParser(), list('{"answer": 42} is JSON')) == ('{"answer": 42} is JSON', [])
    assert run(Llama3JSONParser(), list("Hello {x}")) == ("Hello {x}", [])


@pytest.mark.parametrize(
    ("text", "error"),
    [('{"a": 1}}', "unexpected '}'"), ('{"a": ]', "unexpected ']'"), ('{"a": x', "unexpected")],
)
def test_value_scanner_rejects_what_cannot_be_json(text: str, error: str) -> None:
    scanner = ValueScanner()
    with pytest.raises(Malformed, match=error):
        for c in text:
            if not scanner.feed(c):
                scanner = ValueScanner()
                scanner.feed(c)


def test_value_scanner_finds_the_end() -> None:
    scanner = ValueScanner()
    text = '{"a": "}\\"", "b": [1, 2.5e3, true]} tail'
    ends = [i for i, c in enumerate(text) if scanner.feed(c) and scanner.done]
    assert ends == [text.index(" tail") - 1]


@pytest.mark.parametrize(
    "parser", [HermesParser(), Llama3JSONParser(), MistralParser(), MistralParser(True)]
)
@pytest.mark.parametrize("choice", ["auto", "required"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    "answer", [None, {"type": "object", "properties": {"n": {"type": "integer"}}}]
)
def test_grammars_parse(
    parser: ToolCallParser, choice: str, parallel: bool, answer: dict[str, object] | None
) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    tooling = Tooling(TOOLS.tools, ToolChoice(choice), parallel)  # type: ignore[arg-type]
    grammar = parser.grammar(tooling, answer)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)  # raises on a bad grammar
    # Lazy only for auto without structured output: with it, the reply is
    # calls or the answer from the first token.
    assert bool(grammar.triggers) == (choice == "auto" and answer is None)
    assert ("answer" in grammar.gbnf) == (choice == "auto" and answer is not None)


def test_lazy_triggers_are_the_markers() -> None:
    import re

    # Searched in a short window at the end of the text, so no full-text
    # wrapper; the grammar starts at the match.
    (hermes,) = HermesParser().grammar(TOOLS).triggers
    m = re.compile(hermes).search("Sure. <tool_call>{")
    assert m is not None and m.start() == len("Sure. ")
    (mistral,) = MistralParser().grammar(TOOLS).triggers
    assert re.compile(mistral).search("ok [TOOL_CALLS][")
    (llama,) = Llama3JSONParser().grammar(TOOLS).triggers
    m = re.compile(llama).search('  {"name": "f"', 0)
    assert m is not None and m.start(1) == 2
    assert not re.compile(llama).search('Well: {"name": "f"', 0)  # must open the reply


def test_fallback_instructions_and_history_use_the_parsers_syntax() -> None:
    hermes = HermesParser()
    text = hermes.instructions([WEATHER])
    assert "<tools>" in text and json.dumps(WEATHER.template_entry()) in text
    written = hermes.format_calls([("get_weather", {"city": "Oslo"})])
    assert run(hermes, [written]) == ("", [("get_weather", '{"city": "Oslo"}')])
    for parser in (Llama3JSONParser(), MistralParser(), MistralParser(True)):
        written = parser.format_calls([("get_weather", {"city": "Oslo"})])
        assert run(parser, [written]) == ("", [("get_weather", '{"city": "Oslo"}')])


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("{{ '<tool_call>' }}", "hermes"),
        ("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", "mistral"),
        ("<|python_tag|>", "llama3_json"),
        ("{{ messages }}", "hermes"),  # no tool markup: the fallback
    ],
)
def test_auto_reads_the_template(template: str, name: str) -> None:
    assert tool_call_parser("auto", template).name == name
    assert isinstance(tool_call_parser("mistral", "[ARGS]"), MistralParser)
    assert tool_call_parser("mistral", "[ARGS]").args_marker  # type: ignore[attr-defined]


def test_unknown_parser_name() -> None:
    with pytest.raises(ValueError, match="known: auto, deepseek_v3, deepseek_v31"):
        tool_call_parser("xml")


def test_grammars_are_cached_by_tool_set() -> None:
    from ds4tw._formats.tools.parsers import GrammarCache

    cache = GrammarCache(size=2)
    hermes = HermesParser()
    first, built = cache.get(hermes, TOOLS)
    assert built
    # Equal tools: a hit, and said to be one (so nothing is logged twice).
    assert cache.get(hermes, Tooling(TOOLS.tools)) == (first, False)
    assert cache.get(hermes, Tooling(TOOLS.tools))[0] is first
    assert cache.get(MistralParser(), TOOLS)[0] is not first  # another syntax
    forced, _ = cache.get(hermes, Tooling(TOOLS.tools, ToolChoice("required")))
    assert forced.triggers == () and first.triggers
    again, built = cache.get(hermes, TOOLS)
    assert again is not first and built  # evicted (size 2): rebuilt
