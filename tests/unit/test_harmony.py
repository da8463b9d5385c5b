"""
gpt-oss's harmony format: the channel lexer and reasoning parser, and the
tool-call parser behind it, as the pipeline chains them (reasoning
splitter first, its content to the tool-call splitter): reasoning, final
answers, preambles and calls in either header form, any split of the
text, unknown tools and malformed calls as text, arguments streamed as
written, replies cut short, and the grammars (llama.cpp's parser and the
recogniser in tests/unit/gbnf.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds4tw._engine.template import ChatTemplate
from ds4tw._formats.reasoning import PlainSplitter
from ds4tw._formats.reasoning.harmony import MAX_HEADER, HarmonyReasoningParser, HarmonySplitter
from ds4tw._formats.tools.parsers.harmony import HarmonyParser
from ds4tw._formats.tools.spec import ToolChoice, Tooling
from ds4tw._types import ContentText, ToolCallArgs, ToolCallEnd, ToolCallStart

from .calls import seen
from .gbnf import Grammar as Recogniser
from .tools import PATCH, RUN, WEATHER

TOOLS = Tooling((WEATHER, RUN, PATCH))
PROMPT = "<|start|>user<|message|>Hi<|end|><|start|>assistant"

Summary = tuple[str, str, list[tuple[str, str]]]


def run(
    pieces: list[str], tooling: Tooling | None = TOOLS, prompt: str = PROMPT, raw: bool = False
) -> Summary:
    """
    (reasoning, content, [(name, arguments)]), each call's fragments
    checked against its end. C{raw}: no reasoning splitter, as under
    C{--reasoning-parser none}.
    """
    reasoning = PlainSplitter() if raw else HarmonyReasoningParser().splitter(prompt)
    tools = HarmonyParser().splitter(tooling) if tooling is not None else None
    events: list[Any] = []

    def route(parts: list[Any]) -> None:
        for part in parts:
            if isinstance(part, ContentText) and tools is not None:
                events.extend(tools.feed(part.text))
            else:
                events.append(part)

    for piece in pieces:
        route(reasoning.feed(piece))
    route(reasoning.flush())
    if tools is not None:
        events += tools.flush()
    got = seen(events)
    return got.reasoning, got.content, got.calls


ARGS = '{"command": "echo \\"a<b\\"\\nls", "options": {"timeout": 5}, "dry": true}'

CASES: list[tuple[str, Summary]] = [
    (
        "<|channel|>analysis<|message|>Simple: 2+2.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>",
        ("Simple: 2+2.", "It is 4.", []),
    ),
    (  # reasoning, then a call with its recipient after the channel
        "<|channel|>analysis<|message|>Run it <dry>.<|end|>"
        f"<|start|>assistant<|channel|>commentary to=functions.run <|constrain|>json<|message|>"
        f"{ARGS}<|call|>",
        ("Run it <dry>.", "", [("run", ARGS)]),
    ),
    (  # a preamble, then the recipient before the channel (the template's own form)
        "<|channel|>commentary<|message|>Checking.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        '{"city": "Paris", "days": 2}<|call|>',
        ("", "Checking.", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ),
    ("<|channel|>final<|message|>Only this.<|return|>", ("", "Only this.", [])),
    (  # <|return|> is end-of-generation: the text may just stop
        "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>b",
        ("a", "b", []),
    ),
    (  # likewise <|call|>; and the model may call from the analysis channel
        '<|channel|>analysis to=functions.get_weather <|constrain|>json<|message|>{"city": "X"}',
        ("", "", [("get_weather", '{"city": "X"}')]),
    ),
    (  # at the very start, the recipient in the role part of the prompt's header
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Y"}<|call|>',
        ("", "", [("get_weather", '{"city": "Y"}')]),
    ),
    (  # several messages in any order; one dropped <|start|>assistant
        "<|channel|>commentary<|message|>One. <|end|><|start|>assistant<|channel|>analysis"
        "<|message|>hmm<|end|><|channel|>analysis<|message|> more<|end|><|start|>assistant"
        "<|channel|>final<|message|>Two.<|return|>",
        ("hmm more", "One. Two.", []),
    ),
    (  # a free-form tool's input is the decoded string
        "<|channel|>commentary to=functions.apply_patch <|constrain|>json<|message|>"
        '{"input": "*** Begin Patch\\n+ok\\n"}<|call|>',
        ("", "", [("apply_patch", "*** Begin Patch\n+ok\n")]),
    ),
    ("Plain text, no harmony at all.", ("", "Plain text, no harmony at all.", [])),
    ('{"answer": 42}', ("", '{"answer": 42}', [])),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=lambda c: str(c)[:24])
def test_whole_and_char_by_char(text: str, expected: Summary) -> None:
    assert run([text]) == expected
    assert run(list(text)) == expected


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    for text, expected in CASES:
        points = sorted({c % (len(text) + 1) for c in cuts})
        pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=False)]
        assert run(pieces) == expected


def test_in_reasoning_only_inside_an_analysis_body() -> None:
    splitter = HarmonySplitter("assistant")
    seen = []
    for piece in ["<|channel|>", "analysis", "<|message|>", "x", "<|end|>", "<|start|>"]:
        splitter.feed(piece)
        seen.append(splitter.in_reasoning)
    assert seen == [False, False, True, True, False, False]
    # A call addressed from the analysis channel is not reasoning (the trigger stays armed).
    splitter = HarmonySplitter()
    splitter.feed("<|channel|>analysis to=functions.run<|message|>{")
    assert not splitter.in_reasoning


def test_arguments_stream_as_written() -> None:
    reasoning = HarmonySplitter("assistant")
    tools = HarmonyParser().splitter(TOOLS)
    head = "<|channel|>commentary to=functions.run <|constrain|>json<|message|>"
    out = []
    for part in reasoning.feed(head + '{"comm'):
        assert isinstance(part, ContentText)
        out += tools.feed(part.text)
    assert out == [ToolCallStart(0, "run"), ToolCallArgs(0, '{"comm')]
    (part,) = reasoning.feed('and": "ls"')
    assert tools.feed(part.text) == [ToolCallArgs(0, 'and": "ls"')]
    (part,) = reasoning.feed("}")
    assert tools.feed(part.text) == [ToolCallArgs(0, "}"), ToolCallEnd(0, '{"command": "ls"}')]
    assert tools.calls == 1


def test_only_what_could_be_a_header_is_held() -> None:
    splitter = HarmonySplitter(kind="content")
    assert splitter.feed("a <b> <|") == [ContentText("a <b> ")]
    assert splitter.feed("x") == [ContentText("<|x")]
    assert HarmonySplitter("assistant").feed("Hello") == [ContentText("Hello")]


@pytest.mark.parametrize(
    "bad",
    [
        '<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{"x": 1}<|call|>',
        "<|channel|>commentary to=functions.run <|constrain|>json<|message|>not json<|call|>",
        '<|channel|>commentary to=functions.run <|constrain|>json<|message|>["ls"]<|call|>',
    ],
)
def test_unknown_tools_and_malformed_calls_are_text(bad: str) -> None:
    expected = ("", bad.removesuffix("<|call|>") + "<|call|>", [])
    assert run([bad]) == expected
    assert run(list(bad)) == expected


def test_a_named_choice_makes_other_tools_text() -> None:
    named = Tooling(TOOLS.tools, ToolChoice("required", "run"))
    text = '<|channel|>commentary to=functions.get_weather json<|message|>{"city": "A"}'
    assert run([text], named) == ("", text, [])


def test_a_call_cut_off_after_its_commit_ends_uncounted() -> None:
    text = '<|channel|>commentary to=functions.run json<|message|>{"command": "l'
    assert run(list(text)) == ("", "", [("run", '{"command": "l')])
    tools = HarmonyParser().splitter(TOOLS)
    tools.feed(text)
    tools.flush()
    assert tools.calls == 0


def test_a_reply_cut_off_inside_a_header_shows_nothing_of_it() -> None:
    assert run(list("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|chan"))[:2] == (
        "a",
        "",
    )
    assert run(list(" to=functions.get_wea")) == ("", "", [])


def test_without_tools_a_stray_call_is_content() -> None:
    text = '<|channel|>commentary to=functions.run json<|message|>{"command": "ls"}<|call|>'
    assert run([text], tooling=None) == ("", text, [])


def test_the_raw_reply_parses_with_no_reasoning_parser() -> None:
    # --reasoning-parser none: every header reaches the tool-call splitter.
    raw = (
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.run"
        '<|channel|>commentary json<|message|>{"command": "ls"}<|call|>'
    )
    tools = HarmonyParser().splitter(TOOLS)
    events = [e for c in raw for e in tools.feed(c)] + tools.flush()
    content = "".join(e.text for e in events if isinstance(e, ContentText))
    assert content == "<|channel|>analysis<|message|>x<|end|><|start|>assistant"
    assert events[-1] == ToolCallEnd(0, '{"command": "ls"}')


def test_the_prompt_can_open_the_body() -> None:
    final = PROMPT + "<|channel|>final<|message|>"
    assert run(["Yes.<|return|>"], prompt=final) == ("", "Yes.", [])
    analysis = PROMPT + "<|channel|>analysis<|message|>"
    assert HarmonyReasoningParser().splitter(analysis).in_reasoning
    assert run(["a<|end|><|start|>assistant<|channel|>final<|message|>b"], prompt=analysis) == (
        "a",
        "b",
        [],
    )


# -- splits found by fuzzing (tests/unit/test_parser_fuzz.py) ---------------------


ARGS_LS = '<|message|>{"command": "ls"}'
HEAD_RUN = "<|channel|>commentary to=functions.run json<|message|>"
GOOD = "<|start|>assistant to=functions.run<|channel|>commentary json" + ARGS_LS + "<|call|>"


@pytest.mark.parametrize("raw", [False, True])
def test_a_call_broken_after_its_brace_ends_however_split(raw: bool) -> None:
    # The commit was judged once per piece: in one piece the call went back
    # whole as text; a character at a time it was committed at the brace,
    # and the character that broke it was lost.
    text = HEAD_RUN + "{x}<|call|>"
    expected = ("", "x}<|call|>", [("run", "{")])
    assert run([text], raw=raw) == expected
    assert run(list(text), raw=raw) == expected


@pytest.mark.parametrize(
    ("body", "content", "calls"),
    [  # a call not yet committed, and one broken after its commit
        ("[1]<|call|>", HEAD_RUN + "[1]<|call|><|start|>assistant", []),
        ('{"command": "ls"]<|call|>', "]<|call|><|start|>assistant", [("run", '{"command": "ls"')]),
    ],
)
def test_a_malformed_call_goes_back_only_up_to_its_fault(
    body: str, content: str, calls: list[tuple[str, str]]
) -> None:
    # In the raw reply a malformed call went back as text to the end of the
    # piece: the call after it in the same piece was lost.
    text = HEAD_RUN + body + GOOD
    expected = ("", content, [*calls, ("run", '{"command": "ls"}')])
    assert run([text], raw=True) == expected
    assert run(list(text), raw=True) == expected


def test_a_header_is_judged_without_the_start_of_its_message_marker() -> None:
    # A character at a time, "<|m" was read as part of the header: a
    # header with no channel failed, and its markup went out as text.
    text = "<|channel|>final<|message|>A<|end|><|start|>assistant<|message|>B"
    assert run([text]) == run(list(text)) == ("", "AB", [])


def test_the_start_of_a_message_marker_is_not_counted_against_a_header() -> None:
    # Nor was it left out of the longest header a model writes: a header of
    # just that length failed when "<" came on its own. The reasoning
    # splitter (whose first header holds the prompt's role) ...
    final = "<|channel|>final".ljust(MAX_HEADER - len("assistant"))
    for text, expected in ((final + "<|message|>Hi", "Hi"), (final + " <|message|>Hi", None)):
        assert run([text]) == run(list(text))
        assert expected is None or run([text]) == ("", expected, [])
    # ... and the tool-call splitter, reading a raw reply.
    call = "<|channel|>commentary to=functions.run".ljust(MAX_HEADER)
    for text in (call + ARGS_LS, call + " " + ARGS_LS):
        assert run([text], raw=True) == run(list(text), raw=True)
    assert run([call + ARGS_LS], raw=True) == ("", "", [("run", '{"command": "ls"}')])


def test_a_reply_that_does_not_go_on_with_the_prompts_header_starts_its_own() -> None:
    # Read whole, "<|start|>" after the prompt's role was an unknown header's
    # markup, shown; a character at a time the header failed before the
    # marker was whole, and it began a new header instead.
    assert run(["<|start|>"]) == run(list("<|start|>")) == ("", "", [])
    text = "<|start|>assistant<|channel|>final<|message|>Hi"
    assert run([text]) == run(list(text)) == ("", "Hi", [])


# -- grammars ---------------------------------------------------------------------

CALL_CHANNEL = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"A"}'
)
CALL_ROLE = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city":"A"}'
THOUGHT = "<|channel|>analysis<|message|>a < b, <<c <<|end|><|start|>assistant"


def recogniser(tooling: Tooling, answer: dict[str, Any] | None = None) -> Recogniser:
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = HarmonyParser().grammar(tooling, answer)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)  # raises on a bad grammar
    return Recogniser(grammar.gbnf)


def test_forced_grammar_lets_the_model_reason_first() -> None:
    g = recogniser(Tooling(TOOLS.tools, ToolChoice("required")))
    assert g.accepts(CALL_CHANNEL) and g.accepts(CALL_ROLE)
    assert g.accepts(THOUGHT + CALL_CHANNEL)
    preamble = "<|channel|>commentary<|message|>On it.<|end|><|start|>assistant"
    assert g.accepts(THOUGHT + preamble + CALL_ROLE)
    assert not g.accepts("<|channel|>final<|message|>No call.")
    assert not g.accepts(THOUGHT + "<|channel|>final<|message|>No call.")
    assert not g.accepts(CALL_CHANNEL.replace('"A"', "3"))  # the schema holds
    assert not g.accepts(CALL_CHANNEL.replace("get_weather", "rm"))
    # The type is set off from the name, which no longer runs into it.
    assert not g.accepts(CALL_CHANNEL.replace(" <|constrain|>json", "json"))
    named = recogniser(Tooling(TOOLS.tools, ToolChoice("required", "run")))
    assert not named.accepts(CALL_CHANNEL)


def test_lazy_grammar_starts_at_the_recipient() -> None:
    grammar = HarmonyParser().grammar(TOOLS)
    (trigger,) = grammar.triggers
    g = recogniser(TOOLS)
    for text in [THOUGHT + CALL_CHANNEL, CALL_ROLE, "<|start|>assistant" + CALL_ROLE]:
        m = re.compile(trigger).search(text)
        assert m is not None
        assert g.accepts(text[m.start(1) :])
    # Prose that names the recipient is no call.
    assert not re.compile(trigger).search("Final: write to=functions.x")
    assert not g.accepts(CALL_CHANNEL)  # it starts at the recipient, not the channel


def test_structured_output_is_a_call_or_a_final_answer() -> None:
    g = recogniser(TOOLS, {"type": "object", "properties": {"n": {"type": "integer"}}})
    assert g.accepts(THOUGHT + '<|channel|>final <|constrain|>json<|message|>{"n": 1}')
    assert g.accepts('<|channel|>final<|message|>{"n": 1}')
    assert g.accepts(CALL_CHANNEL)
    assert not g.accepts('<|channel|>final<|message|>{"n": "x"}')


# -- the template and the fallback ------------------------------------------------

TEMPLATE = Path(__file__).parent.parent / "data" / "templates" / "openai-gpt-oss-120b.jinja"


def test_auto_claims_the_gpt_oss_template() -> None:
    source = TEMPLATE.read_text()
    assert HarmonyParser.claims(source) and HarmonyReasoningParser.claims(source)
    assert not HarmonyParser.claims("{{ '<tool_call>' }}")
    assert set(HarmonyParser.preserved_tokens) >= {"<|channel|>", "<|call|>", "<|constrain|>"}


def test_the_templates_own_call_turns_parse_back() -> None:
    template = ChatTemplate(
        TEMPLATE.read_text(), bos_token="<|startoftext|>", eos_token="<|return|>"
    )
    args = {"command": 'echo "<a>"\nls', "options": {"timeout": 5}, "dry": True}
    messages = [
        {"role": "user", "content": "Go."},
        {
            "role": "assistant",
            "content": "",
            "thinking": "Run it.",
            "tool_calls": [{"type": "function", "function": {"name": "run", "arguments": args}}],
        },
        {"role": "tool", "content": "ok"},
        {"role": "user", "content": "Again."},
    ]
    tools = [t.template_entry() for t in TOOLS.tools]
    text = template.render(messages, tools=tools, reasoning_effort="high").text
    assert "Reasoning: high" in text and "type run = (_: {" in text
    start = text.index("<|start|>assistant") + len("<|start|>assistant")
    written = text[start : text.index("<|call|>") + len("<|call|>")]
    thought, content, calls = run([written])
    assert (thought, content) == ("Run it.", "")
    assert [(n, json.loads(a)) for n, a in calls] == [("run", args)]
    assert text.endswith("<|start|>assistant")


def test_fallback_instructions_and_history_in_harmony() -> None:
    parser = HarmonyParser()
    text = parser.instructions([WEATHER, RUN])
    assert "namespace functions {" in text
    assert 'type get_weather = (_: {\ncity: string,\ndays?: number,\nunits?: "c" | "f",\n})' in text
    written = parser.format_calls([("get_weather", {"city": "Oslo"}), ("run", {"command": "ls"})])
    assert run([written]) == (
        "",
        "",
        [("get_weather", '{"city": "Oslo"}'), ("run", '{"command": "ls"}')],
    )
