"""
Several models in one server (ds4tw._runtime.fleet): names and aliases,
load on demand with keepalive frames while a model loads, the memory
budget with least-recently-used eviction that never cuts a request off,
arrival order across models, idle unload, a load stopped when its last
client leaves, and /v1/models, /health and /metrics per model. Loads are
held in the stepped model thread (SteppedThreads.hold_calls) so a test
sees every moment of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from ds4tw import Server, ServerConfig
from ds4tw._runtime.fleet import Model
from ds4tw.testing import Exchange, HTTPHarness, ScriptedEmbedder, ScriptedEngine, SteppedThreads

MIB = 2**20


@dataclass
class Fleet:
    threads: SteppedThreads
    clock: Clock
    server: Server
    http: HTTPHarness
    engines: dict[str, ScriptedEngine]

    def chat(self, model: str, stream: bool = True, content: str = "hi") -> Exchange:
        payload = {"model": model, "messages": [{"role": "user", "content": content}]}
        return self.http.post("/v1/chat/completions", {**payload, "stream": stream})

    def state(self, name: str) -> str:
        return self.server.fleet.models[name].runner.state.value

    def run(self) -> None:
        """Load what waits and step until every model is idle."""
        for _ in range(100):
            if self.threads.called:
                self.threads.release_calls()
            elif self.threads.busy:
                self.threads.run_until_idle()
            else:
                return
        raise AssertionError("never settled")


def make_fleet(
    *models: tuple[str, tuple[str, ...], float],
    budget_mb: float | None = None,
    idle_unload: float | None = None,
    default: str | None = None,
    load_steps: int = 4,
    **config: Any,
) -> Fleet:
    engines = {
        name: ScriptedEngine(
            (f"Reply from {name}.",), model_id=name, memory_mb=mb, load_steps=load_steps, tps=0
        )
        for name, _, mb in models
    }
    threads = SteppedThreads()
    threads.hold_calls = True
    clock = Clock()
    server = Server(
        models=[Model(engines[name], aliases=aliases) for name, aliases, _ in models],
        config=ServerConfig(keepalive=2.0, **config),
        default=default,
        memory_budget=None if budget_mb is None else int(budget_mb * MIB),
        idle_unload=idle_unload,
        clock=clock,
        threads=threads,
    )
    server.startService()
    return Fleet(threads, clock, server, HTTPHarness(server.resource(), clock), engines)


def content(exchange: Exchange) -> str:
    text = ""
    for chunk in exchange.data():
        if isinstance(chunk, dict) and chunk.get("choices"):
            text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_models_load_on_first_request_not_at_start() -> None:
    f = make_fleet(("big", ("claude-sonnet-*",), 10), ("small", ("claude-haiku-*",), 5))
    assert f.threads.called == []
    assert (f.state("big"), f.state("small")) == ("unloaded", "unloaded")
    # The server is up before any model is: models load on demand.
    assert f.http.get("/health").status == 200
    r = f.chat("claude-haiku-4-5-20251001")
    assert (f.state("big"), f.state("small")) == ("unloaded", "loading")
    f.run()
    assert (f.state("big"), f.state("small")) == ("unloaded", "ready")
    assert content(r) == "Reply from small."
    assert f.engines["small"].loaded and not f.engines["big"].loaded


def test_names_exact_then_alias_then_glob_in_order_then_default() -> None:
    f = make_fleet(
        ("big", ("claude-*", "gpt-4o"), 1),
        ("small", ("claude-haiku-*", "haiku"), 1),
        default="small",
    )
    find = f.server.fleet.find
    assert find("big").name == "big"  # type: ignore[union-attr]
    assert find("haiku").name == "small"  # type: ignore[union-attr]
    # The first model whose glob matches wins: big's claude-* comes first.
    assert find("claude-haiku-4-5").name == "big"  # type: ignore[union-attr]
    assert find("gpt-4o").name == "big"  # type: ignore[union-attr]
    assert find("llama3").name == "small"  # type: ignore[union-attr]
    assert find("llama3", fallback=False) is None


def test_an_unknown_model_is_a_404_in_each_dialect_shape() -> None:
    f = make_fleet(("big", ("claude-sonnet-*",), 1))
    r = f.chat("gpt-5", stream=False)
    assert r.status == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"
    m = f.http.post(
        "/v1/messages",
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert m.status == 404
    assert m.json()["type"] == "error"
    assert m.json()["error"]["type"] == "not_found_error"
    assert "claude-haiku-4-5" in m.json()["error"]["message"]
    # Nothing loaded for a name nobody serves.
    assert f.state("big") == "unloaded" and f.threads.called == []


def test_a_stream_waiting_for_its_model_hears_loading_comments() -> None:
    f = make_fleet(("big", (), 10), default="big")
    r = f.http.post(
        "/v1/chat/completions",
        {"model": "big", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-ds4tw-progress": "1"},
    )
    assert r.status == 200 and r.headers_sent
    f.clock.advance(2.0)
    f.clock.advance(2.0)
    assert r.comments()[-1].startswith("loading ")
    assert f.server.metrics.keepalives.labels("loading")._value.get() >= 2
    f.run()
    assert content(r) == "Reply from big."


def test_a_full_budget_evicts_the_least_recently_used_idle_model() -> None:
    f = make_fleet(("a", (), 40), ("b", (), 40), ("c", (), 40), budget_mb=100)
    for name in ("a", "b"):
        r = f.chat(name)
        f.run()
        assert content(r) == f"Reply from {name}."
        f.clock.advance(1)
    assert (f.state("a"), f.state("b"), f.state("c")) == ("ready", "ready", "unloaded")
    # a was used longest ago: it goes to make room for c.
    r = f.chat("c")
    assert f.state("a") == "unloading"
    f.run()
    assert content(r) == "Reply from c."
    assert (f.state("a"), f.state("b"), f.state("c")) == ("unloaded", "ready", "ready")
    assert f.server.fleet.models["a"].unloads == {"evicted": 1}
    assert f.server.fleet.used() == 80 * MIB


def test_a_running_request_is_never_cut_off_to_make_room() -> None:
    f = make_fleet(("a", (), 60), ("b", (), 60), budget_mb=100)
    ra = f.chat("a")
    f.threads.release_calls()
    f.threads.step()  # a's request is now prefilling
    assert f.state("a") == "ready"
    rb = f.chat("b")
    # b waits in its queue: a is busy, so it stays.
    assert (f.state("a"), f.state("b")) == ("ready", "unloaded")
    f.clock.advance(2.0)
    assert rb.comments() == ["loading"]
    f.threads.run_until_idle()
    assert content(ra) == "Reply from a."
    # a went idle: now it gives way, and b loads.
    assert f.state("a") == "unloading"
    f.run()
    assert content(rb) == "Reply from b."
    assert (f.state("a"), f.state("b")) == ("unloaded", "ready")


def test_requests_alternating_between_two_models_that_do_not_fit_are_all_whole() -> None:
    f = make_fleet(("a", (), 60), ("b", (), 60), budget_mb=100)
    streams = [(name, f.chat(name)) for name in ("a", "b", "a", "b", "a", "b")]
    f.run()
    for name, r in streams:
        assert content(r) == f"Reply from {name}."
        assert r.data()[-1] == "[DONE]"
    # Never both at once, and only swapped when idle.
    assert f.server.fleet.used() <= 100 * MIB


def test_models_load_in_the_order_their_first_request_arrived() -> None:
    f = make_fleet(("a", (), 60), ("b", (), 60), ("c", (), 30), budget_mb=100)
    ra = f.chat("a")
    f.threads.release_calls()
    f.threads.step()
    rb = f.chat("b")
    rc = f.chat("c")
    # c would fit beside a, but b asked first: c does not overtake it.
    assert (f.state("b"), f.state("c")) == ("unloaded", "unloaded")
    f.threads.run_until_idle()
    assert content(ra) == "Reply from a."
    f.threads.release_calls()  # a's unload
    assert f.state("b") == "loading"
    f.run()
    assert content(rb) == "Reply from b." and content(rc) == "Reply from c."


def test_the_last_client_leaving_stops_the_load() -> None:
    f = make_fleet(("a", (), 10), load_steps=5)
    r = f.chat("a")
    assert f.state("a") == "loading"
    r.disconnect()
    f.threads.release_calls()
    # The progress callback said stop: the engine never finished loading.
    assert f.state("a") == "unloaded"
    assert not f.engines["a"].loaded
    assert f.server.fleet.models["a"].worker.loads == 0
    # The next request loads it again.
    r2 = f.chat("a")
    f.run()
    assert content(r2) == "Reply from a."


def test_a_load_goes_on_while_another_client_still_waits_for_it() -> None:
    f = make_fleet(("a", (), 10))
    gone, stays = f.chat("a"), f.chat("a")
    gone.disconnect()
    f.run()
    assert content(stays) == "Reply from a."


def test_a_model_unused_for_idle_unload_seconds_is_unloaded() -> None:
    f = make_fleet(("a", (), 10), idle_unload=60)
    r = f.chat("a")
    f.run()
    assert content(r) == "Reply from a."
    f.clock.advance(59)
    assert f.state("a") == "ready"
    f.clock.advance(1)
    assert f.state("a") == "unloading"
    f.threads.release_calls()
    assert f.state("a") == "unloaded"
    assert f.server.fleet.models["a"].unloads == {"idle": 1}
    r2 = f.chat("a")
    f.run()
    assert content(r2) == "Reply from a."
    assert f.server.fleet.models["a"].worker.loads == 2


def test_idle_unload_waits_for_the_last_use() -> None:
    f = make_fleet(("a", (), 10), idle_unload=60)
    f.chat("a")
    f.run()
    f.clock.advance(50)
    f.chat("a")
    f.run()
    f.clock.advance(50)
    assert f.state("a") == "ready"  # used 50 s ago, not 100
    f.clock.advance(10)
    assert f.state("a") == "unloading"


def test_a_model_larger_than_the_budget_is_a_clear_503() -> None:
    f = make_fleet(("a", (), 10), ("huge", (), 500), budget_mb=100)
    r = f.chat("huge", stream=False)
    assert r.status == 503
    assert "needs 500 MiB" in r.json()["error"]["message"]
    assert "--models-memory-mb" in r.json()["error"]["message"]
    assert f.state("huge") == "unloaded"


def test_a_queue_past_its_bound_while_loading_is_a_503() -> None:
    f = make_fleet(("a", (), 10), max_queue=2)
    f.chat("a")
    f.chat("a")
    r = f.chat("a", stream=False)
    assert r.status == 503
    assert r.header("retry-after") is not None


@pytest.mark.logs_engine_errors
def test_a_failed_load_fails_its_waiting_requests_and_the_next_one_tries_again() -> None:
    f = make_fleet(("a", (), 10))
    engine = f.engines["a"]
    real_load = engine.load

    def broken(progress: Any = None) -> None:
        raise OSError("cannot map the file")

    engine.load = broken  # type: ignore[method-assign]
    r = f.chat("a", stream=False)
    f.threads.release_calls()
    assert r.status == 503
    assert "failed to load: cannot map the file" in r.json()["error"]["message"]
    engine.load = real_load  # type: ignore[method-assign]
    r2 = f.chat("a")
    f.run()
    assert content(r2) == "Reply from a."


def test_v1_models_lists_every_model_and_alias_and_whether_it_is_loaded() -> None:
    f = make_fleet(("big", ("claude-sonnet-*", "gpt-4o"), 1), ("small", ("haiku",), 1))
    f.chat("small")
    f.run()
    data = f.http.get("/v1/models").json()["data"]
    ids = [(m["id"], m["meta"]["loaded"], m["meta"].get("alias_of")) for m in data]
    assert ids == [
        ("big", False, None),
        ("gpt-4o", False, "big"),
        ("small", True, None),
        ("haiku", True, "small"),
    ]
    assert data[0]["meta"]["aliases"] == ["claude-sonnet-*", "gpt-4o"]
    one = f.http.get("/v1/models/claude-sonnet-4-5").json()
    assert (one["id"], one["meta"]["alias_of"]) == ("claude-sonnet-4-5", "big")
    assert f.http.get("/v1/models/nothing").status == 404


def test_health_and_metrics_say_each_models_state_and_memory() -> None:
    f = make_fleet(("a", (), 40), ("b", (), 30), budget_mb=100)
    f.chat("a")
    f.run()
    health = f.http.get("/health").json()
    by_name = {m["name"]: m for m in health["models"]}
    assert by_name["a"]["state"] == "ready" and by_name["b"]["state"] == "unloaded"
    assert by_name["a"]["memory"]["total_bytes"] == 40 * MIB
    assert health["memory"] == {"budget_bytes": 100 * MIB, "used_bytes": 40 * MIB}
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(f.http.get("/metrics").body.decode())
        for s in family.samples
    }
    assert metrics["ds4tw_model_loaded", (("model", "a"),)] == 1
    assert metrics["ds4tw_model_loaded", (("model", "b"),)] == 0
    assert metrics["ds4tw_model_memory_bytes", (("model", "a"),)] == 40 * MIB
    assert metrics["ds4tw_model_loads_total", (("model", "a"),)] == 1
    assert metrics["ds4tw_models_memory_budget_bytes", ()] == 100 * MIB


def test_two_loaded_models_take_turns_on_the_one_model_thread() -> None:
    f = make_fleet(("a", (), 1), ("b", (), 1))
    for name in ("a", "b"):
        f.engines[name].add_reply("one two three four five six")
    ra, rb = f.chat("a"), f.chat("b")
    f.threads.release_calls()
    # Both loaded; stepping alternates between their batch loops.
    seen = []
    for _ in range(6):
        f.threads.step()
        seen.append((len(f.engines["a"].steps), len(f.engines["b"].steps)))
    assert seen[-1][0] >= 2 and seen[-1][1] >= 2
    f.run()
    assert content(ra) and content(rb)


def test_the_log_line_names_the_model() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: Any) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        f = make_fleet(("a", ("alias-a",), 1))
        f.chat("alias-a")
        f.run()
    finally:
        globalLogPublisher.removeObserver(observe)
    done = [line for line in lines if " done: finish=" in line]
    assert done and "model=a " in done[-1]


def embedding_fleet(budget_mb: float | None = None) -> tuple[Fleet, ScriptedEmbedder]:
    embedder = ScriptedEmbedder("embed", memory_mb=30, n_ctx=1000, n_vocab=0x110000)
    threads = SteppedThreads()
    threads.hold_calls = True
    clock = Clock()
    chat = ScriptedEngine(("Reply from chat.",), model_id="chat", memory_mb=60)
    server = Server(
        models=[
            Model(chat, aliases=("claude-*",)),
            Model(embedder=embedder, aliases=("text-embedding-*",)),
        ],
        config=ServerConfig(keepalive=2.0),
        memory_budget=None if budget_mb is None else int(budget_mb * MIB),
        clock=clock,
        threads=threads,
    )
    server.startService()
    f = Fleet(threads, clock, server, HTTPHarness(server.resource(), clock), {"chat": chat})
    return f, embedder


def test_an_embedding_model_loads_on_demand_and_answers_by_alias() -> None:
    f, embedder = embedding_fleet()
    assert f.server.fleet.models["embed"].kind == "embedding"
    r = f.http.post("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "bc"]})
    assert f.state("embed") == "loading"
    f.run()
    body = r.json()
    assert r.status == 200, body
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["model"] == "text-embedding-3-small"
    tokens = len(embedder.tokenize("a")) + len(embedder.tokenize("bc"))
    assert body["usage"]["prompt_tokens"] == tokens > 0
    # The chat model was never loaded for it.
    assert f.state("chat") == "unloaded"
    cards = {c["id"]: c["meta"] for c in f.http.get("/v1/models").json()["data"]}
    assert cards["embed"]["kind"] == "embedding" and cards["embed"]["loaded"]


def test_each_kind_of_request_is_refused_by_the_other_kind_of_model() -> None:
    f, _ = embedding_fleet()
    chat = f.chat("embed", stream=False)
    assert chat.status == 400
    assert "embedding model" in chat.json()["error"]["message"]
    emb = f.http.post("/v1/embeddings", {"model": "claude-sonnet-4-5", "input": "x"})
    assert emb.status == 400
    assert "does not serve embeddings" in emb.json()["error"]["message"]
    assert f.http.post("/v1/embeddings", {"model": "nothing", "input": "x"}).status == 404


def test_the_budget_counts_an_embedder_and_evicts_it_when_idle() -> None:
    f, _ = embedding_fleet(budget_mb=80)
    r = f.http.post("/v1/embeddings", {"model": "embed", "input": "hello"})
    f.run()
    assert r.status == 200
    assert f.server.fleet.used() == 30 * MIB
    c = f.chat("claude-sonnet-4-5")
    # 30 + 60 > 80: the idle embedder goes first.
    assert f.state("embed") == "unloading"
    f.run()
    assert content(c) == "Reply from chat."
    assert (f.state("embed"), f.state("chat")) == ("unloaded", "ready")
    assert f.server.fleet.models["embed"].unloads == {"evicted": 1}


def test_a_chat_model_can_serve_embeddings_too() -> None:
    threads = SteppedThreads()
    clock = Clock()
    chat = ScriptedEngine(("hi",), model_id="both")
    embedder = ScriptedEmbedder("both", n_ctx=1000, n_vocab=0x110000)
    server = Server(
        models=[Model(chat, embedder=embedder)], preload=True, clock=clock, threads=threads
    )
    server.startService()
    http = HTTPHarness(server.resource(), clock)
    # Loaded at start, serving every name, as --model always has.
    assert server.worker.ready
    r = http.post("/v1/embeddings", {"model": "anything", "input": "abc"})
    threads.run_until_idle()
    assert r.status == 200 and len(r.json()["data"]) == 1
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"][0]["embeddings"] == {"state": "ready", "loads": 1}
