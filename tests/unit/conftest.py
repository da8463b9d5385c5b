"""
Unit tests run with no reactor and no threads: a Clock for time,
SteppedThreads for the model thread, HTTPHarness for HTTP. Every test
here is synchronous and deterministic.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw import AbortFlag, Server, ServerConfig, StepResult
from ds4tw._engine.interface import Failed
from ds4tw.testing import HTTPHarness, Reply, ScriptedEngine, SteppedThreads


@dataclass
class Rig:
    engine: ScriptedEngine
    threads: SteppedThreads
    clock: Clock
    server: Server
    http: HTTPHarness
    config: ServerConfig = field(default_factory=ServerConfig)

    def chat(self, content: str = "hi", **kw: Any) -> Any:
        payload = {"model": "scripted", "messages": [{"role": "user", "content": content}], **kw}
        return self.http.post("/v1/chat/completions", payload)

    def stream(self, content: str = "hi", **kw: Any) -> Any:
        return self.chat(content, stream=True, **kw)


def make_rig(replies: Any = ("Hello there friend.",), **config: Any) -> Rig:
    engine_kw = {
        k: config.pop(k)
        for k in (
            "n_ctx",
            "n_batch",
            "chat_template",
            "slots",
            "prefix_cache",
            "n_batch_decoding",
            "prompt_cache",
        )
        if k in config
    }
    engine = ScriptedEngine(replies, **engine_kw)
    threads = SteppedThreads()
    clock = Clock()
    cfg = ServerConfig(**config)
    server = Server(engine, cfg, clock=clock, threads=threads)
    server.startService()
    return Rig(engine, threads, clock, server, HTTPHarness(server.resource(), clock), cfg)


def fail_every_step(rig: Rig, message: str = "the GPU caught fire") -> None:
    """
    From now on each engine step runs, but every sequence in it fails with
    C{RuntimeError(message)}, as a sampler error would.
    """
    step = rig.engine.step

    def broken(abort: AbortFlag | None = None) -> StepResult:
        result = step(abort)
        error = RuntimeError(message)
        return replace(result, events=tuple((seq, Failed(error)) for seq in result.sequences))

    rig.engine.step = broken  # type: ignore[method-assign]


@pytest.fixture
def rig() -> Rig:
    return make_rig()


@pytest.fixture(autouse=True)
def no_logged_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """
    Fail any test during which something logged a failure, including an
    unhandled error in a Deferred (flushed by the gc.collect()): a swallowed
    AlreadyCalledError once stopped the queue without failing a test.
    """
    errors: list[Any] = []

    def observe(event: Any) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)
    if request.node.get_closest_marker("logs_engine_errors"):
        # A job's failure, or a model's failed load, logged with its traceback.
        engine = ("ds4tw._runtime.joblog", "ds4tw._runtime.runner")
        errors = [e for e in errors if e.get("log_namespace") not in engine]
    if request.node.get_closest_marker("logs_unhandled_errors"):
        errors = [e for e in errors if e.get("log_namespace") != "ds4tw._api.routing"]
    assert not errors, [formatEvent(e) + str(e.get("log_failure", "")) for e in errors]


__all__ = ["Reply", "Rig", "make_rig"]


def pytest_collection_finish(session: pytest.Session) -> None:
    # What exists once every test is collected (modules, the SDKs' types,
    # hypothesis) is never garbage: frozen, each test's gc.collect() above
    # scans only what tests made (0.3 s a test before, on 1,600 tests).
    gc.freeze()
