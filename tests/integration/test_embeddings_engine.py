"""
Embeddings on the demo model: L{ds4tw._engine.embed.LlamaEmbedder} through
the L{ds4tw._runtime.embedding.EmbeddingWorker} on a real model thread,
checked against llama-cpp-python's own C{Llama.embed} on the same texts,
alone and batched (batching must not change the vectors); a cancel that
stops a decode from inside; and the official C{openai} SDK against
C{twistd ds4tw --embeddings} on a real loopback port, the same server
still answering chat.

The reference C{Llama} runs before the worker starts, never beside it
(one ggml compute thread at a time). How much batching saves is measured
outside the tests; here only that inputs waiting together share decodes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater

from ds4tw import demo_model_path
from ds4tw._engine.embed import LlamaEmbedder
from ds4tw._engine.interface import Aborted, AbortFlag
from ds4tw._engine.llama import no_extra_buffers
from ds4tw._runtime.embedding import BatchStats, EmbeddingWorker
from ds4tw._runtime.modelthread import ModelThread

from .conftest import start_twistd, stop_twistd

TEXTS = [
    "The cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons, "
    "the particles that make up protons, neutrons and other hadrons.",
    "hi",
    "Paris is the capital and most populous city of France.",
    "def add(a, b):\n    return a + b\n",
]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


@pytest.fixture(scope="module")
def model_path() -> str:
    path = demo_model_path()
    assert path is not None
    return str(path)


@pytest.fixture(scope="module")
def reference(model_path: str) -> dict[str, list[float]]:
    """Llama.embed's own vectors for TEXTS, each alone (then the model is freed)."""
    import llama_cpp

    with no_extra_buffers():
        llm = llama_cpp.Llama(
            model_path,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_threads=2,
            verbose=False,
        )
    try:
        return {t: llm.embed(t, normalize=True) for t in TEXTS}
    finally:
        llm.close()


@dataclass
class Served:
    worker: EmbeddingWorker
    embedder: LlamaEmbedder
    batches: list[BatchStats]


@asynccontextmanager
async def serving(path: str, **kw: Any) -> AsyncIterator[Served]:
    embedder = LlamaEmbedder(path, n_threads=2, **kw)
    worker = EmbeddingWorker(embedder, ModelThread(reactor), 128, drain_timeout=5)
    batches: list[BatchStats] = []
    worker.batch_observers.append(batches.append)
    worker.startService()
    served = Served(worker, embedder, batches)
    try:
        await worker.loaded
        yield served
    finally:
        await worker.stopService()


async def embed_texts(served: Served, texts: Sequence[str]) -> list[list[float]]:
    tokens = [served.embedder.tokenize(t) for t in texts]
    vectors: list[list[float]] = await served.worker.submit(tokens)
    return vectors


@pytest_twisted.ensureDeferred
async def test_one_text_matches_llama_embed(
    model_path: str, reference: dict[str, list[float]]
) -> None:
    async with serving(model_path) as served:
        assert served.embedder.pooling == "mean"  # the GGUF names none: mean, logged
        assert served.embedder.n_embd == 576
        [vector] = await embed_texts(served, [TEXTS[0]])
    assert len(vector) == 576
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-6)
    assert cosine(vector, reference[TEXTS[0]]) >= 0.999


@pytest_twisted.ensureDeferred
async def test_a_batch_of_texts_of_different_lengths_matches_each_alone(
    model_path: str, reference: dict[str, list[float]]
) -> None:
    async with serving(model_path) as served:
        # One request of several inputs, and several requests at once: both
        # become decodes of several sequences.
        together = await embed_texts(served, TEXTS)
        separate = await gatherResults(
            [Deferred.fromCoroutine(embed_texts(served, [t])) for t in TEXTS]
        )
    assert max(b.inputs for b in served.batches) > 1
    for text, vector in zip(TEXTS, together, strict=True):
        assert cosine(vector, reference[text]) >= 0.999, text
    for text, [vector] in zip(TEXTS, separate, strict=True):
        assert cosine(vector, reference[text]) >= 0.999, text


@pytest_twisted.ensureDeferred
async def test_cancelling_the_only_request_stops_its_decode_inside(model_path: str) -> None:
    # 8 inputs of ~120 tokens: a decode of about a thousand tokens, a few
    # seconds on two cores; the cancel comes a quarter second in.
    long_text = " ".join(["The river carried the copper lantern past the meadow."] * 10)
    async with serving(model_path, n_ctx=128, n_batch=1024, n_seq=8) as served:
        tokens = [served.embedder.tokenize(long_text + f" {i}") for i in range(8)]
        d = served.worker.submit(tokens)
        started = time.monotonic()
        await deferLater(reactor, 0.25, lambda: None)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        while not served.worker.idle:
            await deferLater(reactor, 0.01, lambda: None)
        stopped_after = time.monotonic() - started
        assert served.batches and served.batches[0].aborted
        # Not a whole decode's worth: timed alone, the same batch for comparison.
        started = time.monotonic()
        await served.worker.submit(tokens)
        whole = time.monotonic() - started
    print(f"\ncancel stopped the decode {stopped_after:.2f} s in; a whole one takes {whole:.2f} s")
    assert stopped_after < whole * 0.6


def test_the_abort_flag_stops_a_decode_from_another_thread(model_path: str) -> None:
    """The flag as the reactor sets it: from another thread, mid-decode."""
    embedder = LlamaEmbedder(model_path, n_threads=2, n_ctx=128, n_batch=1024, n_seq=8)
    embedder.load()
    try:
        text = " ".join(["The river carried the copper lantern past the meadow."] * 10)
        tokens = [embedder.tokenize(text + f" {i}") for i in range(8)]
        flag = AbortFlag()
        timer = threading.Timer(0.2, flag.set)
        started = time.monotonic()
        timer.start()
        with pytest.raises(Aborted):
            embedder.embed(tokens, flag)
        aborted = time.monotonic() - started
        started = time.monotonic()
        vectors = embedder.embed(tokens, AbortFlag())
        whole = time.monotonic() - started
        assert len(vectors) == 8
    finally:
        embedder.close()
    assert aborted < whole * 0.6, (aborted, whole)


def sdk_calls(url: str) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS[:3])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=TEXTS[3], encoding_format="float"
    )
    tokens = client.embeddings.create(model="text-embedding-3-small", input=[[19556, 905]])
    try:
        client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=64)
    except openai.BadRequestError as e:
        refused: Any = e
    else:
        refused = None
    return {"default": default, "floats": floats, "tokens": tokens, "refused": refused}


def test_the_openai_sdk_against_twistd_with_embeddings(
    tmp_path: Path, reference: dict[str, list[float]]
) -> None:
    """
    C{twistd ds4tw --embeddings}: the one model serves chat and
    embeddings; the SDK's default (base64, decoded by the SDK) and float
    answers agree with Llama.embed.
    """
    server = start_twistd(
        tmp_path, "--embeddings", "--ctx", "1024", "--threads", "2", "--cache-ram-mb", "0"
    )
    try:
        got = sdk_calls(server.url + "/v1")
        import openai

        chat = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = chat.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        health = httpx.get(server.url + "/health").json()
    finally:
        stop_twistd(server)
    default, floats = got["default"], got["floats"]
    assert [d.index for d in default.data] == [0, 1, 2]
    for text, d in zip(TEXTS[:3], default.data, strict=True):
        # The SDK asked for base64 and decoded it into floats itself.
        assert isinstance(d.embedding, list) and len(d.embedding) == 576
        assert cosine(d.embedding, reference[text]) >= 0.999
    assert cosine(floats.data[0].embedding, reference[TEXTS[3]]) >= 0.999
    assert default.model == "text-embedding-3-small"
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    assert got["tokens"].usage.prompt_tokens == 2
    refused = got["refused"]
    assert refused is not None and refused.status_code == 400
    assert refused.body["param"] == "dimensions"
    # The same server still chats; its embedding context loaded when first asked for.
    assert reply.choices[0].message.content
    assert health["models"][0]["embeddings"] == {"state": "ready", "loads": 1}


@pytest_twisted.ensureDeferred
async def test_inputs_that_wait_together_share_decodes(model_path: str) -> None:
    """
    64 requests submitted at once take a few decodes, not 64. (How much
    that saves is the benchmark's business, not a test's: batched ran
    1.2-1.5x the embeddings per second of one at a time here.)
    """
    texts = [f"Short sentence number {i} about the weather in a small town." for i in range(64)]
    async with serving(model_path, n_ctx=512, n_seq=64) as served:
        tokens = [served.embedder.tokenize(t) for t in texts]
        before = len(served.batches)
        results = await DeferredList([served.worker.submit([t]) for t in tokens])
        decodes = len(served.batches) - before
    assert all(ok for ok, _ in results)
    assert decodes < 64 / 4
