"""
Continuous batching through the worker's batch loop (L{ds4tw._runtime.scheduler}):
several requests share engine steps, a long prefill never stalls a
decoding stream, a request that leaves drops only its own sequence, more
requests than slots wait in the queue, and a finished conversation's slot
is the first cache level of its next turn.

The scripted engine records every step's units by slot (engine.steps:
C{(slot, "token", index)} or C{(slot, "prefill", done)}); a step that
completes a prompt also samples that sequence's first token, which is
not a unit of its own. SteppedThreads runs one engine step per
C{threads.step()}.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw import JobCancelled, SamplingParams, Stage
from ds4tw._engine.interface import AbortFlag, Failed, StepResult, Token
from ds4tw._engine.prefill import AGING_STEPS
from ds4tw._runtime.worker import Job, StepStats
from ds4tw.testing import Exchange

from .conftest import Rig, make_rig

K = 15.0  # the default keepalive interval (tests/unit/test_keepalive.py)

LONG = " ".join(f"w{i}" for i in range(60))


# -- helpers ---------------------------------------------------------------------


def chunks(ex: Exchange) -> list[dict[str, Any]]:
    """The chat completion chunks a stream has sent so far (not [DONE], not errors)."""
    return [d["choices"][0] for d in ex.data() if isinstance(d, dict) and "choices" in d]


def text(ex: Exchange) -> str:
    """The content a streaming chat completion has sent so far."""
    return "".join(c["delta"].get("content") or "" for c in chunks(ex))


def content_chunks(ex: Exchange) -> int:
    return sum(1 for c in chunks(ex) if c["delta"].get("content"))


def finish_reason(ex: Exchange) -> str | None:
    reasons = [c["finish_reason"] for c in chunks(ex) if c["finish_reason"]]
    return reasons[-1] if reasons else None


def alone(reply: str, content: str, **kw: Any) -> tuple[str, str | None]:
    """What a streamed request says, and why it ends, with the model to itself."""
    rig = make_rig([reply])
    ex = rig.stream(content, **kw)
    rig.threads.run_until_idle()
    assert ex.finished
    return text(ex), finish_reason(ex)


def slots_of(step: tuple[tuple[int, str, int], ...]) -> set[int]:
    return {slot for slot, _, _ in step}


def kinds(step: tuple[tuple[int, str, int], ...]) -> dict[int, str]:
    return {slot: kind for slot, kind, _ in step}


def step_until(rig: Rig, done: Any, limit: int = 500) -> None:
    for _ in range(limit):
        if done():
            return
        rig.threads.step()
    raise AssertionError("the condition never held")


def metrics(rig: Rig) -> str:
    return str(rig.http.get("/metrics").body.decode())


def sample(text: str, name: str) -> float:
    """One sample's value from the Prometheus text (C{name} with its labels)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def prompt_of(rig: Rig, n: int) -> list[int]:
    """The prompt of the C{n}th sequence the engine opened."""
    return rig.engine.calls[n][0]


@contextmanager
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def decoding(ex: Exchange) -> bool:
    return content_chunks(ex) > 0


# -- interleavings -------------------------------------------------------------


def test_one_step_holds_a_decoding_token_and_another_requests_prefill_chunk() -> None:
    rig = make_rig([LONG, "short answer"], slots=2, n_batch=8)
    a = rig.stream("x", max_tokens=100)
    step_until(rig, lambda: decoding(a))
    b = rig.stream("a prompt long enough for several prefill chunks")
    rig.threads.step()
    # Continuous batching: a's next token and b's first chunk, one forward pass.
    assert rig.engine.steps[-1] == ((0, "token", 1), (1, "prefill", 7))
    rig.threads.run_until_idle()
    assert a.finished and b.finished
    assert text(b) == "short answer"


def test_a_long_prefill_is_split_and_the_decoding_stream_gets_a_token_every_step() -> None:
    rig = make_rig([LONG, "done"], slots=2, n_batch=8)
    stats: list[StepStats] = []
    rig.server.worker.step_observers.append(stats.append)
    a = rig.stream("x", max_tokens=100)
    step_until(rig, lambda: decoding(a))
    b = rig.stream("p" * 100)
    b_prompt = None
    prefill_steps = 0
    while not decoding(b):
        before = content_chunks(a)
        rig.threads.step()
        b_prompt = b_prompt or prompt_of(rig, 1)
        step = rig.engine.steps[-1]
        assert kinds(step) == {0: "token", 1: "prefill"}, step
        # Never a step without a's token while b prefills: one chunk each.
        assert content_chunks(a) == before + 1
        prefill_steps += 1
    assert b_prompt is not None
    # b's prompt went in bounded chunks: the budget less a's token.
    assert prefill_steps == -(-len(b_prompt) // 7) > 10
    assert all(s.decode_tokens + s.prefill_tokens <= 8 for s in stats)
    assert [s.prefill_tokens for s in stats[-prefill_steps:-1]] == [7] * (prefill_steps - 1)
    rig.threads.run_until_idle()
    assert text(a) == alone(LONG, "x", max_tokens=100)[0]
    assert text(b) == "done"


def test_a_smaller_step_while_others_decode_and_the_full_one_alone() -> None:
    rig = make_rig(["a b c d e f g h i j", "done"], slots=2, n_batch=32, n_batch_decoding=8)
    a = rig.stream("p" * 80, max_tokens=10)
    rig.threads.step()
    # Nobody decodes yet: a's prompt goes in full --batch chunks.
    assert rig.engine.steps[-1] == ((0, "prefill", 32),)
    step_until(rig, lambda: decoding(a))
    b = rig.stream("q" * 80)
    rig.threads.step()
    # a decodes: b's chunk is the smaller budget less a's token.
    assert rig.engine.steps[-1] == ((0, "token", rig.engine.steps[-1][0][2]), (1, "prefill", 7))
    rig.threads.run_until_idle()
    # Once a had finished, b went on in full chunks again.
    done = [0] + [
        n for step in rig.engine.steps for slot, kind, n in step if slot == 1 and kind == "prefill"
    ]
    sizes = [y - x for x, y in pairwise(done)]
    assert done[-1] == len(prompt_of(rig, 1))
    assert sizes[0] == 7 and 32 in sizes, sizes
    assert text(b) == "done"


def test_the_shortest_remaining_prompt_is_prefilled_first() -> None:
    rig = make_rig(["a b c d e f g h"], slots=3, n_batch=8)
    jobs = [
        Job(list(range(100, 120)), SamplingParams(max_tokens=8)),  # 20 tokens, slot 0
        Job(list(range(200, 205)), SamplingParams(max_tokens=8)),  # 5 tokens, slot 1
        Job(list(range(300, 312)), SamplingParams(max_tokens=8)),  # 12 tokens, slot 2
    ]
    for job in jobs:
        rig.server.worker.submit(job)
    rig.threads.step(3)
    assert rig.engine.steps == [
        # The shortest prompt first, the next one with what is left of the budget.
        ((1, "prefill", 5), (2, "prefill", 3)),
        # Slot 1 decodes now; its token comes before any prompt chunk.
        ((1, "token", 1), (2, "prefill", 10)),
        ((1, "token", 2), (2, "prefill", 12), (0, "prefill", 5)),
    ]
    rig.threads.run_until_idle()
    assert all(job.deferred.called for job in jobs)


def test_a_long_prompt_is_not_starved_by_a_flood_of_short_ones() -> None:
    """
    A batch client keeps two slots busy with 8-token prompts (max_tokens=1:
    each is done in the step that prefills it); a 40-token prompt in the
    third slot still moves, leading one step in every AGING_STEPS + 1.
    """
    rig = make_rig(["a b"], slots=3, n_batch=8)
    long = Job(list(range(1000, 1040)), SamplingParams(max_tokens=1))
    rig.server.worker.submit(long)
    shorts = [Job([2000 + i] * 8, SamplingParams(max_tokens=1)) for i in range(100)]
    for job in shorts:
        rig.server.worker.submit(job)
    step_until(rig, lambda: long.deferred.called, limit=5 * (AGING_STEPS + 1) + 5)
    # It finished while the flood went on: most of the short prompts still wait.
    assert sum(job.deferred.called for job in shorts) < 60
    served = [step for step in rig.engine.steps if (0, "prefill") in {(u[0], u[1]) for u in step}]
    assert len(served) == 5  # five chunks of 8: each a whole step's budget
    rig.threads.run_until_idle()
    assert all(job.deferred.called for job in shorts)


def test_batched_streams_say_exactly_what_each_says_alone() -> None:
    reply_a, reply_b = "one two three four five six", "alpha beta gamma STOP delta"
    # Sampling limits and stop strings stay per request.
    kw_a: dict[str, Any] = {"max_tokens": 4}
    kw_b: dict[str, Any] = {"stop": [" STOP"]}
    solo_a = alone(reply_a, "first question", **kw_a)
    solo_b = alone(reply_b, "second, a longer question than the first", **kw_b)
    assert solo_a == ("one two three four", "length")
    assert solo_b == ("alpha beta gamma", "stop")

    rig = make_rig([reply_a, reply_b], slots=2, n_batch=8)
    a = rig.stream("first question", **kw_a)
    rig.threads.step(3)
    b = rig.stream("second, a longer question than the first", **kw_b)
    rig.threads.run_until_idle()
    assert any(slots_of(step) == {0, 1} for step in rig.engine.steps)
    assert (text(a), finish_reason(a)) == solo_a
    assert (text(b), finish_reason(b)) == solo_b
    assert a.data()[-1] == b.data()[-1] == "[DONE]"


def test_each_step_is_one_hand_off_to_the_reactor() -> None:
    rig = make_rig(["a b c d e f g h", "one two three four five six"], slots=2)
    handoffs: list[object] = []
    inner = rig.threads.to_reactor

    def to_reactor(f: Any, *args: Any) -> None:
        handoffs.append(f)
        inner(f, *args)

    rig.threads.to_reactor = to_reactor  # type: ignore[method-assign]
    a, b = rig.stream("first"), rig.stream("second")
    rig.threads.step()
    while rig.engine.steps and all(kinds(rig.engine.steps[-1]).get(s) != "token" for s in (0, 1)):
        rig.threads.step()
    # Both decode now: each step is two tokens, one call into the reactor.
    for _ in range(4):
        before = len(handoffs)
        rig.threads.step()
        assert kinds(rig.engine.steps[-1]) == {0: "token", 1: "token"}
        assert len(handoffs) == before + 1
    rig.threads.run_until_idle()
    assert a.finished and b.finished


# -- a disconnect mid-batch ---------------------------------------------------------


def test_a_disconnect_mid_batch_drops_only_that_sequence_and_its_output_cells() -> None:
    rig = make_rig([LONG, LONG], slots=2, n_batch=8, prefix_cache=True)
    a = rig.stream("x", max_tokens=40)
    rig.threads.step()
    b = rig.stream("y", max_tokens=40)
    step_until(rig, lambda: content_chunks(b) >= 3)
    table = rig.engine.table
    b_prompt = prompt_of(rig, 1)
    # b runs in the other slot; its cells hold its prompt and its output.
    assert kinds(rig.engine.steps[-1]) == {0: "token", 1: "token"}
    assert table.busy == 2 and rig.http.get("/health").json()["slots_busy"] == 2
    assert len(table.slots[1].tokens) > len(b_prompt)
    with log_lines() as lines:
        b.disconnect()
        seen = len(rig.engine.steps)
        rig.threads.step()
    # Gone before the next step, which a has to itself.
    assert rig.engine.computed[-2] == ("closed", None)
    assert slots_of(rig.engine.steps[-1]) == {0}
    assert table.busy == 1 and rig.http.get("/health").json()["slots_busy"] == 1
    # Its output's cells are freed; its prompt stays as a cache.
    assert table.slots[1].tokens == b_prompt and not table.slots[1].busy
    assert any("cancelled at decode" in line for line in lines)
    rig.threads.run_until_idle()
    assert all(1 not in slots_of(step) for step in rig.engine.steps[seen:])
    assert a.finished and (text(a), finish_reason(a)) == alone(LONG, "x", max_tokens=40)
    assert content_chunks(b) == 3
    m = metrics(rig)
    assert sample(m, 'ds4tw_cancelled_jobs_total{stage="decode"}') == 1.0
    assert sample(m, 'ds4tw_jobs_total{outcome="done"}') == 1.0


def test_a_disconnect_during_prefill_keeps_only_the_computed_prompt_prefix() -> None:
    rig = make_rig([LONG, "never"], slots=2, n_batch=8, prefix_cache=True)
    a = rig.stream("x", max_tokens=40)
    step_until(rig, lambda: decoding(a))
    b = rig.stream("a prompt long enough to need many prefill chunks, " * 3)
    rig.threads.step(3)
    b_prompt = prompt_of(rig, 1)
    done = next(n for slot, kind, n in rig.engine.steps[-1] if slot == 1 and kind == "prefill")
    assert done < len(b_prompt)
    seen = len(rig.engine.steps)
    b.disconnect()
    rig.threads.run_until_idle()
    assert all(1 not in slots_of(step) for step in rig.engine.steps[seen:])
    assert rig.engine.table.slots[1].tokens == b_prompt[:done]
    assert rig.engine.table.busy == 0
    assert (text(a), finish_reason(a)) == alone(LONG, "x", max_tokens=40)
    m = metrics(rig)
    assert sample(m, 'ds4tw_cancelled_jobs_total{stage="prefill"}') == 1.0
    assert 'ds4tw_cancelled_jobs_total{stage="decode"}' not in m


# -- the in-step abort --------------------------------------------------------------


def test_the_in_step_abort_fires_only_when_every_running_job_is_cancelled() -> None:
    rig = make_rig(["a b c d e f g h", "1 2 3 4 5 6 7 8", "next one"], slots=2)
    a = Job(list(range(100, 110)), SamplingParams(max_tokens=8))
    b = Job(list(range(200, 210)), SamplingParams(max_tokens=8))
    failures: dict[str, JobCancelled] = {}
    a.deferred.addErrback(lambda f: failures.setdefault("a", f.value))
    b.deferred.addErrback(lambda f: failures.setdefault("b", f.value))
    rig.server.worker.submit(a)
    rig.server.worker.submit(b)
    rig.threads.step(2)  # both prefilled, then a token each
    assert rig.engine.steps[-1] == ((0, "token", 1), (1, "token", 1))

    def cancel_inside(job: Job) -> None:
        def hook(unit: tuple[str, int]) -> None:
            rig.engine.step_hook = None
            job.cancel()

        rig.engine.step_hook = hook

    # a leaves inside a step that b still needs: the step is computed whole.
    cancel_inside(a)
    computed = len(rig.engine.computed)
    rig.threads.step()
    assert a.cancelled and not a.deferred.called
    assert rig.engine.steps[-1] == ((0, "token", 2), (1, "token", 2))
    assert rig.engine.computed[computed:] == [("token", 2), ("token", 2)]

    # b, the last one, leaves inside the next step (a left before it): aborted.
    cancel_inside(b)
    steps, computed = len(rig.engine.steps), len(rig.engine.computed)
    rig.threads.step()
    assert len(rig.engine.steps) == steps
    # Nothing computed: a's sequence closed before the step, b's after the abort.
    assert rig.engine.computed[computed:] == [("closed", None), ("closed", None)]
    assert failures["a"].stage is Stage.DECODE and failures["b"].stage is Stage.DECODE
    rig.threads.step()
    assert not rig.threads.busy and rig.engine.table.busy == 0

    # The flag does not outlive them: the next request runs whole.
    c = rig.stream()
    rig.threads.run_until_idle()
    assert text(c) == "next one"
    m = metrics(rig)
    assert sample(m, 'ds4tw_cancelled_jobs_total{stage="decode"}') == 2.0


# -- slots full: the queue ---------------------------------------------------------


def test_with_every_slot_busy_a_request_waits_with_keepalives_and_starts_when_one_ends() -> None:
    rig = make_rig(["one two", LONG, "third reply"], slots=2)
    a = rig.stream("first", max_tokens=40)
    b = rig.stream("second", max_tokens=40)
    rig.threads.step()
    c = rig.stream("third")
    assert c.status == 200 and c.headers_sent and c.body == b""
    assert rig.server.worker.queue_depth == 1
    assert len(rig.engine.calls) == 2
    rig.clock.advance(K)
    rig.clock.advance(K)
    assert c.comments() == ["queued", "queued"]
    step_until(rig, lambda: a.finished)
    # a's slot is free: c is admitted at once and prefilled in the next step.
    assert rig.server.worker.queue_depth == 0
    rig.threads.step()
    assert len(rig.engine.calls) == 3
    assert kinds(rig.engine.steps[-1]) == {0: "prefill", 1: "token"}
    rig.threads.run_until_idle()
    assert text(c) == "third reply"
    assert text(b) == alone(LONG, "second", max_tokens=40)[0]
    assert c.comments() == ["queued", "queued"]


def test_cancelling_a_queued_request_never_reaches_the_engine() -> None:
    rig = make_rig(["one two three", "four five six", "never"], slots=2)
    a, b = rig.stream("first"), rig.stream("second")
    rig.threads.step()
    c = rig.stream("third")
    assert rig.server.worker.queue_depth == 1
    c.disconnect()
    assert rig.server.worker.queue_depth == 0
    rig.threads.run_until_idle()
    assert len(rig.engine.calls) == 2
    assert a.finished and b.finished
    assert (text(a), text(b)) == ("one two three", "four five six")
    assert sample(metrics(rig), 'ds4tw_cancelled_jobs_total{stage="queued"}') == 1.0


# -- retained slots ----------------------------------------------------------------


def chat(rig: Rig, messages: list[dict[str, str]]) -> Any:
    ex = rig.http.post("/v1/chat/completions", {"model": "m", "messages": messages})
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    return ex.json()


def answer(body: Any) -> str:
    return str(body["choices"][0]["message"]["content"])


def cached(body: Any) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def next_turn(turn: list[dict[str, str]], body: Any, content: str) -> list[dict[str, str]]:
    return [
        *turn,
        {"role": "assistant", "content": answer(body)},
        {"role": "user", "content": content},
    ]


def test_a_continued_conversation_runs_in_its_slot_from_its_cache() -> None:
    rig = make_rig(
        ["a long answer " * 5, "Hello there friend.", "Second answer."],
        slots=2,
        prefix_cache=True,
    )
    # Something else holds slot 0, so the conversation starts in slot 1.
    other = rig.stream("an unrelated long question", max_tokens=30)
    rig.threads.step()
    turn1 = [{"role": "user", "content": "Hi"}]
    first = rig.http.post("/v1/chat/completions", {"model": "m", "messages": turn1})
    rig.threads.run_until_idle()
    first_body = first.json()
    assert other.finished
    assert {slot for step in rig.engine.steps[1:] for slot, _, _ in step} == {0, 1}
    steps = len(rig.engine.steps)
    stats: list[StepStats] = []
    rig.server.worker.step_observers.append(stats.append)
    second = chat(rig, next_turn(turn1, first_body, "And then?"))
    # Turn 1's whole prompt is a prefix of turn 2's and was not computed again.
    assert cached(second) >= first_body["usage"]["prompt_tokens"]
    assert cached(second) < second["usage"]["prompt_tokens"]
    assert answer(second) == "Second answer."
    assert {slot for step in rig.engine.steps[steps:] for slot, _, _ in step} == {1}
    # Only the rest of the prompt was computed.
    prefilled = sum(s.prefill_tokens for s in stats)
    assert prefilled == second["usage"]["prompt_tokens"] - cached(second)


def test_an_unrelated_request_in_between_does_not_evict_the_conversation() -> None:
    rig = make_rig(
        ["Hello there friend.", "Unrelated.", "Second answer."], slots=2, prefix_cache=True
    )
    turn1 = [{"role": "user", "content": "Hi"}]
    first = chat(rig, turn1)
    chat(rig, [{"role": "user", "content": "What is the weather like on Mars today?"}])
    second = chat(rig, next_turn(turn1, first, "And then?"))
    assert cached(second) >= first["usage"]["prompt_tokens"]


def test_with_one_slot_an_unrelated_request_evicts_the_conversation() -> None:
    rig = make_rig(
        ["Hello there friend.", "Unrelated.", "Second answer."], slots=1, prefix_cache=True
    )
    turn1 = [{"role": "user", "content": "Hi"}]
    first = chat(rig, turn1)
    chat(rig, [{"role": "user", "content": "What is the weather like on Mars today?"}])
    second = chat(rig, next_turn(turn1, first, "And then?"))
    # Only what the unrelated prompt shares with it (the template's header).
    unrelated, turn2 = prompt_of(rig, 1), prompt_of(rig, 2)
    shared = next(i for i, (x, y) in enumerate(zip(unrelated, turn2, strict=False)) if x != y)
    assert 0 < shared < first["usage"]["prompt_tokens"]
    assert cached(second) == shared


def test_the_least_recently_used_conversation_is_evicted() -> None:
    rig = make_rig(["Answer."], slots=2, prefix_cache=True)
    conv_a = [{"role": "user", "content": "Conversation A"}]
    conv_b = [{"role": "user", "content": "Conversation B"}]
    # Both at once, so each has its own slot.
    ex_a = rig.http.post("/v1/chat/completions", {"model": "m", "messages": conv_a})
    ex_b = rig.http.post("/v1/chat/completions", {"model": "m", "messages": conv_b})
    rig.threads.run_until_idle()
    # A goes on (its slot is now the most recently used), then a third one.
    conv_a2 = next_turn(conv_a, ex_a.json(), "More A")
    a2 = chat(rig, conv_a2)
    assert cached(a2) >= ex_a.json()["usage"]["prompt_tokens"]
    chat(rig, [{"role": "user", "content": "Conversation C"}])
    # C took B's slot, the least recently used: A continues from its cache.
    a3 = chat(rig, next_turn(conv_a2, a2, "Still A"))
    assert cached(a3) >= a2["usage"]["prompt_tokens"]
    assert ex_b.json()["usage"]["prompt_tokens"] > 0


# -- visible: /health, /metrics, the log line -------------------------------------


def test_health_reports_slots_and_slots_busy_while_requests_run() -> None:
    rig = make_rig([LONG], slots=2)
    health = rig.http.get("/health").json()
    assert (health["slots"], health["slots_busy"], health["busy"]) == (2, 0, False)
    a = rig.stream("a", max_tokens=3)
    health = rig.http.get("/health").json()
    assert (health["slots_busy"], health["queue_depth"]) == (1, 0)
    b = rig.stream("b", max_tokens=30)
    c = rig.stream("c", max_tokens=3)
    rig.threads.step()
    health = rig.http.get("/health").json()
    (model,) = health.pop("models")
    assert health == {
        "status": "ok",
        "model": "scripted",
        "queue_depth": 1,
        "busy": True,
        "slots": 2,
        "slots_busy": 2,
        "parsers": {"tool_call": "hermes", "reasoning": "think"},
        "memory": {"budget_bytes": None, "used_bytes": 0},
    }
    assert (model["queue_depth"], model["slots"], model["slots_busy"]) == (1, 2, 2)
    step_until(rig, lambda: a.finished)
    # c took a's slot at once.
    health = rig.http.get("/health").json()
    assert (health["slots_busy"], health["queue_depth"]) == (2, 0)
    step_until(rig, lambda: c.finished)
    assert rig.http.get("/health").json()["slots_busy"] == 1
    rig.threads.run_until_idle()
    assert b.finished
    health = rig.http.get("/health").json()
    assert (health["slots_busy"], health["busy"]) == (0, False)


def test_metrics_report_slots_and_every_step() -> None:
    rig = make_rig(["one two three four five", "six seven eight"], slots=2, n_batch=16)
    a = rig.stream("first")
    rig.threads.step()
    b = rig.stream("second")
    rig.threads.step()
    m = metrics(rig)
    assert sample(m, "ds4tw_slots") == 2.0
    assert sample(m, "ds4tw_slots_busy") == 2.0
    rig.threads.run_until_idle()
    assert a.finished and b.finished
    m = metrics(rig)
    assert sample(m, "ds4tw_slots_busy") == 0.0
    steps = [step for step in rig.engine.steps if step]
    sizes = [len(slots_of(step)) for step in steps]
    assert 2 in sizes  # a step with both sequences
    prompt_tokens = len(prompt_of(rig, 0)) + len(prompt_of(rig, 1))
    decoded = sum(1 for step in steps for _, kind, _ in step if kind == "token")
    assert sample(m, "ds4tw_step_batch_size_count") == len(steps)
    assert sample(m, "ds4tw_step_batch_size_sum") == sum(sizes)
    assert sample(m, 'ds4tw_step_batch_size_bucket{le="1.0"}') == sizes.count(1)
    assert sample(m, "ds4tw_step_prefill_tokens_sum") == prompt_tokens
    assert sample(m, "ds4tw_step_prefill_tokens_count") == len(steps)
    assert sample(m, "ds4tw_step_tokens_sum") == prompt_tokens + decoded
    assert sample(m, "ds4tw_step_seconds_count") == len(steps)
    assert sample(m, "ds4tw_step_seconds_sum") >= 0.0


def test_the_job_log_line_counts_the_requests_that_shared_its_steps() -> None:
    rig = make_rig(["one two three", "four five six", "seven"], slots=2)
    with log_lines() as lines:
        a, b = rig.stream("first"), rig.stream("second")
        rig.threads.run_until_idle()
        c = rig.stream("third")
        rig.threads.run_until_idle()
    assert a.finished and b.finished and c.finished
    done = [line for line in lines if " done: " in line]
    assert len(done) == 3
    assert all("shared steps with 1 other requests" in line for line in done[:2])
    assert "shared steps with 0 other requests" in done[2]


def test_a_cancelled_jobs_log_line_counts_its_peers_too() -> None:
    rig = make_rig([LONG, "four five six"], slots=2)
    with log_lines() as lines:
        a, b = rig.stream("first", max_tokens=30), rig.stream("second")
        rig.threads.step(2)
        a.disconnect()
        rig.threads.run_until_idle()
    assert b.finished
    cancelled = [line for line in lines if "cancelled at decode" in line]
    assert len(cancelled) == 1
    assert "shared steps with 1 other requests" in cancelled[0]


# -- a failure in one sequence -------------------------------------------------------


@pytest.mark.logs_engine_errors
def test_a_sequence_that_fails_in_a_step_fails_only_its_request() -> None:
    rig = make_rig([LONG, LONG], slots=2)
    step = rig.engine.step
    tokens_of_b = 0

    def failing(abort: AbortFlag | None = None) -> StepResult:
        # The step runs; then slot 1's sampler breaks at its third token.
        nonlocal tokens_of_b
        result = step(abort)
        events = []
        for seq, event in result.events:
            if seq == 1 and isinstance(event, Token):
                tokens_of_b += 1
                if tokens_of_b == 3:
                    event = Failed(RuntimeError("the sampler broke"))
            events.append((seq, event))
        return replace(result, events=tuple(events))

    rig.engine.step = failing  # type: ignore[method-assign]
    a = rig.stream("first", max_tokens=20)
    b = rig.stream("second", max_tokens=20)
    step_until(rig, lambda: b.finished)
    assert not a.finished
    events = b.events()
    assert events[-2][0] == "error" and "the sampler broke" in events[-2][1]
    assert events[-1] == (None, "[DONE]")
    assert content_chunks(b) == 2
    # Its sequence is gone; a goes on alone and ends as it would have.
    assert rig.engine.table.busy == 1
    seen = len(rig.engine.steps)
    rig.threads.run_until_idle()
    assert all(slots_of(step) <= {0} for step in rig.engine.steps[seen:])
    assert (text(a), finish_reason(a)) == alone(LONG, "first", max_tokens=20)
    m = metrics(rig)
    assert sample(m, 'ds4tw_jobs_total{outcome="error"}') == 1.0
    assert sample(m, 'ds4tw_jobs_total{outcome="done"}') == 1.0


@pytest.mark.logs_engine_errors
def test_a_job_whose_params_the_engine_refuses_fails_alone() -> None:
    rig = make_rig(["one two three", "four five six"], slots=2)
    opened = rig.engine.open

    def picky(prompt: Any, params: SamplingParams) -> int:
        if params.max_tokens == 7:
            raise ValueError("this grammar does not parse")
        return opened(prompt, params)

    rig.engine.open = picky  # type: ignore[method-assign]
    good = Job([1, 2, 3], SamplingParams(max_tokens=8))
    bad = Job([1, 2, 4], SamplingParams(max_tokens=7))
    errors: list[BaseException] = []
    bad.deferred.addErrback(lambda f: errors.append(f.value))
    rig.server.worker.submit(good)
    rig.server.worker.submit(bad)
    rig.threads.run_until_idle()
    assert [str(e) for e in errors] == ["this grammar does not parse"]
    assert good.deferred.called and rig.engine.table.busy == 0
