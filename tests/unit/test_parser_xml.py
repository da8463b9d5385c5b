"""
The XML-parameter tool-call parsers (Qwen3-Coder, GLM-4.5/4.6, MiniMax-M2)
on their own: markup never leaks whatever the split, arguments are typed
by the tool's schema and stream as a JSON text that only grows, unknown
tools and broken markup are text, the grammars accept what the model
writes and refuse other tools, and C{auto} picks each on its real
template (tests/data/templates/).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds4tw._formats.tools.parsers import HermesParser, ToolCallParser
from ds4tw._formats.tools.parsers.glm45 import GLM45Parser
from ds4tw._formats.tools.parsers.minimax_m2 import MiniMaxM2Parser
from ds4tw._formats.tools.parsers.qwen3_coder import Qwen3CoderParser
from ds4tw._formats.tools.parsers.xmlargs import convert, types_of
from ds4tw._formats.tools.spec import ToolChoice, Tooling, ToolSpec
from ds4tw._types import ContentText, ToolCallArgs, ToolCallEnd, ToolCallStart

from .calls import seen, splits
from .gbnf import Grammar as Recogniser
from .tools import PATCH, RUN, WEATHER

TOOLS = Tooling((WEATHER, RUN, PATCH))

QWEN, GLM, MINIMAX = Qwen3CoderParser(), GLM45Parser(), MiniMaxM2Parser()
PARSERS: list[ToolCallParser] = [QWEN, GLM, MINIMAX]

Call = tuple[str, Any]
Summary = tuple[str, list[Call]]

COMMAND = 'cat <<EOF\nsay "hi" <b>\n\nEOF'
CALLS: list[Call] = [
    ("get_weather", {"city": "Paris", "days": 3}),
    (
        "run",
        {"command": COMMAND, "options": {"timeout": 1.5, "env": {"A": "1"}}, "dry": True},
    ),
]

QWEN_TEXT = (
    "Let me check.\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=run>\n<parameter=command>\n" + COMMAND + "\n</parameter>\n"
    '<parameter=options>\n{"timeout": 1.5, "env": {"A": "1"}}\n</parameter>\n'
    "<parameter=dry>\nTrue\n</parameter>\n</function>\n</tool_call>"
)
GLM_TEXT = (
    "Let me check.\n"
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
    # GLM-4.5's template: no newline after the name or around the pairs.
    "<tool_call>run<arg_key>command</arg_key>\n<arg_value>" + COMMAND + "</arg_value>"
    '<arg_key>options</arg_key>\n<arg_value>{"timeout": 1.5, "env": {"A": "1"}}</arg_value>'
    "<arg_key>dry</arg_key>\n<arg_value>true</arg_value></tool_call>"
)
MINIMAX_TEXT = (
    "Let me check.\n"
    '<minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n'
    '</invoke>\n<invoke name="run">\n<parameter name="command">' + COMMAND + "</parameter>\n"
    '<parameter name="options">{"timeout": 1.5, "env": {"A": "1"}}</parameter>\n'
    '<parameter name="dry">true</parameter>\n</invoke>\n</minimax:tool_call>'
)
CASES: list[tuple[ToolCallParser, str]] = [
    (QWEN, QWEN_TEXT),
    (GLM, GLM_TEXT),
    (MINIMAX, MINIMAX_TEXT),
]
IDS = ["qwen3_coder", "glm45", "minimax_m2"]


def events(parser: ToolCallParser, pieces: list[str], tooling: Tooling = TOOLS) -> list[Any]:
    splitter = parser.splitter(tooling)
    out = []
    for piece in pieces:
        out += splitter.feed(piece)
    return out + splitter.flush()


def run(parser: ToolCallParser, pieces: list[str], tooling: Tooling = TOOLS) -> Summary:
    """
    (content, [(name, arguments)]), checked as L{seen} checks it, the
    arguments parsed (a free-form tool's: its text).
    """
    got = seen(events(parser, pieces, tooling))
    return got.content, [(n, a if n == PATCH.name else json.loads(a)) for n, a in got.calls]


@pytest.mark.parametrize(("parser", "text"), CASES, ids=IDS)
def test_whole_and_char_by_char(parser: ToolCallParser, text: str) -> None:
    assert run(parser, [text]) == ("Let me check.\n", CALLS)
    assert run(parser, list(text)) == ("Let me check.\n", CALLS)


# One test over every case: hypothesis and parametrize together trip
# pytest-twisted's greenlet.
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_gives_the_same_calls(cuts: list[int]) -> None:
    for parser, text in CASES:
        assert run(parser, splits(text, cuts)) == ("Let me check.\n", CALLS)


@pytest.mark.parametrize(
    ("parser", "head", "tail"),
    [
        (QWEN, "<tool_call>\n<function=run>\n<parameter=command>\nls", " -l\n"),
        (GLM, "<tool_call>run\n<arg_key>command</arg_key>\n<arg_value>ls", " -l\n"),
        (
            MINIMAX,
            '<minimax:tool_call>\n<invoke name="run">\n<parameter name="command">ls',
            " -l\n",
        ),
    ],
    ids=IDS,
)
def test_a_string_argument_streams_as_written(parser: ToolCallParser, head: str, tail: str) -> None:
    splitter = parser.splitter(TOOLS)
    assert splitter.feed(head) == [
        ToolCallStart(0, "run"),
        ToolCallArgs(0, "{"),
        ToolCallArgs(0, '"command": "'),
        ToolCallArgs(0, "ls"),
    ]
    # Qwen3-Coder's newline before the closing tag is the format's: held
    # until the next character says whether the tag follows.
    held = parser is QWEN
    assert splitter.feed(tail) == [ToolCallArgs(0, " -l" if held else " -l\\n")]
    assert splitter.feed("x") == [ToolCallArgs(0, "\\nx" if held else "x")]


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_a_typed_argument_waits_for_its_closing_tag(parser: ToolCallParser) -> None:
    text = parser.format_calls([("get_weather", {"city": "A", "days": 12})])
    cut = text.index("12") + 1
    splitter = parser.splitter(TOOLS)
    first = splitter.feed(text[:cut])
    assert "".join(e.text for e in first if isinstance(e, ToolCallArgs)) == '{"city": "A"'
    rest = splitter.feed(text[cut:])
    assert [e for e in rest if isinstance(e, ToolCallArgs)] == [
        ToolCallArgs(0, ', "days": 12'),
        ToolCallArgs(0, "}"),
    ]
    assert rest[-1] == ToolCallEnd(0, '{"city": "A", "days": 12}')


def test_arguments_only_grow_and_stay_a_prefix_of_the_final_json() -> None:
    for parser, text in CASES:
        sent = ""
        for e in events(parser, list(text)):
            if isinstance(e, ToolCallArgs):
                sent += e.text
            elif isinstance(e, ToolCallEnd):
                assert sent == e.arguments
                json.loads(sent)
                sent = ""


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "o": {"type": "object"},
        "a": {"type": "array"},
        "s": {"type": "string"},
        "maybe": {"type": ["integer", "null"]},
        "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "kind": {"enum": [1, 2]},
        "ref": {"$ref": "#/$defs/point"},
        "free": {},
    },
    "$defs": {"point": {"type": "object"}},
}


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("n", " 42\n", 42),
        ("n", "4.0", 4),
        ("n", "many", "many"),  # not an integer: the text, not an error
        ("x", "1.5", 1.5),
        ("x", "-2", -2),
        ("ok", "true", True),
        ("ok", "False", False),  # Qwen3-Coder's template writes Python's booleans back
        ("o", '{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}),
        ("o", "{'a': True}", {"a": True}),  # and Python's dicts
        ("o", "{broken", "{broken"),
        ("a", "[1, 2]", [1, 2]),
        ("a", '{"not": "a list"}', '{"not": "a list"}'),
        ("s", "42", "42"),  # a string that looks like a number stays a string
        ("s", 'a "quoted"\n<line>', 'a "quoted"\n<line>'),
        ("maybe", "null", None),
        ("maybe", "None", None),  # and Python's None
        ("n", "None", "None"),  # where the schema allows no null, text
        ("maybe", "7", 7),
        ("either", "7", 7),
        ("either", "seven", "seven"),
        ("kind", "2", 2),
        ("ref", '{"x": 1}', {"x": 1}),
        ("free", "[1]", "[1]"),  # a schema that says nothing: text
    ],
)
def test_arguments_are_typed_by_the_schema(name: str, text: str, value: Any) -> None:
    assert convert(text, types_of(SCHEMA["properties"][name], SCHEMA)) == value


def test_typed_arguments_through_each_parser() -> None:
    args = {"command": "007", "dry": False, "tags": ["a", "b"], "options": {"env": {}}}
    for parser in PARSERS:
        text = parser.format_calls([("run", args)])
        assert run(parser, list(text)) == ("", [("run", args)])


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_an_undeclared_parameter_is_a_string(parser: ToolCallParser) -> None:
    text = parser.format_calls([("get_weather", {"city": "A", "extra": 5})])
    assert run(parser, [text]) == ("", [("get_weather", {"city": "A", "extra": "5"})])


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_a_free_form_tool_gets_its_raw_input(parser: ToolCallParser) -> None:
    patch = "*** Begin Patch\n+if a < b:\n*** End Patch\n"
    text = parser.format_calls([("apply_patch", {"input": patch})])
    assert run(parser, list(text)) == ("", [("apply_patch", patch)])


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_an_unknown_tool_is_text(parser: ToolCallParser) -> None:
    text = "Ok. " + parser.format_calls([("rm_rf", {"path": "/"})])
    assert run(parser, [text]) == (text, [])
    assert run(parser, list(text)) == (text, [])


def test_a_named_choice_makes_other_tools_text() -> None:
    named = Tooling(TOOLS.tools, ToolChoice("required", "run"))
    for parser in PARSERS:
        text = parser.format_calls([("get_weather", {"city": "A"})])
        assert run(parser, list(text), named) == (text, [])


@pytest.mark.parametrize(
    ("parser", "bad"),
    [
        (QWEN, "<tool_call>\nnot a call\n</tool_call>"),
        (QWEN, "<tool_call>\n<function=get_weather\n<parameter=city>"),  # no '>'
        (GLM, "<tool_call></tool_call>"),  # no name
        (GLM, "a <tool_call> b"),
        (MINIMAX, "<minimax:tool_call>\n<invoke name=get_weather>\n</invoke>"),
        (MINIMAX, "<minimax:tool_call>\nhello"),
    ],
)
def test_malformed_markup_is_text(parser: ToolCallParser, bad: str) -> None:
    assert run(parser, [bad]) == (bad, [])
    assert run(parser, list(bad)) == (bad, [])


@pytest.mark.parametrize(
    ("parser", "broken", "after"),
    [
        (QWEN, "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n", "oops"),
        (GLM, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>A</arg_value>", "oops"),
        (MINIMAX, '<minimax:tool_call>\n<invoke name="get_weather">\n', "oops"),
    ],
    ids=IDS,
)
def test_markup_broken_after_the_commit_ends_the_call_as_valid_json(
    parser: ToolCallParser, broken: str, after: str
) -> None:
    content, calls = run(parser, list(broken + after))
    assert content == after
    assert len(calls) == 1 and calls[0][0] == "get_weather"  # and its arguments parsed


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_a_call_cut_off_still_ends_as_json_but_does_not_count(parser: ToolCallParser) -> None:
    text = parser.format_calls([("run", {"command": "make all\nmake install"})])
    cut = text[: text.index("make all") + 10]
    assert run(parser, [cut]) == ("", [("run", {"command": "make all\nm"})])
    splitter = parser.splitter(TOOLS)
    splitter.feed(cut)
    splitter.flush()
    assert splitter.calls == 0


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_a_reply_cut_off_before_the_tool_is_known_is_text(parser: ToolCallParser) -> None:
    text = parser.format_calls([("get_weather", {})])
    cut = text[: text.index("get_wea") + 7]
    assert run(parser, [cut]) == (cut, [])
    assert run(parser, list(cut)) == (cut, [])


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_only_a_possible_marker_is_held(parser: ToolCallParser) -> None:
    opener = "<minimax:tool_call>" if parser is MINIMAX else "<tool_call>"
    splitter = parser.splitter(TOOLS)
    assert splitter.feed("a <b> " + opener[:5]) == [ContentText("a <b> ")]
    assert splitter.feed("x") == [ContentText(opener[:5] + "x")]


# -- grammars -------------------------------------------------------------------------


def _grammar(parser: ToolCallParser, tooling: Tooling, answer: Any = None) -> Recogniser:
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = parser.grammar(tooling, answer)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)  # llama.cpp's parser accepts it
    return Recogniser(grammar.gbnf)


def _calls_of(parser: ToolCallParser, text: str) -> str:
    return text[text.index("<") :]


@pytest.mark.parametrize(("parser", "text"), CASES, ids=IDS)
def test_the_grammar_accepts_the_replies_and_refuses_other_tools(
    parser: ToolCallParser, text: str
) -> None:
    grammar = _grammar(parser, TOOLS)
    calls = _calls_of(parser, text).replace("True", "true")
    assert grammar.accepts(calls)
    written = parser.format_calls(CALLS)
    assert grammar.accepts(written)
    assert grammar.accepts(parser.format_calls([("get_weather", {"city": "A", "units": "f"})]))
    assert not grammar.accepts(parser.format_calls([("rm_rf", {"city": "A"})]))
    # A required parameter must be there, the types must be right, enums hold.
    assert not grammar.accepts(parser.format_calls([("get_weather", {"days": 3})]))
    assert not grammar.accepts(parser.format_calls([("get_weather", {"city": "A", "days": "x"})]))
    assert not grammar.accepts(parser.format_calls([("get_weather", {"city": "A", "units": "k"})]))
    # A string cannot hold its own closing tag.
    closing = "</arg_value>" if parser is GLM else "</parameter>"
    assert not grammar.accepts(parser.format_calls([("get_weather", {"city": f"A{closing}"})]))
    assert grammar.accepts(parser.format_calls([("get_weather", {"city": "A</b> <"})]))
    # The free-form tool's input is raw text too.
    assert grammar.accepts(parser.format_calls([("apply_patch", {"input": "x <y>\n"})]))


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
@pytest.mark.parametrize("choice", ["auto", "required"])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_modes(parser: ToolCallParser, choice: str, parallel: bool) -> None:
    tooling = Tooling(TOOLS.tools, ToolChoice(choice), parallel)  # type: ignore[arg-type]
    grammar = parser.grammar(tooling)
    assert bool(grammar.triggers) == (choice == "auto")
    if grammar.triggers:
        import re

        (pattern,) = grammar.triggers
        opener = "<minimax:tool_call>" if parser is MINIMAX else "<tool_call>"
        assert re.compile(pattern).search("Sure. " + opener)
    recogniser = _grammar(parser, tooling)
    one = [("get_weather", {"city": "A"})]
    assert recogniser.accepts(parser.format_calls(one))
    assert recogniser.accepts(parser.format_calls(one * 2)) == parallel


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_grammar_with_a_structured_answer(parser: ToolCallParser) -> None:
    answer = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    recogniser = _grammar(parser, TOOLS, answer)
    assert recogniser.accepts('{"n": 1}')
    assert recogniser.accepts(parser.format_calls([("get_weather", {"city": "A"})]))
    assert not recogniser.accepts("free text")


def test_a_tool_without_properties_takes_any_text_parameters() -> None:
    loose = Tooling((ToolSpec("anything", "", {"type": "object"}),))
    for parser in PARSERS:
        text = parser.format_calls([("anything", {"a": "1 <", "b": "x"})])
        assert _grammar(parser, loose).accepts(text)
        assert run(parser, [text], loose) == ("", [("anything", {"a": "1 <", "b": "x"})])


# -- fallback prompt and template detection ----------------------------------------


@pytest.mark.parametrize("parser", PARSERS, ids=IDS)
def test_fallback_instructions_and_history_use_the_syntax(parser: ToolCallParser) -> None:
    text = parser.instructions([WEATHER])
    assert json.dumps(WEATHER.template_entry()) in text
    opener = "<minimax:tool_call>" if parser is MINIMAX else "<tool_call>"
    assert opener in text
    assert run(parser, [parser.format_calls(CALLS)]) == ("", CALLS)


TEMPLATES = Path(__file__).parent.parent / "data" / "templates"


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("Qwen3-Coder.jinja", "qwen3_coder"),
        ("GLM-4.6.jinja", "glm45"),
        ("glm_4_5.jinja", "glm45"),
        ("MiniMax-M2.jinja", "minimax_m2"),
    ],
)
def test_each_parser_claims_its_own_template_only(template: str, name: str) -> None:
    source = (TEMPLATES / template).read_text()
    assert [type(p).name for p in PARSERS if type(p).claims(source)] == [name]


def test_hermes_templates_are_claimed_by_hermes_only() -> None:
    qwen25 = (
        "{%- if tools %}<tools>{{ tools | tojson }}</tools>\nFor each function call, return a "
        'json object within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
        '<function-name>, "arguments": <args-json-object>}\n</tool_call>{%- endif %}'
    )
    assert HermesParser.claims(qwen25)
    assert not any(type(p).claims(qwen25) for p in PARSERS)
    # Qwen3-Coder's template says <tool_call> too: only asking it first tells them apart.
    assert HermesParser.claims((TEMPLATES / "Qwen3-Coder.jinja").read_text())
