"""
The reasoning budget (L{ds4tw.SamplingParams.reasoning_budget}): once a
reply has spent it inside a reasoning block, the worker's batch loop has
the engine write the block's closing text in the model's place
(L{ds4tw._engine.interface.Engine.force}), token by token, and the model goes on
with its answer. Driven through the worker with the scripted engine,
whose L{ScriptedEngine.forced} records every token written for the model;
a forced reply skips past its own closing tag, as a model would go on
from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from ds4tw import SamplingParams
from ds4tw._formats.pipeline import OutputPipeline
from ds4tw._formats.reasoning.tags import TagReasoningParser
from ds4tw._runtime.worker import Job
from ds4tw._types import ContentText, Finish, Output, ReasoningText
from ds4tw.testing import Reply, ScriptedEngine

from .conftest import Rig, make_rig

CLOSE = "</think>"
ANSWER = ("The", " answer", " is", " 42.")


def thinking(n: int, *, opened: bool = False) -> tuple[str, ...]:
    """A reply that reasons for C{n} tokens, closes the block and answers."""
    return (*(() if opened else ("<think>",)), *[" hmm"] * n, "</think>\n\n", *ANSWER)


@dataclass
class Seen:
    """What one job sent its client, and how it ended."""

    outputs: list[Output] = field(default_factory=list)
    finish: Finish | None = None

    def stage_changed(self, stage: object) -> None:
        pass

    def output(self, event: Output) -> None:
        self.outputs.append(event)

    @property
    def reasoning(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, ReasoningText))

    @property
    def content(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, ContentText))


def submit(
    rig: Rig, budget: int | None, *, close: str = CLOSE, prompt: str = "question", **kw: Any
) -> Seen:
    engine = rig.engine
    params = SamplingParams(
        reasoning_budget=budget,
        reasoning_close=tuple(engine.tokenize(close, add_bos=False)),
        **{"max_tokens": 200, **kw},
    )
    splitter = TagReasoningParser("deepseek_r1").splitter(prompt)
    seen = Seen()
    job = Job(engine.tokenize(prompt), params, seen, pipeline=OutputPipeline(reasoning=splitter))
    d = rig.server.worker.submit(job)
    d.addCallback(lambda finish: setattr(seen, "finish", finish))
    return seen


def run(
    reply: Sequence[str | bytes], budget: int | None, prefix_cache: bool = False, **kw: Any
) -> tuple[Seen, Rig]:
    rig = make_rig([Reply.of(*reply)], prefix_cache=prefix_cache)
    seen = submit(rig, budget, **kw)
    rig.threads.run_until_idle()
    assert seen.finish is not None
    return seen, rig


def forced_text(engine: ScriptedEngine) -> str:
    return "".join(chr(token) for _, token in engine.forced)


def test_budget_spent_closes_the_block_in_the_models_place() -> None:
    seen, rig = run(thinking(50), 10)
    # The opening tag and nine tokens of reasoning are the budget's ten.
    assert seen.reasoning == " hmm" * 9
    assert seen.content == "".join(ANSWER)
    assert forced_text(rig.engine) == CLOSE
    assert seen.finish is not None and seen.finish.reason == "stop"
    # The forced tokens are completion tokens (and reasoning ones: they
    # close the block); the 40 thoughts never written are not counted. The
    # reply goes on after its own close: the "\n\n" that followed it, then
    # the answer.
    usage = seen.finish.usage
    assert usage.completion_tokens == 10 + len(CLOSE) + 1 + len(ANSWER)
    assert usage.reasoning_tokens == 10 + len(CLOSE)


def test_forced_tokens_are_decoded_one_per_step_after_the_budget() -> None:
    _, rig = run(thinking(50), 10)
    tokens = [n for step in rig.engine.steps for _, kind, n in step if kind == "token"]
    # Every token is a step of its own, forced ones included: nothing is
    # skipped or batched, and nothing is sampled in their place.
    assert tokens == list(range(1, 10 + len(CLOSE) + 1 + len(ANSWER)))
    assert rig.engine.calls[0][1].reasoning_budget == 10


def test_no_budget_changes_nothing() -> None:
    seen, rig = run(thinking(50), None)
    assert seen.reasoning == " hmm" * 50
    assert seen.content == "".join(ANSWER)
    assert rig.engine.forced == []


def test_a_block_closed_before_the_budget_changes_nothing() -> None:
    seen, rig = run(thinking(5), 10)
    assert seen.reasoning == " hmm" * 5
    assert seen.content == "".join(ANSWER)
    assert rig.engine.forced == []
    assert seen.finish is not None
    assert seen.finish.usage.completion_tokens == 1 + 5 + 1 + len(ANSWER)


def test_a_reply_without_reasoning_is_never_forced() -> None:
    seen, rig = run(ANSWER, 0)
    assert seen.content == "".join(ANSWER)
    assert seen.reasoning == ""
    assert rig.engine.forced == []


def test_budget_zero_with_the_block_opened_in_the_prompt_closes_at_once() -> None:
    seen, rig = run(thinking(50, opened=True), 0, prompt="question<think>\n", prefix_cache=True)
    assert seen.reasoning == ""
    assert seen.content == "".join(ANSWER)
    assert forced_text(rig.engine) == CLOSE
    # The very first tokens after the prompt were forced (the slot keeps
    # the finished reply's cells).
    prompt = rig.engine.calls[0][0]
    cells = rig.engine.table.slots[0].tokens
    assert cells[len(prompt) : len(prompt) + len(CLOSE)] == [ord(c) for c in CLOSE]
    assert seen.finish is not None
    assert seen.finish.usage.completion_tokens == len(CLOSE) + 1 + len(ANSWER)


def test_budget_zero_closes_right_after_the_model_opens_the_block() -> None:
    seen, rig = run(thinking(50), 0)
    assert seen.reasoning == ""
    assert seen.content == "".join(ANSWER)
    assert forced_text(rig.engine) == CLOSE


def test_the_budget_waits_for_a_character_split_across_tokens() -> None:
    # The budget runs out on a token that ends inside "é": forcing then
    # would cut the character in two, so the close waits one token.
    reply = ("<think>", " a", b" \xc3", b"\xa9", " b", " c", "</think>", "ok")
    seen, rig = run(reply, 3)
    assert seen.reasoning == " a é"
    assert seen.content == "ok"
    assert forced_text(rig.engine) == CLOSE


def test_a_close_that_does_not_end_the_block_is_forced_once() -> None:
    warnings: list[str] = []

    def observe(event: dict[str, object]) -> None:
        if "closing text did not end" in str(event.get("log_format", "")):
            warnings.append(str(event["log_format"]))

    globalLogPublisher.addObserver(observe)
    try:
        # A close the reasoning parser does not recognise (as when its
        # special token is hidden): the model goes on, closed only once.
        seen, rig = run(thinking(30), 5, close="</thought>")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert forced_text(rig.engine) == "</thought>"
    assert seen.reasoning.startswith(" hmm" * 4 + "</thought>")
    assert seen.content == "".join(ANSWER)
    assert len(warnings) == 1


def test_max_tokens_cuts_the_forced_close_like_any_token() -> None:
    short, rig = run(thinking(50), 10, max_tokens=13)
    assert short.finish is not None and short.finish.reason == "length"
    assert short.finish.usage.completion_tokens == 13
    assert forced_text(rig.engine) == CLOSE[:3]


def test_only_the_request_with_a_budget_is_forced() -> None:
    rig = make_rig([Reply.of(*thinking(20))], slots=2)
    capped = submit(rig, 4)
    free = submit(rig, None)
    rig.threads.run_until_idle()
    assert capped.reasoning == " hmm" * 3
    assert free.reasoning == " hmm" * 20
    assert capped.content == free.content == "".join(ANSWER)
    slots = {slot for slot, _ in rig.engine.forced}
    assert len(slots) == 1 and len(rig.engine.forced) == len(CLOSE)


@pytest.mark.parametrize("budget", [1, 7, 49])
def test_reasoning_never_exceeds_the_budget(budget: int) -> None:
    seen, _ = run(thinking(50), budget)
    assert seen.reasoning == " hmm" * (budget - 1)
    assert seen.content == "".join(ANSWER)
