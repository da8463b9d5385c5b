"""
L{ProcessEngine}: a model in a child process (what C{--rpc} runs, so that
llama.cpp's abort on a lost worker ends the child, not the server), with
real processes: the demo model gives the same greedy tokens there as
here, a grammar's trigger guard and the step's abort flag cross the
process boundary, a child killed mid-step is a L{BackendLost} and the
engine loads again, a hung step is killed at its timeout, and a load's
progress can stop it. Timing assertions are relative to the work itself
(a prefill batch's own length), never absolute speeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ds4tw import (
    Aborted,
    AbortFlag,
    Grammar,
    LlamaEngine,
    SamplingParams,
    Token,
    demo_model_path,
    generate,
)
from ds4tw._engine.interface import BackendLost, LoadAborted
from ds4tw._engine.process import ProcessEngine, Recipe
from ds4tw._engine.scripted import ScriptedEngine

KW: dict[str, Any] = dict(n_ctx=2048, n_batch=1024, n_threads=2)


def llama_in_child(**kw: Any) -> ProcessEngine:
    path = demo_model_path()
    assert path is not None
    args = dict(KW, **kw)
    return ProcessEngine(LlamaEngine(path, **args), Recipe(LlamaEngine, (path,), args))


def texts(engine: Any, prompt: list[int], **params: Any) -> bytes:
    p = SamplingParams(**dict(dict(max_tokens=24, temperature=0), **params))
    return b"".join(e.piece for e in generate(engine, prompt, p) if isinstance(e, Token))


@pytest.fixture(scope="module")
def local() -> Iterator[LlamaEngine]:
    path = demo_model_path()
    assert path is not None
    e = LlamaEngine(path, **KW)
    e.load()
    yield e
    e.close()


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessEngine]:
    e = llama_in_child()
    e.load()
    yield e
    e.close()


def chat(engine: Any, text: str) -> list[int]:
    prompt = engine.apply_chat_template([{"role": "user", "content": text}])
    return list(engine.tokenize(prompt.text, add_bos=False))


def test_the_same_greedy_tokens_as_the_model_in_this_process(
    local: LlamaEngine, child: ProcessEngine
) -> None:
    assert child.pid is not None and child.pid != os.getpid()
    for question in ("What is the capital of France?", "Name three rivers."):
        prompt = chat(local, question)
        assert chat(child, question) == prompt  # the prompt side is here, the same
        assert texts(child, prompt, max_tokens=12) == texts(local, prompt, max_tokens=12)
    # What llama.cpp took of the settings comes back from the child.
    assert child.settings["layers"] == local.settings["layers"]
    assert child.memory().measured and child.memory().weights == local.memory().weights


def test_a_grammar_trigger_guard_is_asked_here_each_step(
    local: LlamaEngine, child: ProcessEngine
) -> None:
    prompt = chat(local, "What is the capital of France?")
    free = texts(local, prompt, max_tokens=40)
    assert b"Nation" in free
    asked = []

    def armed() -> bool:
        asked.append(1)
        return on

    lazy = Grammar(
        'root ::= "Nation" " is number " [0-9] [0-9] "."', triggers=("Nation",), armed=armed
    )
    on = False
    assert texts(child, prompt, max_tokens=40, grammar=lazy) == free  # disarmed: free
    assert asked
    on = True
    constrained = texts(child, prompt, max_tokens=40, grammar=lazy)
    assert constrained.endswith(b".") and b"is number" in constrained
    assert constrained == texts(local, prompt, max_tokens=40, grammar=lazy)


def test_a_grammar_that_does_not_parse_fails_the_open_here(child: ProcessEngine) -> None:
    with pytest.raises(ValueError):
        child.open([1, 2, 3], SamplingParams(grammar=Grammar("root ::= (")))
    # The child goes on.
    assert texts(child, chat(child, "Hi"), max_tokens=3)


def test_the_abort_flag_stops_a_prefill_batch_inside_the_child(
    local: LlamaEngine, child: ProcessEngine
) -> None:
    # Two prompts of 300 tokens that share nothing but BOS: each is one
    # prefill batch, and the second is not cached by the first.
    timed = child.tokenize(" the tide came in over the flats" * 50)[:300]
    stopped = child.tokenize(" a wind blew across the dunes at dusk" * 50)[:300]
    t = time.perf_counter()
    assert texts(child, timed, max_tokens=1)
    batch_s = time.perf_counter() - t
    flag = AbortFlag()
    gen = generate(child, stopped, SamplingParams(max_tokens=4, temperature=0), flag)
    timer = threading.Timer(0.05, flag.set)
    t = time.perf_counter()
    timer.start()
    with pytest.raises(Aborted):
        next(gen)
    aborted_s = time.perf_counter() - t
    timer.join()
    gen.close()
    # Stopped inside the batch (the bound is relative to the batch itself).
    assert aborted_s < 0.5 * batch_s, (aborted_s, batch_s)
    # Nothing of the aborted batch is left behind to spoil the next run.
    assert texts(child, stopped, max_tokens=4) == texts(local, stopped, max_tokens=4)


def test_a_child_killed_mid_step_is_a_lost_backend_and_loads_again() -> None:
    engine = llama_in_child()
    engine.load()
    try:
        prompt = chat(engine, "Tell me a long story about the sea.")
        want = texts(engine, prompt, max_tokens=8)
        gen = generate(engine, prompt, SamplingParams(max_tokens=200, temperature=0))
        next(gen)
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(BackendLost, match="SIGKILL"):
            for _ in gen:
                pass
        assert not engine.loaded and engine.pid is None
        # The parent's side is clean: the same engine loads a new child.
        engine.load()
        assert texts(engine, prompt, max_tokens=8) == want
    finally:
        engine.close()


def test_the_loss_names_what_diagnose_found() -> None:
    engine = ProcessEngine(
        ScriptedEngine(["a b c d e f g h"]),
        Recipe(ScriptedEngine, (["a b c d e f g h"],), {"tps": 20}),
        diagnose=lambda: "RPC worker 127.0.0.1:9 is down (connection refused)",
    )
    engine.load()
    try:
        gen = generate(engine, [1, 2, 3], SamplingParams(max_tokens=8))
        next(gen)
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGABRT)
        with pytest.raises(BackendLost) as lost:
            list(gen)
        assert str(lost.value).startswith("RPC worker 127.0.0.1:9 is down")
        assert "SIGABRT" in str(lost.value)
    finally:
        engine.close()


def test_a_step_past_its_timeout_kills_the_child() -> None:
    # One prefill step of 300 tokens at 100 tokens/s: 3 s, against 0.5 s.
    engine = ProcessEngine(
        ScriptedEngine(),
        Recipe(ScriptedEngine, (), {"prefill_tps": 100, "n_batch": 512}),
        step_timeout=0.5,
    )
    engine.load()
    pid = engine.pid
    assert pid is not None
    t = time.perf_counter()
    with pytest.raises(BackendLost, match=r"no answer to a step in 0\.5 s"):
        list(generate(engine, list(range(300)), SamplingParams(max_tokens=2)))
    assert time.perf_counter() - t < 2.5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_load_silent_past_the_timeout_kills_the_child() -> None:
    # Ten load steps 0.3 s apart are never silent for 1 s: the load goes
    # through; one step of 3 s is, and is cut off.
    slow = ProcessEngine(
        ScriptedEngine(), Recipe(ScriptedEngine, (), {"load_steps": 10, "load_seconds": 3})
    )
    slow.step_timeout = 1.0
    slow.load()
    slow.close()
    hung = ProcessEngine(
        ScriptedEngine(), Recipe(ScriptedEngine, (), {"load_steps": 1, "load_seconds": 3})
    )
    hung.step_timeout = 1.0
    with pytest.raises(BackendLost, match=r"no answer to a load in 1 s"):
        hung.load()
    assert not hung.loaded


def test_a_release_after_the_child_died_leaves_the_loss_to_the_next_step() -> None:
    engine = ProcessEngine(ScriptedEngine(), Recipe(ScriptedEngine, (), {"tps": 50}))
    engine.load()
    seq = engine.open([1, 2, 3], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    time.sleep(0.2)
    engine.release(seq)  # no exception: a release ends a request
    with pytest.raises(BackendLost, match="SIGKILL"):
        engine.step()
    engine.close()


def test_load_progress_comes_from_the_child_and_can_stop_it() -> None:
    recipe = Recipe(ScriptedEngine, (), {"load_steps": 5})
    engine = ProcessEngine(ScriptedEngine(), recipe)
    seen: list[float] = []
    engine.load(lambda f: seen.append(f) or True)
    assert seen == [0.2, 0.4, 0.6, 0.8, 1.0]
    engine.close()
    seen.clear()
    with pytest.raises(LoadAborted):
        engine.load(lambda f: seen.append(f) or f < 0.4)
    assert seen == [0.2, 0.4] and not engine.loaded
    engine.load()
    assert texts(engine, [1, 2], max_tokens=3)
    engine.close()


def test_the_child_outlives_a_stop_signal_meant_for_the_server() -> None:
    """
    systemd's stop (and a terminal's ^C) signals every process of the
    server: the child must let the server's drain finish its requests.
    """
    engine = ProcessEngine(ScriptedEngine(["a b c"]), Recipe(ScriptedEngine, (["a b c"],)))
    engine.load()
    try:
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGTERM)
        os.kill(engine.pid, signal.SIGINT)
        assert texts(engine, [1, 2], max_tokens=3) == b"a b c"
    finally:
        engine.close()


def test_the_child_ends_when_the_parent_goes() -> None:
    engine = ProcessEngine(ScriptedEngine(), Recipe(ScriptedEngine))
    engine.load()
    proc = engine._proc
    assert proc is not None and engine._conn is not None
    # What the child sees when the server process dies: its pipe closes.
    engine._conn.close()
    assert proc.wait(10) == 0
    engine._conn = None
    engine._kill()
