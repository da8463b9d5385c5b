"""
Unit tests run with no reactor and no threads: a Clock for time,
SteppedThreads for the model thread, HTTPHarness for HTTP. Every test
here is synchronous and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.task import Clock

from ds4tw import Server, ServerConfig
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
    engine_kw = {k: config.pop(k) for k in ("n_ctx", "prefill_batch") if k in config}
    engine = ScriptedEngine(replies, **engine_kw)
    threads = SteppedThreads()
    clock = Clock()
    cfg = ServerConfig(**config)
    server = Server(engine, cfg, clock=clock, threads=threads)
    server.startService()
    return Rig(engine, threads, clock, server, HTTPHarness(server.resource(), clock), cfg)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


__all__ = ["Reply", "Rig", "make_rig"]
