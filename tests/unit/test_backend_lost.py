"""
A model lost under its requests (L{ds4tw.BackendLost}: its process died,
an RPC worker went away): the running requests end with their dialect's
error, the queued ones too, C{/health} and admission say 503 with why,
and the model is loaded again with back-off (1, 2, 4 ... 30 s) until it
comes back. The scripted engine stands in for the child process
(tests/integration/test_process_engine.py and test_rpc_split.py run the
real ones).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from ds4tw import AbortFlag, Server, ServerConfig, StepResult
from ds4tw._engine.interface import BackendLost, LoadProgress
from ds4tw.testing import HTTPHarness, ScriptedEngine, SteppedThreads

from .conftest import Rig, make_rig

WHY = "RPC worker 127.0.0.1:50053 is down (connection refused)"


class Loss:
    """Makes C{rig}'s engine lose its model at will, and fail reloads."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.lost = False
        #: Reloads that fail before one works (the worker still down).
        self.failing_loads = 0
        self.load_attempts = 0
        engine = rig.engine
        step, open_, load = engine.step, engine.open, engine.load

        def lost_step(abort: AbortFlag | None = None) -> StepResult:
            if self.lost:
                raise BackendLost(WHY)
            return step(abort)

        def lost_open(prompt: Any, params: Any) -> int:
            if self.lost:
                raise BackendLost(WHY)
            return open_(prompt, params)

        def reload(progress: LoadProgress | None = None) -> None:
            self.load_attempts += 1
            if self.failing_loads:
                self.failing_loads -= 1
                raise ConnectionError(WHY)
            self.lost = False
            engine.close()
            load(progress)

        engine.step = lost_step  # type: ignore[method-assign]
        engine.open = lost_open  # type: ignore[method-assign]
        engine.load = reload  # type: ignore[method-assign]


def lose(rig: Rig) -> Loss:
    return Loss(rig)


@pytest.mark.logs_engine_errors
def test_a_lost_model_ends_the_stream_with_an_error_frame_and_health_goes_503() -> None:
    rig = make_rig(["a b c d e f"])
    loss = lose(rig)
    ex = rig.stream()
    rig.threads.step(3)
    assert ex.data()[1]["choices"][0]["delta"]["content"] == "a"
    loss.lost = True
    rig.threads.run_until_idle()
    events = ex.events()
    assert events[-2][0] == "error" and events[-1] == (None, "[DONE]")
    assert WHY in events[-2][1] and "backend_lost" in events[-2][1]
    assert ex.finished
    health = rig.http.get("/health")
    assert health.status == 503 and health.header("retry-after") == "5"
    body = health.json()
    assert body["status"] == "error"
    model = body["models"][0]
    assert model["losses"] == 1 and WHY in model["load_error"]
    assert model["reload_in_seconds"] == 1.0
    metrics = rig.http.get("/metrics").body.decode()
    assert 'ds4tw_model_losses_total{model="scripted"} 1.0' in metrics
    # The next request is refused before anything is sent, saying why.
    refused = rig.chat()
    assert refused.status == 503 and refused.header("retry-after") == "5"
    assert WHY in refused.json()["error"]["message"]
    assert "reloaded" in refused.json()["error"]["message"]


@pytest.mark.logs_engine_errors
def test_the_lost_model_is_reloaded_with_back_off_until_it_comes_back() -> None:
    rig = make_rig(["fine again"])
    loss = lose(rig)
    rig.chat()
    rig.threads.run_until_idle()
    loss.lost = True
    loss.failing_loads = 3
    ex = rig.chat()
    rig.threads.run_until_idle()
    assert ex.status == 503 and ex.json()["error"]["code"] == "backend_lost"
    worker = rig.server.worker
    waits = []
    for _ in range(4):
        wait = worker.reload_in
        assert wait is not None
        waits.append(wait)
        before = loss.load_attempts
        rig.clock.advance(wait - 0.01)
        assert loss.load_attempts == before  # not a moment early
        rig.clock.advance(0.01)
        assert loss.load_attempts == before + 1
        if worker.ready:
            break
        assert rig.http.get("/health").status == 503
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert worker.ready and worker.reload_in is None
    assert rig.http.get("/health").status == 200
    again = rig.chat()
    rig.threads.run_until_idle()
    assert again.status == 200
    assert again.json()["choices"][0]["message"]["content"] == "fine again"


@pytest.mark.logs_engine_errors
def test_the_back_off_stops_doubling_at_its_cap() -> None:
    rig = make_rig()
    loss = lose(rig)
    loss.lost = True
    loss.failing_loads = 100
    rig.chat()
    rig.threads.run_until_idle()
    worker = rig.server.worker
    seen = []
    for _ in range(8):
        wait = worker.reload_in
        assert wait is not None
        seen.append(wait)
        rig.clock.advance(wait)
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


@pytest.mark.logs_engine_errors
def test_queued_requests_fail_with_the_loss_too() -> None:
    rig = make_rig(["a b c d e f"], slots=1)
    loss = lose(rig)
    running = rig.stream("first")
    rig.threads.step(2)
    queued = rig.chat("second")
    assert not queued.finished
    loss.lost = True
    rig.threads.run_until_idle()
    assert running.events()[-2][0] == "error"
    assert queued.status == 503
    assert WHY in queued.json()["error"]["message"]


@pytest.mark.logs_engine_errors
def test_anthropic_stream_gets_its_own_error_event() -> None:
    rig = make_rig(["a b c d e f"])
    loss = lose(rig)
    ex = rig.http.post(
        "/v1/messages",
        {
            "model": "scripted",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    rig.threads.step(3)
    loss.lost = True
    rig.threads.run_until_idle()
    name, data = ex.events()[-1]
    assert name == "error"
    assert WHY in data and '"type": "error"' in data.replace('":"', '": "')


@pytest.mark.logs_engine_errors
def test_a_shutdown_cancels_the_pending_reload() -> None:
    rig = make_rig()
    loss = lose(rig)
    loss.lost = True
    rig.chat()
    rig.threads.run_until_idle()
    assert rig.server.worker.reload_in == 1.0
    rig.server.stopService()
    attempts = loss.load_attempts
    rig.clock.advance(60)
    assert loss.load_attempts == attempts


def probed_rig(interval: float = 5.0) -> tuple[Rig, dict[str, Any]]:
    """A rig whose engine can be probed (as ProcessEngine over RPC workers)."""
    engine = ScriptedEngine(["a b c d e f"])
    state: dict[str, Any] = {"verdict": None, "probes": 0, "loads": 0}

    def probe() -> str | None:
        state["probes"] += 1
        return state["verdict"]  # type: ignore[no-any-return]

    load = engine.load

    def load_unless_gone(progress: LoadProgress | None = None) -> None:
        state["loads"] += 1
        if state["verdict"] is not None:
            raise ConnectionError(state["verdict"])
        load(progress)

    engine.probe = probe  # type: ignore[attr-defined]
    engine.probe_interval = interval  # type: ignore[attr-defined]
    engine.load = load_unless_gone  # type: ignore[method-assign]
    threads, clock = SteppedThreads(), Clock()
    server = Server(engine, ServerConfig(), clock=clock, threads=threads)
    server.startService()
    return Rig(engine, threads, clock, server, HTTPHarness(server.resource(), clock)), state


GONE = "RPC worker 127.0.0.1:50053: connection refused (the worker is gone)"


@pytest.mark.logs_engine_errors
def test_an_idle_probe_that_finds_a_worker_gone_is_a_loss() -> None:
    rig, state = probed_rig()
    rig.clock.advance(5)
    assert state["probes"] == 1
    assert rig.http.get("/health").status == 200
    # The worker dies between requests: the next probe sees it.
    state["verdict"] = GONE
    rig.clock.advance(5)
    health = rig.http.get("/health")
    assert health.status == 503
    model = health.json()["models"][0]
    assert model["losses"] == 1 and model["lost"] == GONE
    # Its process went with it (closed on the model thread), not left holding the others.
    assert not rig.engine.loaded and rig.engine.unloads == 1
    # No probe while it is out; reloads with back-off fail until it is back.
    probes = state["probes"]
    rig.clock.advance(1)
    assert state["loads"] == 2 and rig.http.get("/health").status == 503
    state["verdict"] = None
    rig.clock.advance(2)
    assert state["loads"] == 3 and rig.http.get("/health").status == 200
    assert state["probes"] == probes
    # Probing again once it is back.
    rig.clock.advance(5)
    assert state["probes"] == probes + 1


def test_no_probe_while_a_request_runs() -> None:
    rig, state = probed_rig()
    ex = rig.stream()
    rig.threads.step(2)
    rig.clock.advance(5)
    assert state["probes"] == 0  # a running step finds a lost backend by itself
    rig.threads.run_until_idle()
    assert ex.finished
    rig.clock.advance(5)
    assert state["probes"] == 1


def test_an_engine_without_probes_is_never_asked() -> None:
    rig, state = probed_rig(interval=0)
    rig.clock.advance(60)
    assert state["probes"] == 0
