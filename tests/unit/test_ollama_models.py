"""
Ollama's model and embedding routes (ds4tw/_api/ollama/models.py and
embed.py) through the real server's Klein app: C{/api/version},
C{/api/tags}, C{/api/show}, C{/api/ps}, the refused management routes,
C{/api/embed} and C{/api/embeddings}; and the GGUF header reader under
them (ds4tw/_engine/gguf.py).

The chat models are scripted engines given a model file: a small GGUF
this test writes (typed keys, arrays, tensors), so the facts Ollama reads
from its store (size, date, digest, details, typed metadata) come from a
real file. The model thread is SteppedThreads, so loads and embeddings
run when the test says. What it cannot show: that Ollama's own clients
parse these bodies (tests/integration/test_ollama_sdk.py runs the
C{ollama} library against a real twistd), or a real llama.cpp model's
metadata beyond its header (the demo model's header is read when it is
installed).
"""

from __future__ import annotations

import math
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from ds4tw import Server, ServerConfig
from ds4tw._api.ollama.models import OLLAMA_VERSION, human_number
from ds4tw._api.openai.embeddings import fit
from ds4tw._engine.gguf import ModelFile, read_header
from ds4tw._engine.llama import demo_model_path
from ds4tw._runtime.fleet import Model
from ds4tw.testing import Exchange, HTTPHarness, ScriptedEmbedder, ScriptedEngine, SteppedThreads

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)

# -- a GGUF file ----------------------------------------------------------------


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value: Any) -> bytes:
    out = _str(key)
    if isinstance(value, bool):
        return out + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return (
            out + struct.pack("<Ii", 5, value)
            if value < 2**31
            else out + struct.pack("<IQ", 10, value)
        )
    if isinstance(value, float):
        return out + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + _str(value)
    assert isinstance(value, list)
    if value and isinstance(value[0], str):
        return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_str(v) for v in value)
    return out + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[int, ...]]) -> Path:
    """A GGUF v3 file: the metadata, then the tensors' infos and some weight bytes."""
    body = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    body += b"".join(_kv(k, v) for k, v in metadata.items())
    for i, shape in enumerate(tensors):
        body += _str(f"t{i}") + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
        body += struct.pack("<IQ", 0, 0)
    path.write_bytes(body + bytes(range(256)) * 16)
    return path


LLAMA_META: dict[str, Any] = {
    "general.architecture": "llama",
    "general.name": "Tiny Test",
    "general.basename": "tiny",
    "general.size_label": "135M",
    "general.file_type": 7,
    "general.languages": ["en"],
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b", "c", "d"],
    "tokenizer.ggml.token_type": [1, 3, 1, 1, 1, 1],
    "tokenizer.ggml.empty": [],
    "tokenizer.chat_template": "{{ messages }}",
}


class FileEngine(ScriptedEngine):
    """A scripted engine that has a model file, as L{ds4tw._engine.llama.LlamaEngine} has."""

    def __init__(self, model_path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_path = model_path


# -- the server -------------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path: Path, idle_unload: float | None = None) -> None:
        self.path = write_gguf(tmp_path / "tiny.gguf", LLAMA_META, [(576, 49152), (576,)])
        os.utime(self.path, (1_700_000_000, 1_700_000_000))
        self.chat = FileEngine(
            self.path,
            ("Hello.",),
            model_id="tiny",
            chat_template=THINKING_TEMPLATE,
            n_ctx=2048,
            memory_mb=12,
        )
        self.plain = ScriptedEngine(("Plain.",), model_id="plain", memory_mb=5)
        self.embedder = ScriptedEmbedder("embed", n_ctx=8, n_vocab=0x110000, memory_mb=3)
        self.threads = SteppedThreads()
        self.threads.hold_calls = True
        self.clock = Clock()
        self.server = Server(
            models=[
                Model(self.chat, aliases=("tiny:latest", "tiny-*")),
                Model(self.plain),
                Model(embedder=self.embedder, aliases=("nomic-embed-text",)),
            ],
            config=ServerConfig(keepalive=2.0),
            idle_unload=idle_unload,
            clock=self.clock,
            threads=self.threads,
        )
        self.server.startService()
        self.http = HTTPHarness(self.server.resource(), self.clock)

    def run(self) -> None:
        for _ in range(100):
            if self.threads.called:
                self.threads.release_calls()
            elif self.threads.busy:
                self.threads.run_until_idle()
            else:
                return
        raise AssertionError("never settled")

    def show(self, **body: Any) -> Exchange:
        return self.http.post("/api/show", body)

    def embed(self, **body: Any) -> Exchange:
        ex = self.http.post("/api/embed", {"model": "embed", **body})
        self.run()
        return ex


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# -- /api/version -----------------------------------------------------------------


def test_the_version_is_a_bare_ollama_version_copilot_accepts(rig: Rig) -> None:
    ex = rig.http.get("/api/version")
    assert ex.status == 200 and ex.json() == {"version": OLLAMA_VERSION}
    # VS Code Copilot parseInt()s each part and wants at least 0.6.4.
    parts = tuple(int(p) for p in OLLAMA_VERSION.split("."))
    assert len(parts) == 3 and parts >= (0, 6, 4)


# -- /api/tags --------------------------------------------------------------------


def test_tags_lists_every_model_and_exact_alias_with_facts_from_the_file(rig: Rig) -> None:
    ex = rig.http.get("/api/tags")
    assert ex.status == 200
    models = {m["name"]: m for m in ex.json()["models"]}
    assert list(models) == ["tiny", "tiny:latest", "plain", "embed", "nomic-embed-text"]
    tiny = models["tiny"]
    assert tiny["model"] == "tiny"
    assert tiny["size"] == rig.path.stat().st_size
    assert tiny["modified_at"] == "2023-11-14T22:13:20.000000Z"
    assert len(tiny["digest"]) == 64 and int(tiny["digest"], 16) >= 0
    assert tiny["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        # 576 * 49152 + 576 parameters, as Ollama's HumanNumber writes them.
        "parameter_size": "28.31M",
        "quantization_level": "Q8_0",
    }
    assert tiny["capabilities"] == ["completion", "tools", "thinking"]
    # An alias is the same model: the same digest.
    assert models["tiny:latest"]["digest"] == tiny["digest"]
    assert models["plain"]["capabilities"] == ["completion"]
    assert models["embed"]["capabilities"] == ["embedding"]
    assert models["plain"]["digest"] != models["embed"]["digest"]
    # Nothing was loaded to answer.
    assert all(m.runner.state.value == "unloaded" for m in rig.server.fleet.models.values())


# -- /api/show --------------------------------------------------------------------


def test_show_gives_typed_metadata_without_long_arrays_and_the_served_context(rig: Rig) -> None:
    ex = rig.show(model="tiny")
    assert ex.status == 200, ex.body
    body = ex.json()
    info = body["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["general.basename"] == "tiny"
    # Ollama leaves these two out of model_info.
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    # Typed: numbers as numbers (a float32 as its shortest decimal), bools as bools.
    assert info["llama.embedding_length"] == 576
    assert info["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert info["tokenizer.ggml.add_bos_token"] is False
    assert info["general.parameter_count"] == 576 * 49152 + 576
    # Every non-empty array is null (Ollama reads arrays with a maximum of 0).
    assert info["tokenizer.ggml.tokens"] is None and info["general.languages"] is None
    assert info["tokenizer.ggml.empty"] == []
    # The context it is served with, which VS Code Copilot reads.
    assert info["llama.context_length"] == 2048
    assert body["capabilities"] == ["completion", "tools", "thinking"]
    assert body["template"] == THINKING_TEMPLATE
    assert body["details"]["quantization_level"] == "Q8_0"
    assert body["modified_at"] == "2023-11-14T22:13:20.000000Z"
    assert body["parameters"].split() == ["num_ctx", "2048"]


def test_show_verbose_gives_the_arrays(rig: Rig) -> None:
    info = rig.show(model="tiny", verbose=True).json()["model_info"]
    assert info["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "b", "c", "d"]
    assert info["tokenizer.ggml.token_type"] == [1, 3, 1, 1, 1, 1]
    # The cached non-verbose facts are untouched.
    assert rig.show(model="tiny").json()["model_info"]["tokenizer.ggml.tokens"] is None


def test_show_takes_the_legacy_name_and_aliases_and_tells_copilot_the_name_asked(
    rig: Rig,
) -> None:
    assert rig.show(name="tiny:latest").status == 200
    copilot = rig.http.post(
        "/api/show",
        {"model": "tiny:latest"},
        headers={"User-Agent": "GitHubCopilotChat/0.30.0"},
    )
    assert copilot.json()["model_info"]["general.basename"] == "tiny:latest"


def test_show_of_models_without_a_file_and_of_an_embedder(rig: Rig) -> None:
    plain = rig.show(model="plain").json()
    # No file: no metadata, but what Copilot reads is there.
    assert plain["model_info"] == {
        "general.architecture": "scripted",
        "scripted.context_length": 4096,
    }
    # ChatML with no <think> and no tools: the <think> fallback is not a claim.
    assert plain["capabilities"] == ["completion"]
    embed = rig.show(model="nomic-embed-text").json()
    assert embed["capabilities"] == ["embedding"]
    assert "template" not in embed
    assert embed["model_info"]["scripted.context_length"] == 8


def test_show_refuses_an_unknown_model_in_ollamas_words_and_a_missing_one(rig: Rig) -> None:
    # A glob alias is not a model name to show (as /v1/models/{id} with fallback off).
    for name in ("nope", "llama3:8b"):
        ex = rig.show(model=name)
        assert ex.status == 404
        assert ex.json() == {"error": f"model '{name}' not found"}
    missing = rig.show()
    assert missing.status == 400 and missing.json() == {"error": "model is required"}
    assert rig.http.post("/api/show", b"").status == 400


# -- /api/ps ----------------------------------------------------------------------


def test_ps_lists_only_loaded_models_with_memory_and_a_far_expiry(rig: Rig) -> None:
    assert rig.http.get("/api/ps").json() == {"models": []}
    chat = rig.http.post(
        "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    rig.run()
    assert chat.status == 200
    [entry] = rig.http.get("/api/ps").json()["models"]
    assert entry["name"] == entry["model"] == "tiny"
    assert entry["size"] == 12 * 2**20
    assert entry["size_vram"] == 0
    assert entry["context_length"] == 2048
    tags = {m["name"]: m for m in rig.http.get("/api/tags").json()["models"]}
    assert entry["digest"] == tags["tiny"]["digest"]
    assert entry["details"]["family"] == "llama"
    # No idle unload: Ollama's "forever", some three centuries ahead.
    expires = datetime.fromisoformat(entry["expires_at"])
    assert expires > datetime.now(UTC) + timedelta(days=200 * 365)


def test_ps_expiry_is_when_the_idle_unload_fires(tmp_path: Path) -> None:
    rig = Rig(tmp_path, idle_unload=300)
    rig.http.post("/api/chat", {"model": "plain", "messages": [{"role": "user", "content": "x"}]})
    rig.run()
    rig.clock.advance(100)
    [entry] = rig.http.get("/api/ps").json()["models"]
    assert entry["name"] == "plain"
    left = datetime.fromisoformat(entry["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=190) < left <= timedelta(seconds=200)


# -- management -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "what"),
    [
        ("POST", "pull"),
        ("POST", "push"),
        ("POST", "create"),
        ("POST", "copy"),
        ("DELETE", "delete"),
    ],
)
def test_model_management_is_refused_in_ollamas_shape(rig: Rig, method: str, what: str) -> None:
    ex = rig.http.request(method, f"/api/{what}", b'{"model": "tiny"}')
    assert ex.status == 403
    message = ex.json()["error"]
    assert f"/api/{what}" in message and "does not manage models" in message
    assert list(ex.json()) == ["error"]


# -- /api/embed and /api/embeddings --------------------------------------------------


def norm(v: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


def test_embed_gives_normalised_vectors_and_ollamas_counters(rig: Rig) -> None:
    ex = rig.embed(input=["the cat", "sat on the mat"])
    assert ex.status == 200, ex.body
    body = ex.json()
    assert body["model"] == "embed"
    assert len(body["embeddings"]) == 2
    for v, text in zip(body["embeddings"], ["the cat", "sat on the mat"], strict=True):
        assert math.isclose(norm(v), 1.0)
        expected = rig.embedder.vector(rig.embedder.tokenize(text))
        assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(v, expected, strict=True))
    assert body["prompt_eval_count"] == 6
    assert isinstance(body["total_duration"], int) and isinstance(body["load_duration"], int)
    one = rig.embed(input="the cat", model="nomic-embed-text").json()
    assert one["model"] == "nomic-embed-text" and len(one["embeddings"]) == 1


def test_embed_truncates_by_default_and_refuses_when_told_not_to(rig: Rig) -> None:
    long = " ".join(f"w{i}" for i in range(20))  # 20 tokens; the model embeds 8
    cut = rig.embed(input=long)
    assert cut.status == 200
    assert cut.json()["prompt_eval_count"] == 8
    first8 = rig.embedder.tokenize(long)[:8]
    assert rig.embedder.calls[-1] == [first8]
    refused = rig.embed(input=["a", long], truncate=False)
    assert refused.status == 400
    assert refused.json() == {
        "error": "input[1] is 20 tokens long; this model embeds at most 8 tokens per input"
    }


def test_truncation_keeps_the_tokens_the_tokenizer_adds_at_the_end() -> None:
    bos, eos = 1, 2
    assert fit([bos, 5, 6, 7, 8, eos], 4, [bos, eos]) == [bos, 5, 6, eos]
    assert fit([bos, 5, 6, 7, 8], 4, [bos]) == [bos, 5, 6, 7]
    assert fit([5, 6, 7, 8], 3, []) == [5, 6, 7]
    assert fit([5, 6], 3, [bos, eos]) == [5, 6]


def test_embed_dimensions_cuts_and_renormalises(rig: Rig) -> None:
    full = rig.embed(input="a b c").json()["embeddings"][0]
    short = rig.embed(input="a b c", dimensions=3).json()["embeddings"][0]
    assert len(short) == 3 and math.isclose(norm(short), 1.0)
    scale = norm(full[:3])
    assert all(math.isclose(s, f / scale) for s, f in zip(short, full[:3], strict=True))
    # As Ollama: more than the model has changes nothing.
    assert len(rig.embed(input="a", dimensions=99).json()["embeddings"][0]) == 8


def test_embed_with_no_input_answers_no_vectors_without_loading(rig: Rig) -> None:
    for empty in ({}, {"input": ""}, {"input": []}):
        ex = rig.embed(**empty)
        assert ex.status == 200 and ex.json() == {"model": "embed", "embeddings": []}
    assert rig.server.fleet.models["embed"].runner.state.value == "unloaded"


def test_embed_refusals_in_ollamas_shape(rig: Rig) -> None:
    unknown = rig.embed(model="nope", input="a")
    assert unknown.status == 404 and unknown.json() == {"error": "model 'nope' not found"}
    chat = rig.embed(model="plain", input="a")
    assert chat.status == 400 and "does not serve embeddings" in chat.json()["error"]
    bad = rig.embed(input=[1, 2])
    assert bad.status == 400 and list(bad.json()) == ["error"]


def test_legacy_embeddings_gives_one_vector(rig: Rig) -> None:
    ex = rig.http.post("/api/embeddings", {"model": "embed", "prompt": "the cat"})
    rig.run()
    assert ex.status == 200
    [vector] = [ex.json()["embedding"]]
    assert vector == rig.embed(input="the cat").json()["embeddings"][0]
    empty = rig.http.post("/api/embeddings", {"model": "embed", "prompt": ""})
    assert empty.json() == {"embedding": []}
    missing = rig.http.post("/api/embeddings", {"model": "nope", "prompt": "x"})
    assert missing.status == 404


# -- the GGUF reader ------------------------------------------------------------


def test_human_number_is_ollamas() -> None:
    assert human_number(134_515_008) == "134.52M"
    assert human_number(7_000_000_000) == "7B"
    assert human_number(8_190_735_360) == "8.2B"
    assert human_number(500_000) == "500K"
    assert human_number(54) == "54"


def test_a_file_that_is_not_a_gguf_is_a_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_header([bad])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "full.gguf", LLAMA_META, []).read_bytes()[:60])
    with pytest.raises(ValueError, match="cut short"):
        read_header([cut])


def test_the_demo_models_header() -> None:
    """The real thing, when installed: SmolLM2's GGUF as Ollama would show it."""
    path = demo_model_path()
    if path is None:
        pytest.skip("the demo model is not installed")
    header = read_header([path])
    meta = header.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 8192
    assert meta["tokenizer.ggml.tokens"] is None
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert human_number(header.parameter_count) == "134.52M"


def test_llama_engines_have_a_model_file() -> None:
    from ds4tw._engine.embed import LlamaEmbedder
    from ds4tw._engine.llama import LlamaEngine

    assert isinstance(LlamaEngine("/nonexistent.gguf"), ModelFile)
    assert isinstance(LlamaEmbedder("/nonexistent.gguf"), ModelFile)
    assert not isinstance(ScriptedEngine(), ModelFile)
