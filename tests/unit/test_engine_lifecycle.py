"""
An engine's life as a multi-model server drives it, on the scripted
engine: the prompt side before any load (prepare), a load that reports
progress and stops when its callback says so (LoadAborted, nothing
loaded, a later load works), an unload (close) and a reload that serve
the same answers from empty slots, the prompt cache across the unload
(its memory tier dropped, its disk tier kept), what memory() says, and a
paced load (--model scripted:load_seconds=...).

The real engine's side of the same contract, with llama.cpp's own load
progress and buffers, is tests/integration/test_engine_lifecycle.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ds4tw import Engine, PrefillProgress, PromptCache, SamplingParams, Token
from ds4tw._engine.interface import LoadAborted, MemoryUse
from ds4tw._engine.scripted import parse_spec
from ds4tw.testing import ScriptedEngine

GREEDY = SamplingParams(max_tokens=16, temperature=0)
#: Long enough for the prompt cache (min_tokens below).
PROMPT = "A question long enough to be worth caching: " + "why? " * 20


def run(engine: ScriptedEngine, text: str) -> tuple[bytes, int, str | None]:
    """The reply, the prompt tokens reused, and where they came from."""
    out, cached, source = b"", -1, None
    for ev in engine.generate(engine.tokenize(text, add_bos=False), GREEDY):
        if isinstance(ev, Token):
            out += ev.piece
        elif isinstance(ev, PrefillProgress) and ev.cached > cached:
            cached, source = ev.cached, ev.source
    return out, cached, source


def test_the_prompt_side_works_before_any_load() -> None:
    engine = ScriptedEngine(load_steps=3)
    engine.prepare()
    engine.prepare()  # idempotent
    assert engine.prepared and not engine.loaded
    assert engine.tokenize("ab", add_bos=False) == [ord("a"), ord("b")]
    assert "<|im_start|>" in engine.apply_chat_template([{"role": "user", "content": "hi"}]).text
    assert engine.chat_template and engine.n_vocab > 0
    assert engine.load_progress == []  # nothing was loaded for it


def test_load_reports_each_step_and_prepares_first() -> None:
    engine = ScriptedEngine(load_steps=4)
    seen: list[float] = []
    engine.load(lambda f: seen.append(f) or True)
    assert seen == [0.25, 0.5, 0.75, 1.0]
    assert engine.prepared and engine.loaded and engine.loads == 1


def test_a_load_whose_callback_says_stop_raises_and_leaves_it_unloaded() -> None:
    engine = ScriptedEngine(["Hello there."], load_steps=4)
    seen: list[float] = []

    def until_half(f: float) -> bool:
        seen.append(f)
        return f < 0.5

    with pytest.raises(LoadAborted):
        engine.load(until_half)
    # It stopped at the report that said no: the rest never ran.
    assert seen == [0.25, 0.5]
    assert not engine.loaded and engine.loads == 0 and engine.aborted_loads == 1
    # A later load starts over and works.
    engine.load()
    assert engine.loaded and engine.loads == 1
    assert run(engine, "hi")[0] == b"Hello there."


def test_a_load_with_no_steps_never_calls_back() -> None:
    engine = ScriptedEngine()
    engine.load(lambda f: pytest.fail("no progress to report"))
    assert engine.loaded


def test_unload_then_reload_gives_the_same_answer_from_empty_slots() -> None:
    engine = ScriptedEngine(["Same answer."], prefix_cache=True, slots=2)
    engine.load()
    first, _, _ = run(engine, PROMPT)
    assert run(engine, PROMPT)[2] == "slot"  # loaded, the slot keeps the prompt
    engine.close()
    assert engine.closed and not engine.loaded and engine.unloads == 1
    # The cells went with the "context": no slot claims to hold anything.
    assert all(not s.tokens for s in engine.table.slots)
    assert engine.tokenize("x", add_bos=False) == [ord("x")]  # the prompt side stays
    engine.load()
    assert not engine.closed and engine.loads == 2
    again, cached, source = run(engine, PROMPT)
    assert again == first
    assert (cached, source) == (0, None)  # computed again, not "reused" from freed cells


def test_the_memory_tier_is_dropped_on_unload_and_the_disk_tier_brings_it_back(
    tmp_path: Path,
) -> None:
    ram_only = PromptCache(ram_bytes=1 << 20, min_tokens=16)
    engine = ScriptedEngine(["A."], prefix_cache=True, prompt_cache=ram_only)
    engine.load()
    run(engine, PROMPT)
    run(engine, "Another conversation entirely, pushing the first out of the slot. " * 2)
    assert run(engine, PROMPT)[2] == "ram"
    engine.close()
    assert len(ram_only.ram) == 0  # what an unloaded model holds is nothing
    engine.load()
    assert run(engine, PROMPT)[1:] == (0, None)

    with_disk = PromptCache(ram_bytes=1 << 20, disk_dir=tmp_path, disk_bytes=1 << 20, min_tokens=16)
    engine = ScriptedEngine(["A."], prefix_cache=True, prompt_cache=with_disk)
    engine.load()
    run(engine, PROMPT)
    engine.close()  # the slot's prefix is written to disk
    assert any(tmp_path.glob("*.kv"))
    engine.load()
    _, cached, source = run(engine, PROMPT)
    assert source == "disk" and cached >= len(PROMPT) - 1
    # Loaded again, the directory was scanned once: no entry twice.
    tokens = [tuple(e.tokens) for e in with_disk.disk.entries]
    assert len(tokens) == len(set(tokens))
    engine.close()


def test_memory_reports_the_weights_and_the_prompt_caches_budget() -> None:
    cache = PromptCache(ram_bytes=3 << 20)
    engine = ScriptedEngine(memory_mb=100, prompt_cache=cache)
    before = engine.memory()
    assert before == MemoryUse(weights=100 << 20, kv=0, compute=0, cache=3 << 20, measured=False)
    assert before.total == 103 << 20
    assert before.mib()["total"] == 103.0
    engine.load()
    assert engine.memory().measured and engine.memory().total == before.total
    engine.close()
    assert not engine.memory().measured


def test_the_scripted_engine_is_an_engine_with_the_whole_lifecycle() -> None:
    engine = ScriptedEngine()
    assert isinstance(engine, Engine)
    for name in ("prepare", "load", "close", "memory"):
        assert callable(getattr(engine, name))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ScriptedEngine(load_steps=-1)
    with pytest.raises(ValueError):
        ScriptedEngine(memory_mb=-1)


def test_a_paced_load_shares_its_seconds_out_before_each_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # no real waiting
    engine = ScriptedEngine(load_seconds=2.0)
    seen: list[float] = []
    engine.load(lambda f: seen.append(f) or True)
    assert slept == [0.2] * 10 and seen == [i / 10 for i in range(1, 11)]


def test_the_scripted_spec_sets_the_load_time_and_the_memory() -> None:
    spec = parse_spec("load_seconds=3,memory_mb=512,reply=Hi.")
    engine = spec.engine()
    assert (engine.load_seconds, engine.load_steps) == (3.0, 10)
    assert engine.memory().weights == 512 << 20
    with pytest.raises(ValueError, match="load_seconds must be a number >= 0"):
        parse_spec("load_seconds=-1")
