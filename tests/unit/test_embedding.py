"""
ds4tw mounted under a branch route of someone else's Klein app, as the
README shows, streaming through the mount.
"""

from __future__ import annotations

from klein import Klein
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest

from ds4tw import Server, ServerConfig
from ds4tw.testing import HTTPHarness, ScriptedEngine, SteppedThreads


def test_stream_through_a_klein_branch_mount() -> None:
    clock, threads = Clock(), SteppedThreads()
    llm = Server(
        ScriptedEngine(["mounted and streaming"]),
        ServerConfig(keepalive=5),
        clock=clock,
        threads=threads,
    )
    llm.startService()
    outer = Klein()

    @outer.route("/")
    def home(request: IRequest) -> str:
        return "the host app"

    @outer.route("/llm/", branch=True)
    def mount(request: IRequest) -> object:
        return llm.resource()

    http = HTTPHarness(outer.resource(), clock)
    assert http.get("/").body == b"the host app"
    assert http.get("/llm/v1/models").json()["data"][0]["id"] == "scripted"
    ex = http.post(
        "/llm/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    clock.advance(5)
    assert ex.comments() == ["queued"]
    threads.run_until_idle()
    chunks = ex.data()
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "mounted and streaming"
    bad = http.post("/llm/v1/chat/completions", b"nope")
    assert bad.status == 400 and "error" in bad.json()
