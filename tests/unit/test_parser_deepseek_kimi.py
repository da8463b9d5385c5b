"""
The DeepSeek (V3/R1, V3.1, V3.2's DSML) and Kimi-K2 tool-call parsers: each syntax's
splitter (any split gives the same events, markup never leaks, parallel
calls, arguments streamed as written, unknown tools and malformed markup
back to text), their grammars (llama.cpp accepts them; the recogniser
reads what they allow), the fallback instructions and history, and
which real chat templates each claims.
"""

# The full-width bars are DeepSeek's own tokens, not look-alikes of "|".
# ruff: noqa: RUF001

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds4tw._engine.template import ChatTemplate
from ds4tw._formats.reasoning import TagReasoningParser
from ds4tw._formats.tools.parsers import (
    HermesParser,
    Llama3JSONParser,
    MistralParser,
    ToolCallParser,
)
from ds4tw._formats.tools.parsers.deepseek import (
    DeepSeekV3Parser,
    DeepSeekV31Parser,
    DeepSeekV32Parser,
)
from ds4tw._formats.tools.parsers.kimi_k2 import KimiK2Parser, call_name
from ds4tw._formats.tools.spec import ToolChoice, Tooling
from ds4tw._types import ContentText, ToolCallArgs, ToolCallEnd, ToolCallStart

from .calls import seen, splits
from .gbnf import Grammar as Recogniser
from .tools import PATCH, RUN, WEATHER

TOOLS = Tooling((WEATHER, RUN, PATCH))

TEMPLATES = Path(__file__).parent.parent / "data" / "templates"

#: Typed arguments, and a string with a newline, quotes and markup-like text.
ARGS_RUN = (
    '{"command": "echo \\"a<b\\"\\nls", "options": {"timeout": 2.5, "env": {"X": "1"}}, '
    '"dry": true}'
)
ARGS_WEATHER = '{"city": "Paris", "days": 3}'

BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL, SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def v31(name: str, args: str) -> str:
    return f"{CALL}{name}{SEP}{args}{CALL_END}"


def v3(name: str, args: str) -> str:
    return f"{CALL}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def kimi(name: str, args: str, index: int = 0) -> str:
    return (
        f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{args}"
        "<|tool_call_end|>"
    )


D = "｜DSML｜"


def dsml(name: str, *params: tuple[str, str, bool]) -> str:
    body = "\n".join(
        f'<{D}parameter name="{k}" string="{str(s).lower()}">{v}</{D}parameter>'
        for k, v, s in params
    )
    return f'\n<{D}invoke name="{name}">\n{body}\n</{D}invoke>'


def dsml_block(*invokes: str) -> str:
    return f"<{D}function_calls>{''.join(invokes)}\n</{D}function_calls>"


DSML_RUN = dsml(
    "run",
    ("command", 'echo "a<b"\nls', True),
    ("options", '{"timeout": 2.5, "env": {"X": "1"}}', False),
    ("dry", "true", False),
)


def kimi_section(*calls: str) -> str:
    return f"<|tool_calls_section_begin|>{''.join(calls)}<|tool_calls_section_end|>"


Summary = tuple[str, list[tuple[str, str]]]


def run(parser: ToolCallParser, pieces: list[str], tooling: Tooling = TOOLS) -> Summary:
    """(content, [(name, arguments)]), checked as L{seen} checks it."""
    splitter = parser.splitter(tooling)
    events = []
    for piece in pieces:
        events += splitter.feed(piece)
    got = seen(events + splitter.flush())
    assert splitter.calls <= len(got.calls)
    return got.content, got.calls


TWO_CALLS = [("run", ARGS_RUN), ("get_weather", ARGS_WEATHER)]

CASES: list[tuple[ToolCallParser, str, Summary]] = [
    (
        DeepSeekV31Parser(),
        f"Let me check <b>.{BEGIN}{v31('run', ARGS_RUN)}{v31('get_weather', ARGS_WEATHER)}{END}",
        ("Let me check <b>.", TWO_CALLS),
    ),
    (
        DeepSeekV3Parser(),
        f"Sure.\n\n{BEGIN}{v3('run', ARGS_RUN)}\n{v3('get_weather', ARGS_WEATHER)}{END}",
        ("Sure.\n\n", TWO_CALLS),
    ),
    (
        KimiK2Parser(),
        "I'll look.\n"
        + kimi_section(kimi("run", ARGS_RUN, 3), kimi("get_weather", ARGS_WEATHER, 4)),
        ("I'll look.\n", TWO_CALLS),
    ),
    (
        # A custom tool's input is decoded; a call without its section is read too.
        KimiK2Parser(),
        kimi("apply_patch", '{"input": "*** Begin Patch\\n+<ok>\\n"}'),
        ("", [("apply_patch", "*** Begin Patch\n+<ok>\n")]),
    ),
    (
        DeepSeekV32Parser(),
        "Checking.\n\n"
        + dsml_block(DSML_RUN, dsml("get_weather", ("city", "Paris", True), ("days", "3", False))),
        ("Checking.\n\n", TWO_CALLS),
    ),
    (
        DeepSeekV32Parser(),
        dsml_block(dsml("apply_patch", ("input", "*** Begin Patch\n+<ok>\n", True))),
        ("", [("apply_patch", "*** Begin Patch\n+<ok>\n")]),
    ),
    (DeepSeekV31Parser(), "Plain answer, <｜ not a call.", ("Plain answer, <｜ not a call.", [])),
    (KimiK2Parser(), "a <|tool_call x|> b", ("a <|tool_call x|> b", [])),
]


@pytest.mark.parametrize(("parser", "text", "expected"), CASES, ids=lambda c: str(c)[:16])
def test_whole_and_char_by_char(parser: ToolCallParser, text: str, expected: Summary) -> None:
    assert run(parser, [text]) == expected
    assert run(parser, list(text)) == expected


# One test over every case: hypothesis with parametrize trips pytest-twisted's greenlet.
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    for parser, text, expected in CASES:
        assert run(parser, splits(text, cuts)) == expected


@pytest.mark.parametrize(
    ("parser", "opening"),
    [
        (DeepSeekV31Parser(), f"{BEGIN}{CALL}run{SEP}"),
        (DeepSeekV3Parser(), f"{BEGIN}{CALL}function{SEP}run\n```json\n"),
        (KimiK2Parser(), "<|tool_calls_section_begin|><|tool_call_begin|>functions.run:0"),
    ],
)
def test_arguments_stream_as_written(parser: ToolCallParser, opening: str) -> None:
    splitter = parser.splitter(TOOLS)
    if isinstance(parser, KimiK2Parser):
        assert splitter.feed(opening) == []
        opening = "<|tool_call_argument_begin|>"
    assert splitter.feed(opening + '{"comm') == [ToolCallStart(0, "run"), ToolCallArgs(0, '{"comm')]
    assert splitter.feed('and": "ls"') == [ToolCallArgs(0, 'and": "ls"')]
    assert splitter.feed("}") == [ToolCallArgs(0, "}"), ToolCallEnd(0, '{"command": "ls"}')]
    assert splitter.calls == 1


def test_dsml_values_stream_as_json() -> None:
    splitter = DeepSeekV32Parser().splitter(TOOLS)
    opening = f'<{D}function_calls>\n<{D}invoke name="run">\n<{D}parameter name="command" string="'
    assert splitter.feed(opening) == [ToolCallStart(0, "run"), ToolCallArgs(0, "{")]
    assert splitter.feed('true">say "hi"\n') == [
        ToolCallArgs(0, '"command": "'),
        ToolCallArgs(0, 'say \\"hi\\"\\n'),
    ]
    assert splitter.feed(f"</{D}parameter>\n</{D}invoke>") == [
        ToolCallArgs(0, '"'),
        ToolCallArgs(0, "}"),
        ToolCallEnd(0, '{"command": "say \\"hi\\"\\n"}'),
    ]


def test_only_a_possible_marker_is_held() -> None:
    splitter = DeepSeekV31Parser().splitter(TOOLS)
    assert splitter.feed("a <b> <｜tool▁ca") == [ContentText("a <b> ")]
    assert splitter.feed("t") == [ContentText("<｜tool▁cat")]
    splitter = KimiK2Parser().splitter(TOOLS)
    assert splitter.feed("x <|tool_calls_sec") == [ContentText("x ")]


MALFORMED: list[tuple[ToolCallParser, str]] = [
    (DeepSeekV31Parser(), f"{BEGIN}{v31('rm_rf', '{}')}{END}"),  # not an offered tool
    (DeepSeekV31Parser(), f'{BEGIN}{CALL}run{{"command": "ls"}}{CALL_END}{END}'),  # no sep
    (DeepSeekV31Parser(), f"{BEGIN}{v31('run', '[1, 2]')}{END}"),  # not an object
    (DeepSeekV31Parser(), f"{BEGIN}{v31('run', 'not json')}{END}"),
    (DeepSeekV31Parser(), f"{BEGIN}{CALL}{'x' * 300}"),  # a header that never ends
    (DeepSeekV3Parser(), f"{BEGIN}{CALL}tool{SEP}run\n```json\n{{}}\n```{CALL_END}{END}"),
    (KimiK2Parser(), kimi_section(kimi("rm_rf", "{}"))),
    (KimiK2Parser(), kimi_section(kimi("run", '"ls"'))),
    (KimiK2Parser(), kimi("apply_patch", '{"input": 3}')),  # a custom tool's input is text
    (KimiK2Parser(), "<|tool_calls_section_begin|>and then some text"),
    (DeepSeekV32Parser(), dsml_block(dsml("rm_rf", ("x", "1", False)))),
    (DeepSeekV32Parser(), f"<{D}function_calls>\nno invoke here"),
]


@pytest.mark.parametrize(("parser", "bad"), MALFORMED, ids=lambda c: str(c)[:24])
def test_malformed_calls_are_text(parser: ToolCallParser, bad: str) -> None:
    assert run(parser, [bad]) == (bad, [])
    assert run(parser, list(bad)) == (bad, [])


def test_a_named_choice_makes_other_tools_malformed() -> None:
    named = Tooling(TOOLS.tools, ToolChoice("required", "get_weather"))
    text = f"{BEGIN}{v31('run', '{}')}{END}"
    assert run(DeepSeekV31Parser(), [text], named) == (text, [])


def test_a_call_cut_off_after_its_commit_still_ends() -> None:
    text = kimi_section(kimi("run", '{"command": "l'))
    text = text[: text.index("<|tool_call_end|>")]
    assert run(KimiK2Parser(), list(text)) == ("", [("run", '{"command": "l')])
    splitter = KimiK2Parser().splitter(TOOLS)
    splitter.feed(text)
    splitter.flush()
    assert splitter.calls == 0  # the turn does not finish as "tool_calls"


def test_a_call_cut_off_before_its_commit_is_text() -> None:
    text = f"{BEGIN}{CALL}get_wea"
    assert run(DeepSeekV31Parser(), list(text)) == (text, [])


def test_a_call_broken_after_its_commit_ends_as_written() -> None:
    text = f'{BEGIN}{CALL}run{SEP}{{"command": "ls"]]{CALL_END}{END}'
    content, calls = run(DeepSeekV31Parser(), [text])
    assert calls == [("run", '{"command": "ls"')]
    assert CALL not in content


def test_text_after_the_calls_is_content() -> None:
    text = kimi_section(kimi("get_weather", '{"city": "A"}')) + "\n\nDone."
    assert run(KimiK2Parser(), list(text)) == ("Done.", [("get_weather", '{"city": "A"}')])


# Found by fuzzing (tests/unit/test_parser_fuzz.py), shrunk: each read
# differently whole than a character at a time.
SPLIT_ALIKE: list[tuple[ToolCallParser, str, Summary]] = [
    (
        # A header broken by the call's end: only it is text, and the call
        # after it is read (whole, the header ran on to the next call's sep).
        DeepSeekV31Parser(),
        f"{BEGIN}{CALL}x{CALL_END}{v31('run', '{}')}{END}",
        (f"{BEGIN}{CALL}x{CALL_END}", [("run", "{}")]),
    ),
    (
        # A header too long is broken at its limit, however long it runs on.
        DeepSeekV31Parser(),
        f"{CALL}{'x' * 300}{v31('run', '{}')}",
        (f"{CALL}{'x' * 300}", [("run", "{}")]),
    ),
    (
        # A call opened inside a header: the header is text, the call is read.
        KimiK2Parser(),
        f"<|tool_call_begin|>oops{kimi('run', '{}')}",
        ("<|tool_call_begin|>oops", [("run", "{}")]),
    ),
    (
        # A free-form tool's broken arguments are text only up to the fault:
        # markup before it is not read again (whole, it made a call).
        KimiK2Parser(),
        kimi("apply_patch", f'{{"input": "{kimi("run", "{}")}\n"}}'),
        (kimi("apply_patch", f'{{"input": "{kimi("run", "{}")}\n"}}'), []),
    ),
    (
        # A parameter tag broken by a newline ends its call (char by char
        # the call started and never ended; whole, the newline was a key).
        DeepSeekV32Parser(),
        dsml_block(f'\n<{D}invoke name="run">\n<{D}parameter name="\n">x</{D}parameter>'),
        (
            f'<{D}parameter name="\n">x</{D}parameter>\n</{D}function_calls>',
            [("run", "{}")],
        ),
    ),
    (
        # An invoke tag broken by a newline is text, and what follows is
        # read again (whole, the tag ran on to the next block's ">").
        DeepSeekV32Parser(),
        f'<{D}function_calls>\n<{D}invoke name="\n'
        + dsml_block(dsml("get_weather", ("city", "Paris", True))),
        (
            f'<{D}function_calls>\n<{D}invoke name="\n',
            [("get_weather", '{"city": "Paris"}')],
        ),
    ),
]


@pytest.mark.parametrize(("parser", "text", "expected"), SPLIT_ALIKE, ids=lambda c: str(c)[:16])
def test_broken_markup_reads_the_same_however_split(
    parser: ToolCallParser, text: str, expected: Summary
) -> None:
    assert run(parser, [text]) == expected
    assert run(parser, list(text)) == expected


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("functions.get_weather:0", "get_weather"),
        (" functions.get_weather:12 ", "get_weather"),
        ("get_weather:1", "get_weather"),
        ("functions.ns.tool:1", "ns.tool"),
        ("functions.a:b", "a:b"),
        ("", None),
    ],
)
def test_kimi_names_come_from_the_call_id(header: str, name: str | None) -> None:
    assert call_name(header) == name


PARSERS = [DeepSeekV31Parser(), DeepSeekV3Parser(), DeepSeekV32Parser(), KimiK2Parser()]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
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
    assert bool(grammar.triggers) == (choice == "auto" and answer is None)
    assert ("answer" in grammar.gbnf) == (choice == "auto" and answer is not None)


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
def test_grammars_take_the_calls_the_model_writes_and_stop_others(
    parser: ToolCallParser,
) -> None:
    pairs = [
        ("run", {"command": 'echo "a<b"\nls', "options": {"timeout": 2.5, "env": {}}, "dry": True}),
        ("get_weather", {"city": "Paris", "days": 3}),
    ]
    one = Recogniser(parser.grammar(Tooling(TOOLS.tools, ToolChoice("required"), False)).gbnf)
    many = Recogniser(parser.grammar(Tooling(TOOLS.tools, ToolChoice("required"))).gbnf)
    assert one.accepts(parser.format_calls(pairs[1:]))
    assert not one.accepts(parser.format_calls(pairs))  # one call only
    assert many.accepts(parser.format_calls(pairs))
    # Against the schema: days must be an integer, the tool must be offered.
    assert not many.accepts(parser.format_calls([("get_weather", {"city": "P", "days": "3"})]))
    assert not many.accepts(parser.format_calls([("rm_rf", {})]))
    named = Tooling(TOOLS.tools, ToolChoice("required", "get_weather"))
    assert not Recogniser(parser.grammar(named).gbnf).accepts(parser.format_calls(pairs[:1]))


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
def test_the_lazy_trigger_is_the_section_opening(parser: ToolCallParser) -> None:
    import re

    (pattern,) = parser.grammar(TOOLS).triggers
    text = "Sure. " + parser.format_calls([("get_weather", {"city": "Oslo"})])
    m = re.compile(pattern).search(text)
    assert m is not None and m.start() == len("Sure. ")


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
def test_fallback_instructions_and_history_use_the_parsers_syntax(parser: ToolCallParser) -> None:
    text = parser.instructions([WEATHER])
    assert "get_weather" in text and json.dumps(WEATHER.parameters["properties"]["days"]) in text
    assert all(token in text for token in parser.preserved_tokens if "end" not in token)
    written = parser.format_calls([("get_weather", {"city": "Oslo"}), ("run", {"command": "ls"})])
    assert run(parser, list(written)) == (
        "",
        [("get_weather", '{"city": "Oslo"}'), ("run", '{"command": "ls"}')],
    )


def test_kimi_numbers_earlier_calls_in_its_own_ids() -> None:
    assert KimiK2Parser().prompt_call_id("call_abc", "get_weather", 2) == "functions.get_weather:2"
    assert DeepSeekV31Parser().prompt_call_id("call_abc", "get_weather", 2) == "call_abc"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


ALL = [DeepSeekV31Parser, DeepSeekV3Parser, DeepSeekV32Parser, KimiK2Parser]


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("deepseek-ai-DeepSeek-V3.1", DeepSeekV31Parser),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", DeepSeekV3Parser),
        ("DeepSeek-V3.2", DeepSeekV32Parser),
        ("moonshotai-Kimi-K2", KimiK2Parser),
        ("moonshotai-Kimi-K2-Thinking", KimiK2Parser),
    ],
)
def test_each_real_template_is_claimed_by_its_own_parser_only(name: str, owner: type) -> None:
    source = template(name)
    assert [cls for cls in ALL if cls.claims(source)] == [owner]
    # Nor do the parsers before them in auto's order take them.
    for other in (MistralParser, Llama3JSONParser, HermesParser):
        assert not other.claims(source)


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{{ '<tool_call>' }}{% endfor %}",  # Hermes
        "{{ '<|im_start|>' }}{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}",
    ],
)
def test_none_claims_a_hermes_template(source: str) -> None:
    assert not any(cls.claims(source) for cls in ALL)


@pytest.mark.parametrize(("thinking", "reasoning"), [(False, False), (True, True)])
def test_deepseek_v31_prompt_starts_the_model_where_it_should(
    thinking: bool, reasoning: bool
) -> None:
    chat = ChatTemplate(
        template("deepseek-ai-DeepSeek-V3.1"),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
    )
    prompt = chat.render([{"role": "user", "content": "Hi"}], thinking=thinking).text
    assert prompt.endswith("<think>" if thinking else "</think>")
    splitter = TagReasoningParser("think").splitter(prompt)
    assert splitter.in_reasoning == reasoning
    out = splitter.feed("Hello.") + splitter.flush()
    assert [type(d).__name__ for d in out] == ["ReasoningText" if reasoning else "ContentText"]
