"""
Reasoning split from content: the streaming splitter on its own, then
through the chat route (reasoning_content, hidden reasoning; the
keepalive that covers it is in tests/unit/test_dialects.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds4tw._formats.reasoning import Delta, TagSplitter, reasoning_parser
from ds4tw._types import ContentText, ReasoningText
from ds4tw.testing import Reply

from .conftest import make_rig


def run(splitter: TagSplitter, pieces: list[str]) -> list[Delta]:
    out: list[Delta] = []
    for p in pieces:
        out += splitter.feed(p)
    out += splitter.flush()
    return out


def joined(deltas: list[Delta]) -> tuple[str, str]:
    r = "".join(d.text for d in deltas if isinstance(d, ReasoningText))
    c = "".join(d.text for d in deltas if isinstance(d, ContentText))
    return r, c


def test_think_block_token_by_token() -> None:
    pieces = [
        "<",
        "think",
        ">",
        "Let me",
        " think.",
        "</",
        "think",
        ">",
        "\n\n",
        "The answer",
        " is 4.",
    ]
    assert joined(run(TagSplitter("<think>", "</think>"), pieces)) == (
        "Let me think.",
        "The answer is 4.",
    )


def test_only_what_could_be_a_tag_is_held_back() -> None:
    s = TagSplitter("<think>", "</think>", in_reasoning=True)
    assert s.feed("step one </th") == [ReasoningText("step one ")]
    assert s.feed("ink>Answer") == [ContentText("Answer")]
    assert joined(run(TagSplitter("<think>", "</think>"), ["a <", " b"])) == ("", "a < b")


def test_a_second_open_tag_is_content() -> None:
    got = run(TagSplitter("<think>", "</think>"), ["<think>x</think>", "use <think> tags"])
    assert joined(got) == ("x", "use <think> tags")


@given(
    reasoning=st.text(alphabet="abc <>/\n", max_size=20).filter(lambda t: "</think>" not in t),
    content=st.text(alphabet="abc <>/", max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_any_split_gives_the_same_split(reasoning: str, content: str, cuts: list[int]) -> None:
    text = f"<think>{reasoning}</think>{content}"
    points = sorted({c for c in cuts if c <= len(text)})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=False)]
    assert joined(run(TagSplitter("<think>", "</think>"), pieces)) == (reasoning, content)


def test_parsers_by_name() -> None:
    assert reasoning_parser("think").splitter("...<think>\n").in_reasoning
    assert not reasoning_parser("think").splitter("...assistant\n").in_reasoning
    custom = reasoning_parser("<|begin_of_thought|>,<|end_of_thought|>")
    s = custom.splitter("")
    assert joined(run(s, ["<|begin_of_thought|>hm<|end_of_thought|>ok"])) == ("hm", "ok")  # type: ignore[arg-type]
    assert joined(run(reasoning_parser("none").splitter(""), ["<think>x</think>y"])) == (
        "",
        "<think>x</think>y",
    )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("bogus")


THINKING = Reply.of("<think>", "Two", " plus", " two", ".", "</think>", "\n\n", "It is", " 4.")


def test_chat_stream_sends_reasoning_content_then_content() -> None:
    rig = make_rig([THINKING])
    ex = rig.stream()
    rig.threads.run_until_idle()
    deltas = [c["choices"][0]["delta"] for c in ex.data()[:-1] if c["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == ("Two plus two.", "It is 4.")
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])


def test_chat_non_streaming_reasoning_and_usage() -> None:
    rig = make_rig([THINKING])
    ex = rig.chat()
    rig.threads.run_until_idle()
    body = ex.json()
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "It is 4.",
        "reasoning_content": "Two plus two.",
    }
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6


def test_template_that_opens_the_block_starts_in_reasoning() -> None:
    rig = make_rig([Reply.of("Hmm", ".", "</think>", "Yes.")])
    rig.engine.generation_prompt_suffix = "<think>\n"
    ex = rig.chat()
    rig.threads.run_until_idle()
    message = ex.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Hmm.", "Yes.")


def test_reasoning_effort_none_turns_thinking_off_and_hides_it() -> None:
    rig = make_rig([THINKING])
    ex = rig.chat(reasoning_effort="none")
    rig.threads.run_until_idle()
    assert rig.engine.template_kwargs[-1] == {"enable_thinking": False, "thinking": False}
    assert ex.json()["choices"][0]["message"] == {"role": "assistant", "content": "It is 4."}


def test_completions_do_not_split_reasoning() -> None:
    rig = make_rig([THINKING])
    ex = rig.http.post("/v1/completions", {"prompt": "x", "max_tokens": 20})
    rig.threads.run_until_idle()
    assert ex.json()["choices"][0]["text"] == "<think>Two plus two.</think>\n\nIt is 4."


# -- room for the reasoning before a grammar from the first token -----------------


def _forced_hermes() -> Any:
    from ds4tw._formats.tools.parsers import HermesParser
    from ds4tw._formats.tools.spec import ToolChoice, Tooling, ToolSpec

    weather = ToolSpec("get_weather", parameters={"type": "object", "properties": {}})
    return HermesParser().grammar(Tooling((weather,), ToolChoice("required")))


def _recognise(grammar: Any) -> Any:
    from llama_cpp.llama_grammar import LlamaGrammar

    from .gbnf import Grammar as Recogniser

    LlamaGrammar.from_string(grammar.gbnf, verbose=False)  # llama.cpp parses it
    return Recogniser(grammar.gbnf, grammar.root)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'


def test_a_forced_call_leaves_room_to_think_first() -> None:
    forced = _forced_hermes()
    g = _recognise(reasoning_parser("think").before(forced, "<|im_start|>assistant\n"))
    assert g.accepts(CALL)
    assert g.accepts("<think>\nWhich tool? a < b </thin </think>\n\n" + CALL)
    assert not g.accepts("<think>never closed " + CALL)
    assert not g.accepts("Just text.")


def test_a_prompt_that_opened_the_block_must_close_it_before_the_call() -> None:
    forced = _forced_hermes()
    g = _recognise(reasoning_parser("think").before(forced, "<|im_start|>assistant\n<think>\n"))
    assert g.accepts("Weather, so get_weather.</think>\n" + CALL)
    assert g.accepts("</think>" + CALL)
    assert not g.accepts(CALL)  # the call would be inside the reasoning


def test_no_room_for_a_model_not_known_to_think() -> None:
    forced = _forced_hermes()
    # auto's fallback for a template that names no tags (the demo model's
    # ChatML): a forced call must not be put off by a think it never closes.
    fallback = reasoning_parser("auto", "{{ messages }}")
    assert fallback.before(forced, "<|im_start|>assistant\n") == forced
    assert reasoning_parser("none").before(forced, "") == forced
    # ... unless its prompt opened the block.
    opened = fallback.before(forced, "<|im_start|>assistant\n<think>\n")
    assert _recognise(opened).accepts("x</think>" + CALL)


def test_gpt_oss_answers_structured_output_in_its_final_channel() -> None:
    from ds4tw._formats.grammar import json_grammar

    answer = json_grammar({"type": "object", "properties": {"n": {"type": "integer"}}})
    parser = reasoning_parser("gpt_oss")
    g = _recognise(parser.before(answer, "<|start|>user<|message|>n?<|end|><|start|>assistant"))
    final = '<|channel|>final<|message|>{"n": 4}'
    assert g.accepts(final)
    assert g.accepts("<|channel|>analysis<|message|>Count <it>.<|end|><|start|>assistant" + final)
    assert g.accepts('<|channel|>final <|constrain|>json<|message|>{"n": 4}')
    assert not g.accepts('{"n": 4}')  # raw JSON outside any channel
    assert not g.accepts('<|channel|>final<|message|>{"n": "4"}')
