"""
The model thread's text pipeline on its own: typed events from tokens,
tool calls parsed only from content (never from reasoning), logprobs
attached to the content their tokens produced, and the end of the one
call a request allowed.
"""

from __future__ import annotations

from ds4tw._engine.interface import Token
from ds4tw._formats.pipeline import OutputPipeline
from ds4tw._formats.reasoning import TagSplitter
from ds4tw._formats.tools.parsers import HermesParser
from ds4tw._formats.tools.spec import Tooling, ToolSpec
from ds4tw._types import (
    Collector,
    ContentText,
    Finish,
    ReasoningText,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)

TOOLS = Tooling((ToolSpec("f"),))
CALL = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'


def tok(text: str, logprob: float | None = None) -> Token:
    return Token(0, text.encode(), logprob, ((0, text.encode(), logprob or 0.0),))


def feed(p: OutputPipeline, pieces: list[str], logprobs: bool = False) -> list[object]:
    out: list[object] = []
    for i, piece in enumerate(pieces):
        out += p.feed(tok(piece, -float(i + 1) if logprobs else None)).outputs
    return out + p.finish(stopped=False)


def test_a_call_quoted_in_reasoning_is_reasoning() -> None:
    p = OutputPipeline((), TagSplitter("<think>", "</think>"), HermesParser().splitter(TOOLS))
    out = feed(p, ["<think>", "I could write ", CALL, "</think>", "ok ", CALL])
    assert out[0] == ReasoningText("I could write ")
    assert ReasoningText(CALL) in out
    assert ContentText("ok ") in out
    assert [e for e in out if isinstance(e, ToolCallStart)] == [ToolCallStart(0, "f")]
    assert p.calls == 1


def test_logprobs_go_with_the_content_their_tokens_released() -> None:
    p = OutputPipeline(("STOP",))
    (hi,) = p.feed(tok("Hi", -1.0)).outputs
    assert isinstance(hi, ContentText) and [t.logprob for t in hi.logprobs] == [-1.0]
    assert p.feed(tok("ST", -2.0)).outputs == []  # could be the stop: held, with its logprob
    (released,) = p.feed(tok("x", -3.0)).outputs  # "STx" is no stop: both tokens go out
    assert isinstance(released, ContentText) and released.text == "STx"
    assert [t.logprob for t in released.logprobs] == [-2.0, -3.0]


def test_logprobs_of_a_stop_sequence_and_of_markup_are_dropped() -> None:
    p = OutputPipeline(("STOP",), tools=HermesParser().splitter(TOOLS))
    collector = Collector()
    for event in feed(p, ["ok", *CALL, " S", "TOP"], logprobs=True):
        collector.add(event)  # type: ignore[arg-type]
    got = collector.collected(Finish("stop", Usage()))
    # Whitespace after a call is not an answer; the call's and the stop's
    # tokens report nothing.
    assert got.content == "ok"
    assert [t.token for t in got.logprobs] == ["ok"]
    assert [c.name for c in got.tool_calls] == ["f"]


def test_single_call_reports_done_at_the_end_of_the_first_call() -> None:
    p = OutputPipeline((), tools=HermesParser().splitter(TOOLS), single_call=True)
    done = [p.feed(tok(c)).call_done for c in CALL]
    assert done.index(True) == CALL.index("}}") + 1
    assert any(isinstance(e, ToolCallEnd) for e in p.finish(stopped=False)) is False
