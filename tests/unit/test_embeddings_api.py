"""
C{POST /v1/embeddings} on the scripted embedder: every input shape, both
encodings, the refusals (dimensions, empty inputs, too long, bad token
ids, a model that serves no embeddings), usage, and the worker under it:
inputs of several requests batched into one C{embed} call, a cancel
while queued (never embedded) and while its batch runs (the abort flag
stops it), a full queue, the drain.

The app here is a bare Klein app with only this route (the server wires
it beside the dialects), driven through twisted.web's real HTTP parser in
memory; the model thread is SteppedThreads, so "before a step" and
"during a step" are exact. What it cannot show: real threads racing (the
lock between the reactor and the model thread; the integration test runs
the real model on a real thread).
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from klein import Klein
from twisted.internet.task import Clock

from ds4tw import ServerConfig
from ds4tw._api.openai.embeddings import (
    EmbeddingTarget,
    WorkerTarget,
    add_routes,
    encode,
)
from ds4tw._api.openai.render import error_body
from ds4tw._api.routing import api
from ds4tw._engine.embed import ScriptedEmbedder
from ds4tw._errors import APIError
from ds4tw._runtime.embedding import BatchStats, EmbeddingWorker
from ds4tw.testing import Exchange, HTTPHarness, SteppedThreads

PATH = "/v1/embeddings"


@dataclass
class Models:
    """An L{ds4tw._api.openai.embeddings.Embedders}: one embedder, one chat model."""

    target: WorkerTarget
    chat: tuple[str, ...] = ("chat-model",)

    async def embedding_target(self, model: str | None) -> EmbeddingTarget:
        if model is None or model in (self.target.model_id, "text-embedding-3-small"):
            return self.target
        if model in self.chat:
            raise APIError(
                400,
                f"the model {model} is a chat model; it serves no embeddings",
                param="model",
                code="model_not_embedding",
            )
        raise APIError(404, f"The model '{model}' does not exist", code="model_not_found")


@dataclass
class Host:
    """What routing.api and add_routes need of a server."""

    app: Klein = field(default_factory=Klein)
    config: ServerConfig = field(default_factory=ServerConfig)

    def cors(self, request: object) -> None:
        pass

    def authorize(self, request: object) -> None:
        pass


@dataclass
class Rig:
    embedder: ScriptedEmbedder
    threads: SteppedThreads
    clock: Clock
    worker: EmbeddingWorker
    http: HTTPHarness
    batches: list[BatchStats]

    def post(self, **payload: Any) -> Exchange:
        return self.http.post(PATH, {"model": "scripted-embed", **payload})

    def tokens(self, text: str) -> list[int]:
        return self.embedder.tokenize(text)


def make_rig(max_queue: int = 16, drain_timeout: float = 30.0, **embedder: Any) -> Rig:
    emb = ScriptedEmbedder(**embedder)
    threads = SteppedThreads()
    clock = Clock()
    worker = EmbeddingWorker(emb, threads, max_queue, drain_timeout=drain_timeout, clock=clock)
    worker.startService()
    host = Host()
    add_routes(host, api(host, error_body), Models(WorkerTarget(worker)))  # type: ignore[arg-type]
    batches: list[BatchStats] = []
    worker.batch_observers.append(batches.append)
    return Rig(emb, threads, clock, worker, HTTPHarness(host.app.resource(), clock), batches)


def close_to(a: list[float], b: list[float], tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True)
    )


def error(ex: Exchange) -> dict[str, Any]:
    body: dict[str, Any] = ex.json()["error"]
    return body


# -- shapes ---------------------------------------------------------------


def test_a_string_gives_one_vector_in_openai_shape() -> None:
    rig = make_rig()
    ex = rig.post(input="the cat sat")
    rig.threads.run_until_idle()
    assert ex.status == 200
    body = ex.json()
    assert body["object"] == "list"
    assert body["model"] == "scripted-embed"
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert close_to(item["embedding"], rig.embedder.vector(rig.tokens("the cat sat")))
    assert math.isclose(math.fsum(v * v for v in item["embedding"]), 1.0)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_a_list_of_strings_gives_vectors_in_order_and_counts_every_token() -> None:
    rig = make_rig()
    texts = ["a b", "c d e", "f"]
    ex = rig.post(input=texts)
    rig.threads.run_until_idle()
    body = ex.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for d, text in zip(body["data"], texts, strict=True):
        assert close_to(d["embedding"], rig.embedder.vector(rig.tokens(text)))
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


def test_one_token_array() -> None:
    rig = make_rig()
    ex = rig.post(input=[5, 6, 7])
    rig.threads.run_until_idle()
    [item] = ex.json()["data"]
    assert close_to(item["embedding"], rig.embedder.vector([5, 6, 7]))
    assert rig.embedder.calls == [[[5, 6, 7]]]
    assert ex.json()["usage"]["prompt_tokens"] == 3


def test_a_list_of_token_arrays() -> None:
    rig = make_rig()
    ex = rig.post(input=[[1, 2], [3], [4, 5, 6]])
    rig.threads.run_until_idle()
    data = ex.json()["data"]
    assert [len(d["embedding"]) for d in data] == [8, 8, 8]
    assert close_to(data[2]["embedding"], rig.embedder.vector([4, 5, 6]))
    assert ex.json()["usage"]["total_tokens"] == 6


def test_base64_is_little_endian_float32_of_the_same_vector() -> None:
    rig = make_rig()
    floats = rig.post(input=["x y", "z"])
    b64 = rig.post(input=["x y", "z"], encoding_format="base64")
    rig.threads.run_until_idle()
    for f, b in zip(floats.json()["data"], b64.json()["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert close_to(decoded, f["embedding"], 1e-7)
    assert encode([1.0, -2.5], "base64") == base64.b64encode(b"\x00\x00\x80?\x00\x00 \xc0").decode()


def test_the_model_named_is_echoed_and_user_is_accepted() -> None:
    rig = make_rig()
    ex = rig.post(input="a", model="text-embedding-3-small", user="someone", extra="ignored")
    rig.threads.run_until_idle()
    assert ex.status == 200
    assert ex.json()["model"] == "text-embedding-3-small"


# -- refusals -------------------------------------------------------------


def test_dimensions_is_refused_unless_it_is_the_models_own_size() -> None:
    rig = make_rig()
    ex = rig.post(input="a", dimensions=4)
    assert ex.status == 400
    e = error(ex)
    assert e["type"] == "invalid_request_error"
    assert e["param"] == "dimensions"
    assert "does not support" in e["message"] and "8 dimensions" in e["message"]
    same = rig.post(input="a", dimensions=8)
    rig.threads.run_until_idle()
    assert same.status == 200
    assert rig.embedder.calls == [[rig.tokens("a")]]


@pytest.mark.parametrize(
    "value",
    ["", [], [""], ["a", ""], [[]], [[1], []], None, [1, "a"], [1.5], [True], {"a": 1}],
)
def test_empty_or_malformed_input_is_a_400_before_anything_runs(value: Any) -> None:
    rig = make_rig()
    ex = rig.post(input=value)
    assert ex.status == 400, ex.body
    assert error(ex)["type"] == "invalid_request_error"
    assert rig.worker.queue_depth == 0 and not rig.embedder.calls


def test_missing_input_and_bad_encoding_format() -> None:
    rig = make_rig()
    assert rig.http.post(PATH, {"model": "scripted-embed"}).status == 400
    bad = rig.post(input="a", encoding_format="float16")
    assert bad.status == 400 and error(bad)["param"] == "encoding_format"


def test_whitespace_that_makes_no_tokens_is_refused() -> None:
    rig = make_rig()
    ex = rig.post(input=["a", "   "])
    assert ex.status == 400
    assert error(ex)["message"] == "input[1] has no tokens"


def test_an_input_longer_than_the_model_embeds_is_a_400_naming_it() -> None:
    rig = make_rig(n_ctx=4)
    ex = rig.post(input=["a", "a b c d e"])
    assert ex.status == 400
    e = error(ex)
    assert e["code"] == "context_length_exceeded"
    assert e["message"].startswith("input[1] is 5 tokens long")
    assert "at most 4 tokens" in e["message"]
    arrays = rig.post(input=[[1, 2, 3, 4, 5]])
    assert error(arrays)["message"].startswith("input[0] is 5 tokens long")
    assert not rig.embedder.calls


@pytest.mark.parametrize("tokens", [[1, 1000], [-1, 2], [[3], [5000]]])
def test_token_ids_outside_the_vocabulary_are_a_400(tokens: list[Any]) -> None:
    rig = make_rig(n_vocab=1000)
    ex = rig.post(input=tokens)
    assert ex.status == 400
    assert "vocabulary (0 to 999)" in error(ex)["message"]
    assert not rig.embedder.calls


def test_a_chat_model_is_a_400_and_an_unknown_model_a_404() -> None:
    rig = make_rig()
    chat = rig.post(input="a", model="chat-model")
    assert chat.status == 400 and "serves no embeddings" in error(chat)["message"]
    unknown = rig.post(input="a", model="nope")
    assert unknown.status == 404 and error(unknown)["code"] == "model_not_found"
    assert rig.worker.queue_depth == 0


def test_a_full_queue_is_a_503_with_retry_after() -> None:
    rig = make_rig(max_queue=2)
    first, second = rig.post(input="a"), rig.post(input="b")
    third = rig.post(input="c")
    assert third.status == 503
    assert third.header("retry-after") == "1"
    assert error(third)["code"] == "server_busy"
    rig.threads.run_until_idle()
    assert first.status == second.status == 200


def test_a_stopped_worker_is_a_503() -> None:
    rig = make_rig(drain_timeout=0)
    rig.worker.stopService()
    ex = rig.post(input="a")
    assert ex.status == 503
    assert error(ex)["code"] == "server_shutting_down"


# -- batching -------------------------------------------------------------


def test_two_requests_submitted_before_a_step_share_one_embed_call() -> None:
    rig = make_rig()
    a = rig.post(input=["one", "two"])
    b = rig.post(input="three")
    assert rig.embedder.calls == []
    rig.threads.step()
    assert rig.embedder.inputs_per_call == [3]
    assert a.status == b.status == 200
    assert close_to(b.json()["data"][0]["embedding"], rig.embedder.vector(rig.tokens("three")))
    assert rig.batches == [BatchStats(3, 3, 2, rig.batches[0].seconds)]


def test_a_batch_holds_at_most_n_seq_inputs_and_n_batch_tokens_in_fifo_order() -> None:
    rig = make_rig(n_seq=3, n_ctx=4, n_batch=6)
    first = rig.post(input=["a b c", "d e", "f"])  # 3 inputs, 6 tokens: one batch
    second = rig.post(input=["g h i j", "k", "l m"])  # 4 + 1 + 2: two batches
    rig.threads.run_until_idle()
    assert [[len(x) for x in c] for c in rig.embedder.calls] == [[3, 2, 1], [4, 1], [2]]
    assert first.status == second.status == 200
    got = [d["embedding"] for d in second.json()["data"]]
    want = [rig.embedder.vector(rig.tokens(t)) for t in ["g h i j", "k", "l m"]]
    assert all(close_to(g, w) for g, w in zip(got, want, strict=True))


def test_a_request_that_arrives_while_a_batch_runs_goes_into_the_next() -> None:
    rig = make_rig()
    late: list[Exchange] = []
    rig.embedder.embed_hook = lambda: late.append(rig.post(input="late")) if not late else None
    early = rig.post(input=["x", "y"])
    rig.threads.run_until_idle()
    assert rig.embedder.inputs_per_call == [2, 1]
    assert early.status == late[0].status == 200


# -- cancel ---------------------------------------------------------------


def test_a_request_cancelled_while_queued_is_never_embedded() -> None:
    rig = make_rig()
    gone = rig.post(input=["lost", "words"])
    kept = rig.post(input="kept")
    gone.disconnect()
    assert rig.worker.queue_depth == 1
    rig.threads.run_until_idle()
    assert rig.embedder.calls == [[rig.tokens("kept")]]
    assert kept.status == 200
    assert rig.worker.idle


def test_a_batch_whose_every_request_is_cancelled_is_aborted_inside() -> None:
    rig = make_rig()
    gone = rig.post(input=["lost", "words"])
    rig.embedder.embed_hook = gone.disconnect  # the client leaves mid-decode
    rig.threads.run_until_idle()
    assert rig.embedder.aborted == [[rig.tokens("lost"), rig.tokens("words")]]
    assert rig.batches[-1].aborted
    assert rig.worker.idle
    # The flag stops nothing after it: the next request is served.
    rig.embedder.embed_hook = None
    after = rig.post(input="next")
    rig.threads.run_until_idle()
    assert after.status == 200
    assert len(rig.embedder.aborted) == 1


def test_a_batch_shared_with_a_request_still_wanted_finishes() -> None:
    rig = make_rig()
    gone = rig.post(input="lost")
    kept = rig.post(input="kept")
    rig.embedder.embed_hook = gone.disconnect
    rig.threads.run_until_idle()
    assert rig.embedder.aborted == []
    assert kept.status == 200
    assert close_to(kept.json()["data"][0]["embedding"], rig.embedder.vector(rig.tokens("kept")))


def test_a_cancelled_request_spanning_batches_runs_no_further_batch() -> None:
    rig = make_rig(n_seq=1)
    gone = rig.post(input=["a", "b", "c"])
    rig.embedder.embed_hook = gone.disconnect
    rig.threads.run_until_idle()
    assert rig.embedder.calls == [[rig.tokens("a")]]
    assert rig.embedder.aborted == rig.embedder.calls


def test_tokenizing_happens_off_the_reactor_before_anything_is_queued() -> None:
    rig = make_rig()
    rig.threads.hold_offload = True
    ex = rig.post(input=["a", "b"])
    assert len(rig.threads.offloaded) == 1  # every string of the request in one hop
    assert rig.worker.queue_depth == 0
    rig.threads.release()
    assert rig.worker.queue_depth == 1
    rig.threads.run_until_idle()
    assert ex.status == 200


def test_a_client_that_leaves_while_tokenizing_queues_nothing() -> None:
    rig = make_rig()
    rig.threads.hold_offload = True
    ex = rig.post(input="a")
    ex.disconnect()
    rig.threads.release()
    assert rig.worker.queue_depth == 0 and rig.worker.idle


# -- the worker's life ------------------------------------------------------


def test_drain_answers_what_finishes_in_time_and_cuts_off_the_rest() -> None:
    rig = make_rig(drain_timeout=5, n_seq=1)
    ex = rig.post(input=["a", "b"])
    stopped = rig.worker.stopService()
    assert rig.post(input="c").status == 503
    rig.threads.step()  # "a" embedded; "b" still waits
    rig.clock.advance(5)
    assert ex.status == 503
    assert error(ex)["code"] == "server_shutting_down"
    rig.threads.run_until_idle()
    assert stopped.called
    assert rig.worker.drain_result is not None
    assert (rig.worker.drain_result.cancelled, rig.worker.drain_result.timed_out) == (1, True)
    assert rig.threads.stopped and rig.embedder.closes == 1


def test_on_demand_a_request_waits_for_the_load_and_unload_needs_idle() -> None:
    emb = ScriptedEmbedder()
    threads = SteppedThreads()
    worker = EmbeddingWorker(emb, threads, 4, drain_timeout=1, clock=Clock(), on_demand=True)
    asked: list[EmbeddingWorker] = []
    worker.demand = asked.append
    worker.startService()
    assert not emb.loaded
    d = worker.submit([[1, 2]])
    assert asked == [worker] and not d.called
    worker.load()
    threads.run_until_idle()
    assert d.called and emb.calls == [[[1, 2]]]
    assert worker.idle
    worker.unload()
    assert not emb.loaded and emb.closes == 1
    again = worker.submit([[3]])
    assert asked == [worker, worker]
    worker.load()
    threads.run_until_idle()
    assert again.called and emb.loads == 2
