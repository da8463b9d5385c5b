"""
ds4tw embedded in a host Klein app, in this process's reactor
(pytest-twisted), on a real listening port, with the real model thread:
the embedding path a library user takes, end to end.
"""

from __future__ import annotations

import json

import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

from ds4tw import LlamaEngine, Server, ServerConfig, demo_model_path


@pytest_twisted.ensureDeferred
async def test_stream_through_a_mounted_server_on_a_real_port() -> None:
    path = demo_model_path()
    assert path is not None
    llm = Server(LlamaEngine(path, n_ctx=1024, n_threads=2), ServerConfig(keepalive=1))
    llm.startService()
    host = Klein()

    @host.route("/llm/", branch=True)
    def mount(request: object) -> object:
        return llm.resource()

    port = reactor.listenTCP(0, Site(host.resource()), interface="127.0.0.1")
    try:
        await llm.worker.loaded
        base = f"http://127.0.0.1:{port.getHost().port}/llm"
        response = await treq.post(
            base + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            },
        )
        assert response.code == 200
        body = (await response.text()).split("\n\n")
        frames = [f.removeprefix("data: ") for f in body if f.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        await port.stopListening()
        await llm.stopService()
